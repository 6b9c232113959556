"""Backend selection (DESIGN.md §2).

Every op in :mod:`mtlfast.ops` is an :class:`Op` with one :class:`Implementation` per backend. An
implementation *declares* what it supports (device types, dtypes, whether it can run on this machine,
shape limits); :meth:`Op.select` turns a backend request into an implementation or raises
:class:`BackendError` listing, per backend, why it cannot serve the input. There is no silent fallback:
only ``"auto"`` chooses, and it chooses in the op's declared preference order.

The backend in force is, in order: the per-call ``backend=`` argument, the innermost
:func:`use_backend` context (its per-op overrides first), the ``MTLFAST_BACKEND`` environment variable,
``"auto"``. Under torch.compile the scope is traced and guarded (a compiled function recompiles when it changes);
``MTLFAST_BACKEND`` is read when a graph is traced (Dynamo does not guard the environment): set it before.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}

# The scope (use_backend, meta_planning) is per thread (asyncio tasks of one thread share it, unlike a context
# variable's), and torch.compile can trace it: Dynamo cannot trace ContextVar.get (every op call would break a compiled
# model's graph) and guards on what it reads here, so a compiled model recompiles when the scope changes
# (tests/test_backends.py). Read through getattr with a default: Dynamo did not guard a threading.local subclass's
# class-level defaults (torch 2.13). A block leaves an unset entry unset (a default written back would fail the
# guards of code compiled before the block: one more compilation), except a block inside a compiled function, which
# writes the default back (Dynamo cannot trace delattr on a threading.local).
_scope = threading.local()
_SCOPE_DEFAULTS = {"backend": None, "op_backends": {}, "meta_plan": None}  # op_backends: replaced, never mutated
_UNSET = object()


def _scoped(name: str):
    return getattr(_scope, name, _SCOPE_DEFAULTS[name])


@contextlib.contextmanager
def _scope_set(**values) -> Iterator[None]:
    """Sets scope entries for the block and restores the previous ones (nests)."""
    previous = {name: getattr(_scope, name, _UNSET) for name in values}
    for name, value in values.items():
        setattr(_scope, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is not _UNSET:
                setattr(_scope, name, value)
            elif torch.compiler.is_compiling():
                setattr(_scope, name, _SCOPE_DEFAULTS[name])
            else:
                delattr(_scope, name)

#: name -> Op, filled as op modules are imported (``mtlfast.ops`` imports all of them; :func:`registered_ops`).
OPS: dict[str, "Op"] = {}


def registered_ops() -> dict[str, "Op"]:
    """:data:`OPS` with every op of :mod:`mtlfast.ops` in it (``import mtlfast`` alone imports no op module)."""
    importlib.import_module("mtlfast.ops")  # registers the ops

    return OPS


class BackendError(RuntimeError):
    """A backend was asked for an input it cannot serve; the message lists every reason."""


def _validate(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def current_backend(backend: str | None = None, op: str | None = None) -> str:
    """The backend in force for a call (of op ``op``, if given) that passes ``backend`` (None = not given)."""
    if backend is not None:
        return _validate(backend, "backend=")
    overrides = _scoped("op_backends")
    if op is not None and op in overrides:
        return overrides[op]
    scoped = _scoped("backend")
    if scoped is not None:
        return scoped
    env = os.environ.get("MTLFAST_BACKEND")
    if env:
        return _validate(env, "MTLFAST_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str, **per_op: str) -> Iterator[None]:
    """Run the enclosed ops with backend ``name`` (nests; per-call ``backend=`` still wins; this thread only).

    ``per_op`` overrides single ops by name, e.g. ``use_backend("triton", deform_sample="cpp")`` (the kernel
    path of a model on a CPU, where deform_sample has no Triton kernel). A nested context replaces the
    overrides of the outer one."""
    name = _validate(name, "use_backend")
    for op, backend in per_op.items():
        if op not in registered_ops():
            raise ValueError(f"use_backend: unknown op {op!r}; ops: {', '.join(sorted(OPS))}")
        _validate(backend, f"use_backend({op}=...)")
    with _scope_set(backend=name, op_backends=dict(per_op)):
        yield


@dataclass(frozen=True)
class BackendScope:
    """The backend choices in force (:func:`use_backend` with its per-op overrides, :func:`meta_planning`),
    captured to be re-entered elsewhere. They hold per thread and in the ``with`` block, so another thread, or code
    run after the block, does not see them: activation checkpointing recomputes a stage during the backward
    (on autograd's device thread on a GPU, or after the block), where the recomputation must choose the
    backends the forward chose (:func:`mtlfast.nn.common.checkpoint_stage` does this)."""

    backend: str | None
    op_backends: dict
    meta_plan: str | None

    @classmethod
    def capture(cls) -> "BackendScope":
        return cls(_scoped("backend"), dict(_scoped("op_backends")), _scoped("meta_plan"))

    def active(self) -> contextlib.AbstractContextManager:
        return _scope_set(backend=self.backend, op_backends=dict(self.op_backends), meta_plan=self.meta_plan)


# --- machine capabilities shared by implementations --------------------------------------------------

#: Grid axes 1 and 2 of a CUDA launch hold at most this many programs (axis 0: 2**31 - 1).
MAX_GRID_YZ = 65535


def grid_axis_refusals(what: str, count: int) -> list[str]:
    """A kernel's refusal when ``count`` programs (``what``, e.g. "B") would go on grid axis 1 or 2."""
    if count > MAX_GRID_YZ:
        return [f"{what} = {count} exceeds the CUDA grid limit of {MAX_GRID_YZ} programs on that launch axis"]
    return []


def slice_extent(t, first_dim: int) -> int:
    """Elements one slice t[i0, ..., i_{first_dim - 1}] spans with its strides (1 + its largest offset)."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:]))


def offset_refusals(slice_name: str, **extents: int) -> list[str]:
    """A kernel's refusals for the tensors (name=elements one ``slice_name`` slice spans) whose offsets within one
    slice pass 32 bits: the kernels offset each batch (or batch and head) in 64 bits, and within it in 32."""
    return [f"{name}: one {slice_name} slice spans {extent} elements; in-slice offsets are 32-bit (< 2**31)"
            for name, extent in extents.items() if extent > 2**31]


@contextlib.contextmanager
def meta_planning(device: str = "cuda") -> Iterator[None]:
    """Ops on ``meta`` tensors select their backend as on ``device`` and run its fake implementation.

    Meta tensors have shapes and dtypes but no data, and autograd runs on them, so a CPU machine can plan the
    GPU kernel path of a whole model: which backend auto picks for every op and the activation memory each
    keeps for the backward (models/summary.py). Declared devices, dtypes and shape limits still apply; only
    the machine checks of ``device`` (a GPU present, the extension built with CUDA) are skipped: each
    backend's ``available`` is asked about "meta" instead, so Triton must import and the C++ ops must be
    loaded (their fake implementations are registered with them)."""
    if device not in DEFAULT_AUTO_ORDER:
        raise ValueError(f"meta_planning: device must be one of {', '.join(DEFAULT_AUTO_ORDER)}, got {device!r}")
    with _scope_set(meta_plan=device):
        yield


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int(minor)


def _interpreter_numpy_clash() -> bool:
    """Triton <= 3.6's interpreter converts one-element arrays to Python scalars, deprecated by numpy 1.25 and a
    TypeError since numpy 2.4 (seen with triton 3.6.0: numpy 2.3.5 passes the op tests, 2.4.0 and 2.5.2 fail)."""
    import numpy
    import triton

    return _version(triton.__version__) <= (3, 6) and _version(numpy.__version__) >= (2, 4)


def triton_unavailable(device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why Triton kernels cannot run on ``device_type`` (in ``dtype``) here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before triton is imported"
    if device_type == "cpu" and dtype == torch.bfloat16:  # it computes bfloat16 wrongly, silently
        return "the Triton interpreter (CPU) has no bfloat16 math"
    if device_type == "cpu" and _interpreter_numpy_clash():
        import numpy
        return (f"Triton {triton.__version__}'s interpreter fails on these kernels with numpy >= 2.4 (TypeError: "
                f"only 0-dimensional arrays ...; numpy {numpy.__version__} is installed): install numpy<2.3 as the "
                "[test] extra does (2.3.5 was also seen to pass)")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if device_type == "cuda":
        return _triton_capability_refusal()
    return None


#: Shared memory per thread block that every Triton kernel specialisation fits in (compiled for sm_90 in the
#: compile tests, :func:`mtlfast.testing.compile_for_gpu`, which fails above it; an sm_86 compile needs as much or
#: less): what GPUs of compute capability 8.6 / 8.9 / 12.0 offer. (The compile tests' specialisation, not quite a
#: launch's: see compile_for_gpu.) iterative_fusion's row tiles follow the GPU's
#: shared memory instead (:func:`mtlfast.kernels.iterative_fusion.row_tile_bytes`), checked per GPU class.
TRITON_SHARED_BYTES = 99 * 1024


_DEVICE_FACTS: dict[tuple[str, int], object] = {}  # (fact, CUDA device index) -> value


def _device_fact(name: str, compute: Callable[[int], object]):
    """``compute(index)`` for the current CUDA device, once per process and device: the ops ask on every call.
    (The callers are torch.compiler.assume_constant_result functions: read once per trace.)"""
    key = (name, torch.cuda.current_device())
    if key not in _DEVICE_FACTS:
        _DEVICE_FACTS[key] = compute(key[1])
    return _DEVICE_FACTS[key]


def _capability_refusal(index: int) -> str | None:
    """The Triton kernels' tiles are sized for compute capability >= 8.0: compiled for sm_75 (T4, RTX 20xx)
    attention's need up to 96 KB of shared memory per block, over the 64 KB there."""
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 0):
        return (f"the Triton kernels need compute capability >= 8.0 (their tiles take up to 96 KB of shared memory "
                f"per block on sm_75, over its 64 KB); this GPU has {major}.{minor}")
    return None


@torch.compiler.assume_constant_result
def _triton_capability_refusal() -> str | None:
    return _device_fact("triton capability", _capability_refusal)


def _max_shared(index: int) -> int:
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


@torch.compiler.assume_constant_result
def cuda_max_shared_bytes() -> int:
    """Shared memory one thread block may use on the current CUDA device (opt-in maximum, as Triton checks it
    at launch)."""
    return _device_fact("max shared", _max_shared)


def extension_unavailable(device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why the compiled extension cannot serve ``device_type`` here, or None."""
    from mtlfast import _ext

    status = _ext.status()
    if not status.loaded:
        return f"the compiled extension mtlfast._C is not available ({status.reason})"
    if device_type == "cuda":
        if not status.with_cuda:
            return "mtlfast._C was built without CUDA (rebuild with a CUDA build of torch and nvcc, or MTLFAST_BUILD_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return _cuda_arch_refusal_here()
    return None


@torch.compiler.assume_constant_result
def _cuda_arch_refusal_here() -> str | None:
    """:func:`cuda_arch_refusal` for the loaded extension and the current CUDA device."""
    from mtlfast import _ext

    return _device_fact("extension archs", lambda index: cuda_arch_refusal(
        _ext.status().build_info, torch.cuda.get_device_capability(index)))


def cuda_arch_refusal(build_info: str, capability: tuple[int, int]) -> str | None:
    """Why the CUDA kernels of a build (its ``build_info``, which ends in ``archs=<TORCH_CUDA_ARCH_LIST>``) cannot
    run on a GPU of compute ``capability``, or None. A cubin for sm_XY runs on devices X.Z with Z >= Y; ``+PTX``
    is compiled by the driver for any later device; arch-specific code (sm_XYa), cubin or PTX, only on X.Y, and
    family-specific code (sm_XYf) only on X.Z with Z >= Y. Named archs (``Hopper``) are not judged. Without this
    check the launch fails with "no kernel image is available for execution". The backends ask it for the
    current CUDA device (:func:`_cuda_arch_refusal_here`): on a machine with GPUs of several kinds, select the
    tensors' device (``torch.cuda.set_device``, as DDP does) before calling the ops."""
    if " archs=" not in build_info:
        return None
    listed = build_info.split(" archs=", 1)[1]
    archs = [a for a in listed.replace(";", " ").split() if a]
    parsed = [re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", a) for a in archs]
    if not archs or not all(parsed):
        return None
    major, minor = capability
    for m in parsed:
        arch, suffix, ptx = (int(m.group(1)), int(m.group(2))), m.group(3), bool(m.group(4))
        if suffix == "a":
            runs = arch == capability
        elif suffix == "f" or not ptx:
            runs = arch[0] == major and arch[1] <= minor
        else:
            runs = arch <= capability
        if runs:
            return None
    return (f"mtlfast._C's CUDA kernels were built for {listed} (TORCH_CUDA_ARCH_LIST), which this GPU of compute "
            f"capability {major}.{minor} cannot run: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


def _always(device_type: str, dtype: torch.dtype | None = None) -> str | None:
    return None


@torch.compiler.assume_constant_result  # torch.compile cannot trace the warn-only query: read once per trace
def deterministic_mode() -> bool:
    """torch.use_deterministic_algorithms(True) is on, and not in warn-only mode."""
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def derivative_refusal(args: Sequence = ()) -> str | None:
    """Why no kernel backend can serve a call with these arguments under the derivative mode in force, or None.
    Inside a torch.func gradient transform (grad, vjp, jacrev, jvp, jacfwd) PyTorch runs a custom op's registered
    derivative under torch.autograd only (inside torch.func.grad it fails with "autograd.Function ... must override
    the setup_context staticmethod"); and the kernels have no forward-mode derivative (jvp, dual tensors of
    torch.autograd.forward_ad). There the kernel backends refuse and auto takes the reference; torch.vmap alone runs
    the kernels (PyTorch's per-sample loop over the op)."""
    if torch.compiler.is_compiling():
        return None
    if _active_transforms() & _GRADIENT_TRANSFORMS:
        return ("a torch.func gradient transform (grad, vjp, jacrev, jvp, jacfwd) is active, and the kernels' "
                "derivatives serve torch.autograd only; the reference backend supports it")
    # forward AD's level (-1: no dual_level open) spares the per-tensor look on every call (~3 us of host time)
    if getattr(forward_ad, "_current_level", 0) >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in _tensors(args)):
        return ("an input is a dual tensor (torch.autograd.forward_ad), and the kernels have no forward-mode "
                "derivative; the reference backend has one")
    return None


_GRADIENT_TRANSFORMS = {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}


def _active_transforms() -> set:
    """The functorch transforms (TransformType) on the interpreter stack (callers skip this while compiling)."""
    return {level.key() for level in torch._C._functorch.get_interpreter_stack() or ()}


def vmap_refusal() -> list[str]:
    """A kernel's refusal under torch.vmap where PyTorch can make no batching rule for its op (a list-of-tensors
    input: "Batching rule not implemented ... could not generate a fallback"); auto then takes the reference."""
    if torch.compiler.is_compiling():
        return []
    if torch._C._functorch.TransformType.Vmap in _active_transforms():
        return ["torch.vmap is active, and PyTorch has no batching rule for this kernel's list-of-tensors input; the "
                "reference backend supports it"]
    return []


def _tensors(args: Sequence) -> Iterator[torch.Tensor]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from _tensors(arg)


def atomic_gradient_refusals(tensors, what: str, instead: str) -> list[str]:
    """A kernel's refusal when a gradient will be needed in deterministic mode and its backward accumulates with
    float atomics (``what``), whose sums differ in the last bits from run to run: PyTorch refuses its own
    nondeterministic backward kernels there. ``instead`` names the deterministic way (auto moves on to it)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and deterministic_mode():
        return [f"torch.use_deterministic_algorithms(True) is on and {what} (not bit-reproducible); {instead}"]
    return []


# --- ops ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op and its declared capabilities.

    ``available(device_type, dtype)`` says why the backend cannot run at all on that device type (in that
    dtype) here, or None;
    ``limits(*args, **kwargs)`` returns the reasons it cannot serve these particular inputs (shape limits).
    """

    backend: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[str, torch.dtype], str | None] = _always
    limits: Callable[..., list[str]] | None = None

    def refusals(self, device_type: str, dtype: torch.dtype, args: tuple = (), kwargs: dict | None = None,
                 check_limits: bool = True, available_on: str | None = None) -> list[str]:
        """Why this backend cannot serve the call (empty: it can). ``available_on``: the device type whose
        machine checks apply, if not ``device_type`` ("meta" for calls planned by :func:`meta_planning`)."""
        reasons = []
        if device_type not in self.devices:
            reasons.append(f"device {device_type!r} not supported (supports {', '.join(self.devices)})")
        else:
            why = self.available(available_on or device_type, dtype)
            if why:
                reasons.append(why)
            if self.backend != "reference":
                why = derivative_refusal(args)
                if why:
                    reasons.append(why)
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})")
        if check_limits and self.limits is not None and not reasons:
            reasons.extend(self.limits(*args, **(kwargs or {})))
        return reasons


@dataclass
class Op:
    """An op with per-backend implementations; ``auto_order`` is the preference per device type."""

    name: str
    auto_order: dict[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_AUTO_ORDER))
    implementations: dict[str, Implementation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name in OPS:
            raise ValueError(f"op {self.name!r} is already registered")
        OPS[self.name] = self

    def register(self, backend: str, fn: Callable, *, devices: Sequence[str], dtypes: Sequence[torch.dtype],
                 available: Callable[[str, torch.dtype], str | None] = _always,
                 limits: Callable[..., list[str]] | None = None) -> Callable:
        if backend == "auto" or backend not in BACKENDS:
            raise ValueError(f"cannot register backend {backend!r} for {self.name}; expected one of {BACKENDS[1:]}")
        self.implementations[backend] = Implementation(backend, fn, tuple(devices), tuple(dtypes), available, limits)
        return fn

    def select(self, backend: str | None, device: torch.device | str, dtype: torch.dtype,
               args: tuple = (), kwargs: dict | None = None, check_limits: bool = True) -> Implementation:
        """The implementation that serves this call, or :class:`BackendError` with every reason."""
        requested = current_backend(backend, self.name)
        device_type = torch.device(device).type
        available_on = None
        if device_type == "meta" and _scoped("meta_plan") is not None:  # planned: declarations of the planned device
            device_type, available_on = _scoped("meta_plan"), "meta"
        if requested == "auto":
            candidates = [b for b in self.auto_order.get(device_type, ()) if b in self.implementations]
        else:
            candidates = [requested]
        refusals: dict[str, list[str]] = {}
        for name in candidates:
            impl = self.implementations.get(name)
            if impl is None:
                refusals[name] = [f"{self.name} has no {name} implementation "
                                  f"(implemented: {', '.join(self.implementations)})"]
                continue
            reasons = impl.refusals(device_type, dtype, args, kwargs, check_limits, available_on)
            if not reasons:
                return impl
            refusals[name] = reasons
        if not candidates:
            hint = (" (to plan a model's GPU or CPU path on meta tensors, run it under "
                    "mtlfast.backends.meta_planning('cuda' | 'cpu'))" if device_type == "meta" else "")
            refusals["auto"] = [f"no backend is declared for device type {device_type!r}{hint}"]
        lines = "\n".join(f"  {b}: " + "; ".join(r) for b, r in refusals.items())
        raise BackendError(
            f"mtlfast.ops.{self.name}: backend {requested!r} cannot serve this call "
            f"(device {device_type}, dtype {str(dtype).replace('torch.', '')}):\n{lines}")

    def support_table(self, device_type: str, dtype: torch.dtype) -> dict[str, list[str]]:
        """backend -> refusal reasons (empty = usable) for ``device_type``/``dtype``, ignoring shape limits."""
        return {b: impl.refusals(device_type, dtype, check_limits=False) for b, impl in self.implementations.items()}
