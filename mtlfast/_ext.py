"""Loading of the compiled extension ``mtlfast._C`` (C++ CPU kernels, CUDA kernels when built with CUDA).

Importing the extension registers its ops under ``torch.ops.mtlfast``. A missing or broken extension is
never an ImportError for the user: :func:`status` records why, and the backend machinery
(:func:`mtlfast.backends.extension_unavailable`) turns that into the refusal reason of the ``cpp`` and
``cuda`` backends.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    reason: str = ""
    with_cuda: bool = False
    build_info: str = ""


_STATUS: ExtensionStatus | None = None


def status() -> ExtensionStatus:
    # Memoised in a module global rather than functools.lru_cache: torch.compile (dynamo) ignores lru_cache and
    # would trace the body, whose build_info() op returns a str it cannot put in a graph; a global read it can.
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
    return _STATUS


def _load() -> ExtensionStatus:
    if importlib.util.find_spec("mtlfast._C") is None:  # Python's own message for this names a circular import
        return ExtensionStatus(False, "not built: a pure-Python install (torch absent at install time, "
                                      "MTLFAST_NO_EXTENSION=1, or a compile error without MTLFAST_STRICT_BUILD=1)")
    try:
        from mtlfast import _C  # noqa: F401  (registers torch.ops.mtlfast.*)
    except Exception as exc:  # ImportError when not built; OSError for an ABI mismatch with torch
        return ExtensionStatus(False, f"{exc.__class__.__name__}: {exc}")
    info = str(torch.ops.mtlfast.build_info())
    return ExtensionStatus(True, with_cuda="cuda=yes" in info, build_info=info)


def stale_reason() -> str | None:
    """Why the loaded extension is not the build of this tree's C++/CUDA sources (an editable install's csrc/
    changed since the build), or None (it is; no extension; or no csrc/ beside the package to compare with)."""
    import os

    from mtlfast._sources import csrc_digest

    info = status()
    tree = csrc_digest(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
    if not info.loaded or tree is None:
        return None
    built = next((t.split("=", 1)[1] for t in info.build_info.split() if t.startswith("sources=")), "unknown")
    if built == tree:
        return None
    return (f"mtlfast._C was built from other C++/CUDA sources (sources={built}) than this tree's csrc/ "
            f"(sources={tree}): rebuild it (pip install --no-build-isolation -e .)")


def ops():
    """``torch.ops.mtlfast`` after making sure the extension is loaded (callers checked :func:`status`)."""
    if not status().loaded:
        raise RuntimeError(f"mtlfast._C is not available: {status().reason}")
    return torch.ops.mtlfast
