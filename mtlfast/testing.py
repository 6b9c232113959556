"""Test infrastructure shared by every op (DESIGN.md §6).

:func:`check_against_reference` runs an op and its literal reference on the same fresh random inputs and
compares the forward output(s) and the gradient of every requested input, with outputs poisoned (NaN)
before the kernel runs and the tolerance table of DESIGN.md §6:

- float64 / float32: relative error ``‖out − ref‖ / ‖ref‖`` against the reference in float64 below
  1e-7 / 1e-4 (1e-3 when the kernel's float32 dots may use TF32, i.e. Triton ``tl.dot`` on a GPU);
- float16 / bfloat16: below twice the error of PyTorch's own computation (the reference run in that
  dtype) against float64, and never below the dtype's epsilon. PyTorch's error on one 16-bit draw is itself
  noisy (a small tensor can round luckily), so it is taken as the largest over the inputs, two copies
  perturbed by one epsilon and the float64 reference on the inputs rounded to the dtype (as ``conditioned``
  below does in every dtype).

A gradient whose reference is exactly zero (e.g. a bias that cancels in a softmax) is compared in
absolute norm against the same bound.

Seeds are fresh for every test unless ``MTLFAST_TEST_SEED`` is set; every random draw of a test derives from
its seed (:func:`begin_test`, :func:`fresh_seed`), and a failure prints it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtlfast._alloc import poisoned as poison_outputs

__all__ = ["tolerance", "rel_error", "fresh_seed", "randn",
           "check_against_reference", "poison_outputs", "kernel_dtypes", "default_device", "begin_test", "end_test",
           "rerun_hint", "run_without_interpreter", "compile_for_gpu", "GPU_MAX_SHARED_BYTES"]

_LOW_PRECISION_EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def default_device() -> str:
    """The device the kernel tests run on: CUDA when present, else CPU (Triton through its interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_without_interpreter(args: list[str], timeout: float = 600) -> str:
    """``python ARGS`` in a subprocess without TRITON_INTERPRET (Triton's real compiler: the sm_90 compile tests
    need no GPU); fails the test with the end of its output unless it exits 0. Returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


#: Shared memory one thread block may use (opt-in above 48 KiB) per compute capability compiled for: A100 (sm_80),
#: the 8.6 / 8.9 GPUs (RTX 30xx/40xx, A10, L4, L40), H100 / H200 (sm_90).
GPU_MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_for_gpu(fn, signature: Mapping[str, str], constexprs: Mapping[str, object], *, arch: int = 90,
                    max_shared: int | None = None, ones: Sequence[str] = (), **options):
    """A Triton kernel compiled to cubin for compute capability ``arch`` (90: sm_90a) by Triton's compiler and
    ptxas (no GPU needed; call it without the interpreter, :func:`run_without_interpreter`). Fails when the kernel
    needs more shared memory per block than ``max_shared`` (default :data:`mtlfast.backends.TRITON_SHARED_BYTES`,
    the 99 KB of sm_86/89 GPUs, which the library promises every kernel fits; never above what ``arch``'s GPUs
    offer, :data:`GPU_MAX_SHARED_BYTES`), which otherwise only its first launch on such a GPU would report.

    Every pointer and integer argument is declared divisible by 16, as a launch declares aligned tensors and
    sizes that are multiples of 16 (the benchmark shapes): that specialisation vectorises and pipelines the
    loads (up to 2.7x the unhinted compile's shared memory for attention's forward). A launch with contiguous
    tensors also passes its unit strides as the constant 1 (Triton specialises an integer argument equal to 1):
    name them in ``ones`` to compile that specialisation, which vectorises the loads further (attention's 16-bit
    forward at Dqk, Dv <= 128: 128 KB for sm_90 against 48 KB without; a review found at most 96 KB for sm_86)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in ones}}
    constexprs = {**constexprs, **{name: 1 for name in ones}}
    hinted = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
              if signature[name].startswith(("*", "i"))}
    compiled = triton.compile(ASTSource(fn, dict(signature), constexprs=dict(constexprs), attrs=hinted),
                              target=GPUTarget("cuda", arch, 32), options=options)
    from mtlfast.backends import TRITON_SHARED_BYTES

    limit = min(TRITON_SHARED_BYTES if max_shared is None else max_shared, GPU_MAX_SHARED_BYTES[arch])
    if compiled.metadata.shared > limit:
        raise AssertionError(f"{fn.__name__} ({dict(constexprs)}, {options}) needs {compiled.metadata.shared} bytes of "
                             f"shared memory per block for sm_{arch}; allowed: {limit} (such a GPU's block has "
                             f"{GPU_MAX_SHARED_BYTES[arch]})")
    return compiled


def kernel_dtypes(device: str | None = None) -> list[torch.dtype]:
    """Dtypes the Triton kernels are tested in on ``device``: every dtype their backends accept there. The
    CPU interpreter computes float16 (numpy half) but not bfloat16, which the backends refuse on CPU."""
    if (device or default_device()) == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def float32_dots_are_tf32() -> bool:
    """Whether the Triton kernels' float32 dots run in TF32: only when torch's float32 matmul precision was
    lowered (:func:`mtlfast.kernels.attention.dot_precision`); then :func:`tolerance` takes ``tf32_dots=True``."""
    from mtlfast.kernels.attention import dot_precision

    return dot_precision(torch.float32) == "tf32"


def tolerance(dtype: torch.dtype, *, tf32_dots: bool = False) -> float | None:
    """The fixed bound for float64/float32; None for float16/bfloat16 (bound from PyTorch's own error)."""
    if dtype == torch.float64:
        return 1e-7
    if dtype == torch.float32:
        return 1e-3 if tf32_dots else 1e-4
    if dtype in _LOW_PRECISION_EPS:
        return None
    raise TypeError(f"no tolerance for dtype {dtype}")


def rel_error(out: torch.Tensor, ref: torch.Tensor, *, norm: torch.Tensor | None = None) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute ‖out − ref‖ when ref is exactly zero); NaN anywhere -> inf.
    ``norm``: divide by ‖norm‖ instead of ‖ref‖."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape mismatch: got {tuple(out64.shape)}, reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    scale = torch.linalg.vector_norm((ref if norm is None else norm).detach().to(torch.float64)).item()
    return diff / scale if scale > 0 else diff


_test_seed: int | None = None  # the running test's seed (begin_test), None outside a test
_draws = 0


def _env_or_random_seed() -> int:
    env = os.environ.get("MTLFAST_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def begin_test() -> int:
    """Starts a test's seed sequence (tests/conftest.py calls it before every test): its seed is
    ``MTLFAST_TEST_SEED`` or a fresh random one, and every :func:`fresh_seed` of the test derives from it, so
    that one number reproduces the whole test (inputs, cotangents, perturbations), however many draws it makes."""
    global _test_seed, _draws
    _test_seed, _draws = _env_or_random_seed(), 0
    return _test_seed


def end_test() -> None:
    global _test_seed
    _test_seed = None


def rerun_hint(seed: int) -> str:
    """How to reproduce a failure: the running test's seed, else the failing call's own seed."""
    return f"MTLFAST_TEST_SEED={_test_seed if _test_seed is not None else seed}"


def fresh_seed() -> int:
    """Inside a test: the next seed of the test's sequence (begin_test); outside: ``MTLFAST_TEST_SEED`` or a
    random seed."""
    global _draws
    if _test_seed is None:
        return _env_or_random_seed()
    _draws += 1
    return (_test_seed + _draws - 1) % 2 ** 32


def randn(*shape: int, generator: torch.Generator, device="cpu", dtype=torch.float64, scale: float = 1.0):
    """Standard-normal values (never zeros) drawn on CPU from ``generator`` then moved, for reproducibility."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def transposed_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (the last two dimensions swapped in memory): inputs on which a
    custom op's fake implementation must still give the real kernel's output strides."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _cast(inputs: Mapping[str, object], dtype: torch.dtype, grad_names: set[str]) -> dict[str, object]:
    """Floating tensors (also inside lists/tuples) cast to ``dtype``; those named in ``grad_names`` require grad."""
    def cast(name, value):
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return value.detach().to(dtype).requires_grad_(name in grad_names)
        if isinstance(value, (list, tuple)):
            return type(value)(cast(f"{name}[{i}]", v) for i, v in enumerate(value))
        return value

    return {name: cast(name, value) for name, value in inputs.items()}


def _perturb(inputs: Mapping[str, object], rel: float, gen: torch.Generator) -> dict[str, object]:
    """Floating tensors (also inside lists/tuples) times (1 + rel·N(0, 1)) elementwise, in float64."""
    def perturb(value):
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            noise = (torch.randn(tuple(value.shape), generator=gen, dtype=torch.float64) * rel).to(value.device)
            return value.detach().to(torch.float64) * (1 + noise)
        if isinstance(value, (list, tuple)):
            return type(value)(perturb(v) for v in value)
        return value

    return {name: perturb(value) for name, value in inputs.items()}


def _leaves(inputs: Mapping[str, object], grad_names: list[str]) -> list[torch.Tensor]:
    def lookup(name):
        base, _, index = name.partition("[")
        value = inputs[base]
        return value[int(index[:-1])] if index else value

    return [lookup(n) for n in grad_names]


def _grads(outs, inputs: dict, grad_names: list[str], cotangents: list[torch.Tensor | None]):
    pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(grad_names)
    if pairs and grad_names:
        grads = list(torch.autograd.grad([o for o, _ in pairs], _leaves(inputs, grad_names),
                                         [c.to(o.dtype) for o, c in pairs], allow_unused=True))
    return grads


def _run(fn: Callable, inputs: dict, grad_names: list[str], cotangents: list[torch.Tensor | None]):
    outs = _as_tuple(fn(**inputs))
    return outs, _grads(outs, inputs, grad_names, cotangents)


@dataclass
class CheckReport:
    """Relative errors per compared quantity and the bounds used; ``failures`` is empty on success."""

    seed: int
    dtype: torch.dtype
    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [k for k, e in self.errors.items() if not e <= self.bounds[k]]

    def table(self) -> str:
        return "\n".join(f"  {k:<24} err {e:.3e}  bound {self.bounds[k]:.3e}  {'FAIL' if k in self.failures else 'ok'}"
                         for k, e in self.errors.items())


#: PyTorch runs on perturbed inputs that estimate its own error: for every 16-bit quantity, and for the
#: ``conditioned`` ones (see :func:`check_against_reference`).
_PERTURBED, _PERTURBED_CONDITIONED = 2, 8


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A gradient the op (or a run) did not return compares as zeros."""
    return value if value is not None else torch.zeros_like(like)


def check_against_reference(fn: Callable, reference: Callable, inputs: Mapping[str, object], *,
                            dtype: torch.dtype, grad: list[str] | None = None, tf32_dots: bool = False,
                            seed: int | None = None, output_names: list[str] | None = None,
                            conditioned: tuple[str, ...] = ()) -> CheckReport:
    """Compares ``fn(**inputs)`` in ``dtype`` with ``reference(**inputs)`` in float64, forward and gradients.

    ``inputs`` holds the random float tensors (any float dtype; the helper casts) and the other arguments.
    ``grad`` names the inputs whose gradients are compared (default: every floating tensor; list elements
    as ``"values[0]"``). Each output gets a fresh random cotangent. Raises AssertionError listing every
    quantity over its bound; returns the report otherwise.

    ``conditioned`` names quantities (as in the report: ``"out"``, ``"grad alpha"``) whose float32/float64
    bound is max(fixed bound, 2x PyTorch's own error in that dtype): for a scalar that sums many terms of
    random sign (the gradient of a learnable scalar), a draw where they nearly cancel makes even PyTorch miss
    the fixed bound, so the fixed bound alone would make the test fail at random. PyTorch's error on such a
    draw is itself partly luck, so for these quantities it is estimated on the inputs and on eight copies
    perturbed by one relative epsilon of ``dtype`` (each against the float64 reference of its own inputs and
    relative to this draw's norm, so that neither the perturbation nor a less cancelling copy counts; two
    copies, and the largest error, for the other quantities' 16-bit bounds), at least the error of the float64
    reference on the inputs rounded to ``dtype`` (which no implementation in ``dtype`` avoids). In float32 the
    bound takes the largest of these errors. In float16/bfloat16 the op runs on the perturbed copies too and
    the MEDIANS over the nine draws are compared, the op's against twice PyTorch's: on a cancelling draw both
    errors scatter by factors of several from copy to copy, so one draw of each says little (tpp_attention's
    float16 dW of 14 terms: over 300 draws the kernel's error was 0.5x PyTorch's in the median draw and up to
    2.6x on single ones). The floor there is 2 epsilons instead of one: such a sum of rounded terms scatters
    around one epsilon for any implementation.
    """
    seed = fresh_seed() if seed is None else seed
    gen = torch.Generator().manual_seed(seed)

    def floating_names(name, value):
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return [name]
        if isinstance(value, (list, tuple)):
            return [n for i, v in enumerate(value) for n in floating_names(f"{name}[{i}]", v)]
        return []

    grad_names = grad if grad is not None else [n for k, v in inputs.items() for n in floating_names(k, v)]
    grad_set = set(grad_names) | {n.partition("[")[0] for n in grad_names}

    ref_inputs = _cast(inputs, torch.float64, grad_set)
    ref_outs = _as_tuple(reference(**ref_inputs))
    cotangents = [randn(*o.shape, generator=gen, device=o.device) if o.is_floating_point() else None
                  for o in ref_outs]
    ref_grads = _grads(ref_outs, ref_inputs, grad_names, cotangents)

    with poison_outputs():
        outs, grads = _run(fn, _cast(inputs, dtype, grad_set), grad_names, cotangents)

    names = output_names or ([f"out{i}" for i in range(len(ref_outs))] if len(ref_outs) > 1 else ["out"])
    if len(outs) != len(ref_outs):
        raise AssertionError(f"op returned {len(outs)} outputs, reference {len(ref_outs)}")
    keys = names + [f"grad {n}" for n in grad_names]
    got = list(outs) + grads
    want = list(ref_outs) + ref_grads

    fixed = tolerance(dtype, tf32_dots=tf32_dots)
    if fixed is None or conditioned:  # PyTorch's own error in this dtype sets (or may widen) the bound
        base_outs, base_grads = _run(reference, _cast(inputs, dtype, grad_set), grad_names, cotangents)
        baseline = list(base_outs) + base_grads
    low_precision = fixed is None
    # PyTorch on perturbed inputs, each as (result, its float64 truth): the first _PERTURBED for every quantity,
    # all of them for the conditioned ones; in float16/bfloat16 the op runs on the conditioned ones' too
    perturbed_runs: list[tuple[list, list, list | None]] = []
    if conditioned or low_precision:
        for _ in range(_PERTURBED_CONDITIONED if conditioned else _PERTURBED):
            perturbed = _perturb(inputs, torch.finfo(dtype).eps, gen)
            in_dtype = _cast(perturbed, dtype, grad_set)
            outs_p, grads_p = _run(reference, in_dtype, grad_names, cotangents)
            truth_outs, truth_grads = _run(reference, _cast(perturbed, torch.float64, grad_set), grad_names,
                                           cotangents)
            op_run = None
            if conditioned and low_precision:
                with poison_outputs():
                    op_outs, op_grads = _run(fn, in_dtype, grad_names, cotangents)
                op_run = list(op_outs) + op_grads
            perturbed_runs.append((list(outs_p) + grads_p, list(truth_outs) + truth_grads, op_run))
        rounded = _cast(_cast(inputs, dtype, set()), torch.float64, grad_set)
        outs_r, grads_r = _run(reference, rounded, grad_names, cotangents)
        rounded_run = list(outs_r) + grads_r
    report = CheckReport(seed, dtype)
    for i, (key, g, w) in enumerate(zip(keys, got, want)):
        if w is None or not w.is_floating_point():
            if g is not None and w is None and key.startswith("grad") and g.abs().sum() != 0:
                raise AssertionError(f"{key}: op returned a nonzero gradient where the reference has none")
            continue
        report.errors[key] = rel_error(_or_zeros(g, w), w)
        if not (low_precision or key in conditioned):
            report.bounds[key] = fixed
            continue
        # errors relative to this quantity's norm on every draw: a perturbed draw of a sum that nearly cancels
        # here may cancel less, and its own norm would shrink its error
        runs = perturbed_runs if key in conditioned else perturbed_runs[:_PERTURBED]
        torch_errors = [rel_error(_or_zeros(baseline[i], w), w)] + [
            rel_error(_or_zeros(result[i], truth[i]), _or_zeros(truth[i], w), norm=w) for result, truth, _ in runs]
        rounding = rel_error(_or_zeros(rounded_run[i], w), w)  # of the inputs: no implementation in dtype avoids it
        if key in conditioned and low_precision:  # medians over the draws, for the op and for PyTorch
            op_errors = [report.errors[key]] + [
                rel_error(_or_zeros(op[i], truth[i]), _or_zeros(truth[i], w), norm=w) for _, truth, op in runs]
            report.errors[key] = statistics.median(op_errors)
            base = max(statistics.median(torch_errors), rounding)
        else:
            base = max(*torch_errors, rounding)
        floor = fixed if fixed is not None else _LOW_PRECISION_EPS[dtype] * (2 if key in conditioned else 1)
        report.bounds[key] = max(2 * base, floor)
    if report.failures:
        raise AssertionError(f"mismatch against the reference (dtype {dtype}, seed {seed}; "
                             f"rerun with {rerun_hint(seed)}):\n{report.table()}")
    return report



class OpNames(TorchDispatchMode):
    """Records the qualified name of every torch op dispatched inside the block ("aten.sort",
    "mtlfast.attention_fwd"): a dispatch mode that changes nothing, as a profiler or a tracer would sit there."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
