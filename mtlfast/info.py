"""``mtlfast info``: versions, the compiled extension, devices, and which backend serves each op."""
from __future__ import annotations

import os
import platform

import torch

from mtlfast import _ext
from mtlfast.backends import BackendError, current_backend, registered_ops


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({exc.__class__.__name__})"
    return triton.__version__


def device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_table() -> list[tuple[str, str, str, str]]:
    """(op, device, backend in force -> chosen implementation, refusals of the others) per op and device."""
    rows = []
    try:
        requested = current_backend()
    except ValueError as exc:  # a bad MTLFAST_BACKEND: the table still shows what each backend can serve
        requested = f"invalid ({exc})"
    for name, op in sorted(registered_ops().items()):
        for device in device_types():
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            try:
                chosen = op.select(None, device, dtype, check_limits=False).backend
            except (BackendError, ValueError) as exc:
                chosen = "none: " + str(exc).splitlines()[0]
            others = "; ".join(f"{b}: {', '.join(r)}" for b, r in op.support_table(device, dtype).items()
                               if r and b != chosen)
            rows.append((name, f"{device}/{str(dtype).replace('torch.', '')}", f"{requested} -> {chosen}", others))
    return rows


def info_text() -> str:
    ext, stale = _ext.status(), _ext.stale_reason()  # stale_reason hashes csrc/: once
    lines = [
        f"mtlfast {__import__('mtlfast').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_triton_version()}",
        "extension mtlfast._C: " + (f"built [{ext.build_info}]" if ext.loaded else f"missing ({ext.reason})")
        + (f"; STALE: {stale}" if stale else ""),
        "environment: " + " ".join(f"{name}={os.environ.get(name) or '(unset)'}"
                                   for name in ("TRITON_INTERPRET", "MTLFAST_BACKEND")),
        "devices: cpu (" + f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        + "".join(f", cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())),
        "",
        "ops (backend in force -> backend used; why the others cannot serve):",
    ]
    rows = backend_table()
    if not rows:
        lines.append("  (no ops registered)")
    for op, device, chosen, others in rows:
        lines.append(f"  {op:<18} {device:<14} {chosen:<22} {others}")
    return "\n".join(lines)
