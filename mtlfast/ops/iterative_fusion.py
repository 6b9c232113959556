"""``mtlfast.ops.iterative_fusion``: the Iterative Fusion Block of the TPIM network (DESIGN.md §3, op 4).

    iterative_fusion(q, k, v, alpha, n_iter, *, scale=None, variant="C", mode="auto", backend=None)

q (B, N, D) target-task queries, k (B, N, D) source-task keys, v (B, N, C) source values, alpha a 0-d
tensor, n_iter >= 1. Co = softmax(scale·q kᵀ, -1); V⁰ = v; then n_iter times (paper eq. 6–8)
A: Vᵗ⁺¹ = Co Vᵗ;  B: Vᵗ⁺¹ = α Co Vᵗ + Vᵗ;  C: Vᵗ⁺¹ = α Co Vᵗ + (1 − α) Vᵗ. Returns Vⁿ (B, N, C).
B is meant to hold every task pair × batch of a TPIM layer, so one kernel launch per step serves all.

Backends: ``reference`` (literal PyTorch, mtlfast.reference.iterative_fusion, any float dtype, autograd
over the loop) and ``triton`` (kernels/iterative_fusion.py: float16/bfloat16/float32 on CUDA, float16/float32
on CPU through the Triton interpreter; D <= 256, any N, C;
forward and an explicit adjoint backward, registered as torch.library ops ``mtlfast::iterative_fusion_fwd``
/ ``mtlfast::iterative_fusion_bwd`` so the op composes with torch.compile; plain eager calls run the same
functions without the dispatcher, :mod:`mtlfast.ops._kernel_op`). Gradients flow to q, k, v and
alpha (alpha's gradient is None for variant A, which does not use it). alpha may have any floating dtype
(e.g. a float32 parameter next to bfloat16 activations) but must be on the device of q, k, v; its
gradient comes back in its own dtype.

``mode`` (triton backend; the reference ignores it after validating it):
- ``"materialize"``: Co (B, N, N) is written once per forward (and once more in the backward) and each step
  is a batched matmul Co·Vᵗ with the blend fused into its epilogue. Co is scratch, never saved.
- ``"recompute"``: no N×N buffer ever: each step re-forms its Co tiles from q, k and the saved row
  log-sum-exp (flash-style), and so does the backward. Costs 2·N²·D extra flops and N² exponentials per
  step; needed when B·N² does not fit (e.g. N = 16k).
- ``"auto"``: materialize when the Co buffer, B·N²·itemsize bytes, is at most a quarter of the free device
  memory (CUDA: ``torch.cuda.mem_get_info``; on CPU, and while torch.compile traces, a fixed 4 GiB is
  assumed free) and N² < 2³¹ (32-bit offsets within one batch element), else recompute. The rule is about
  memory only: which mode is faster at a given N is not measured yet (no GPU so far).
Both modes save only lse (B, N) and ⌈n/L⌉ − 1 checkpoints of Vᵗ (L = ⌈√n⌉) for the backward; see
kernels/iterative_fusion.py for the adjoint recursion and the memory accounting. The backward adds each key
block's part of dq with float atomics, so with more than one key block its last bits vary from run to run:
under ``torch.use_deterministic_algorithms(True)`` the triton backend refuses calls that need a gradient
(auto then takes the reference), as PyTorch does for its own such kernels.
"""
from __future__ import annotations

import torch

from mtlfast.backends import (FLOAT_DTYPES, GPU_DTYPES, Op, atomic_gradient_refusals, grid_axis_refusals,
                              triton_unavailable)
from mtlfast.ops._checks import (autocast_inputs, check_floating_same_device_dtype, check_positive_int, check_shapes,
                                 check_tensor, resolve_scale)
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function
from mtlfast.reference import iterative_fusion as _reference

VARIANTS = _reference.VARIANTS
MODES = ("materialize", "recompute", "auto")
_ASSUMED_FREE_BYTES = 4 * 2**30
_INT32 = 2**31

_OP = Op("iterative_fusion")


def _validate(q, k, v, alpha, n_iter, variant, mode) -> int:
    """Raises on bad input; returns n_iter as a Python int."""
    check_shapes(q=(q, "B N D"), k=(k, "B N D"), v=(v, "B N C"))
    check_floating_same_device_dtype(q=q, k=k, v=v)
    check_tensor("alpha", alpha)
    if alpha.dim() != 0:
        raise ValueError(f"alpha: expected a 0-d tensor (a scalar weight), got shape {tuple(alpha.shape)}")
    if not alpha.dtype.is_floating_point:
        raise TypeError(f"alpha: expected a floating-point tensor, got {str(alpha.dtype).replace('torch.', '')}")
    if alpha.device != q.device:
        raise ValueError(f"alpha: expected device {q.device} (as q), got {alpha.device}")
    for name, t in (("q", q), ("v", v)):
        if t.numel() == 0:
            raise ValueError(f"{name}: expected every size >= 1, got shape {tuple(t.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return check_positive_int("n_iter", n_iter)


def choose_materialize(mode: str, q: torch.Tensor) -> bool:
    """The ``mode`` rule of the module docstring: True = materialize Co."""
    if mode != "auto":
        return mode == "materialize"
    B, N = q.shape[0], q.shape[1]
    co_bytes = B * N * N * q.element_size()
    free = _ASSUMED_FREE_BYTES
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        free = torch.cuda.mem_get_info(q.device)[0]
    return N * N < _INT32 and co_bytes <= free // 4


# --- torch.library registration of the Triton path ----------------------------------------------------

def _fwd_fake(q, k, v, alpha, n_iter, scale, variant, materialize):
    from mtlfast.kernels.iterative_fusion import num_checkpoints

    B, N, _ = q.shape
    return (v.new_empty(v.shape), q.new_empty((B, N), dtype=torch.float32),
            v.new_empty((num_checkpoints(n_iter), B, N, v.shape[-1])))


@kernel_function("iterative_fusion_fwd", fake=_fwd_fake)
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, n_iter: int, scale: float,
         variant: str, materialize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mtlfast.kernels import iterative_fusion as kernels

    return kernels.forward(q, k, v, alpha, n_iter, scale, variant, materialize)


def _bwd_fake(grad_out, q, k, v, alpha, lse, ckpt, n_iter, scale, variant, materialize):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), alpha.new_empty(())


@kernel_function("iterative_fusion_bwd", fake=_bwd_fake, refuse_grad="iterative_fusion")
def _bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
         lse: torch.Tensor, ckpt: torch.Tensor, n_iter: int, scale: float, variant: str,
         materialize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mtlfast.kernels import iterative_fusion as kernels

    return kernels.backward(grad_out, q, k, v, alpha, lse, ckpt, n_iter, scale, variant, materialize)


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, n_iter, scale, variant, materialize = inputs
    _, lse, ckpt = output
    ctx.save_for_backward(q, k, v, alpha, lse, ckpt)
    ctx.config = (n_iter, scale, variant, materialize)


def _backward(ctx, grad_out, grad_lse, grad_ckpt):
    q, k, v, alpha, lse, ckpt = ctx.saved_tensors
    n_iter, scale, variant, materialize = ctx.config
    dq, dk, dv, dalpha = _bwd(grad_out, q, k, v, alpha, lse, ckpt, n_iter, scale, variant, materialize)
    return dq, dk, dv, (None if variant == "A" else dalpha), None, None, None, None


_fusion = KernelAutograd(_fwd, setup_context=_setup_context, backward=_backward)


# --- implementations ----------------------------------------------------------------------------------

def _triton(q, k, v, alpha, n_iter, *, scale, variant, mode):
    if variant == "A":  # α is unused: no gradient path (the output must not require grad through it)
        alpha = alpha.detach()
    return _fusion(q, k, v, alpha, n_iter, scale, variant, choose_materialize(mode, q))[0]


def _triton_limits(q, k, v, alpha, n_iter, *, scale, variant, mode) -> list[str]:
    from mtlfast.kernels.iterative_fusion import MAX_HEAD_DIM, segment_length  # triton is importable here

    B, N, D = q.shape
    C = v.shape[-1]
    reasons = []
    if D > MAX_HEAD_DIM:
        reasons.append(f"q/k width D={D} > {MAX_HEAD_DIM} (the kernels hold a whole q/k row in registers)")
    reasons += grid_axis_refusals("B", B)
    reasons += atomic_gradient_refusals((q, k, v, alpha), "its dq sums the key blocks' parts with float atomics",
                                        "the reference backend is deterministic")
    if mode == "materialize" and N * N >= _INT32:
        reasons.append(f"N*N = {N * N} >= 2**31: Co of one batch element needs 64-bit offsets; use mode='recompute'")
    if N * (segment_length(n_iter) + 1) * C >= _INT32:
        reasons.append(f"N*(L+1)*C = {N * (segment_length(n_iter) + 1) * C} >= 2**31 (the backward's per-segment "
                       f"buffers of one batch element need 64-bit offsets)")
    return reasons


def _reference_impl(q, k, v, alpha, n_iter, *, scale, variant, mode):
    return _reference.iterative_fusion(q, k, v, alpha, n_iter, scale=scale, variant=variant)


_OP.register("reference", _reference_impl, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("triton", _triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES, available=triton_unavailable,
             limits=_triton_limits)


def iterative_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, n_iter: int, *,
                     scale: float | None = None, variant: str = "C", mode: str = "auto",
                     backend: str | None = None) -> torch.Tensor:
    """Vⁿ of the Iterative Fusion Block (module docstring): (B, N, C). Under torch.autocast q, k, v are cast to
    its dtype first (as attention); α keeps its own."""
    q, k, v = autocast_inputs(q, k, v)
    n_iter = _validate(q, k, v, alpha, n_iter, variant, mode)
    scale = resolve_scale(scale, q.shape[-1])
    impl = _OP.select(backend, q.device, q.dtype, (q, k, v, alpha, n_iter),
                      dict(scale=scale, variant=variant, mode=mode))
    return impl.fn(q, k, v, alpha, n_iter, scale=scale, variant=variant, mode=mode)
