"""``attention(q, k, v, *, scale=None, backend=None)``: softmax(scale · q kᵀ) v (DESIGN.md §3, op 1).

q (B, H, Nq, Dqk), k (B, H, Nk, Dqk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv); ``scale=None`` means
Dqk ** -0.5. Dqk and Dv are independent and unbounded (the Triton kernel loops over head-dim chunks;
see :mod:`mtlfast.kernels.attention`), Nq, Nk >= 1.

Backends: ``reference`` (:func:`mtlfast.reference.attention.attention`, any device, every float dtype)
and ``triton`` (flash-style forward and backward, CUDA in float16/bfloat16/float32, CPU through the
Triton interpreter in float16/float32). The Triton path is the torch.library op ``mtlfast::attention_fwd``
(outputs out and the float32 row logsumexp) with its backward ``mtlfast::attention_bwd``, registered with
fake (meta) implementations and autograd, so it composes with torch.compile; plain eager calls run the same
functions without the dispatcher (:mod:`mtlfast.ops._kernel_op`). Both functions centre the keys
(:func:`center_keys`, exact, for well-conditioned q/k gradients) on a transient copy. :func:`attention_triton`
is that path with explicit launch configurations, for benchmarks and tests; lthd_attention's custom ops call
the two kernel functions directly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mtlfast.backends import FLOAT_DTYPES, GPU_DTYPES, Op, triton_unavailable
from mtlfast.ops._checks import autocast_inputs, check_floating_same_device_dtype, check_shapes, resolve_scale
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function
from mtlfast.reference.attention import attention as _reference_attention

__all__ = ["attention", "attention_triton", "center_keys", "center_keys_adjoint"]

_OP = Op("attention")


def attention_kernels():
    from mtlfast.kernels import attention as kernels  # imports triton: only when a Triton path runs

    return kernels


def _blocks(values: Sequence[int]):
    return attention_kernels().Blocks.from_list(values) if values else None


def _attention_fwd_fake(q, k, v, scale, fwd_blocks, bwd_blocks):
    B, H, n_q, _ = q.shape
    return q.new_empty((B, H, n_q, v.shape[-1])), q.new_empty((B, H, n_q), dtype=torch.float32)


@kernel_function("attention_fwd", fake=_attention_fwd_fake)
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, fwd_blocks: list[int],
                   bwd_blocks: list[int]) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention on the centred keys (:func:`center_keys`, a transient copy: autograd keeps the
    caller's k). ``*_blocks``: a :class:`~mtlfast.kernels.attention.Blocks` as a list, [] = default;
    bwd_blocks is only kept for the backward."""
    return attention_kernels().attention_forward(q, center_keys(k), v, scale, _blocks(fwd_blocks))


def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale, bwd_blocks):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write them


@kernel_function("attention_bwd", fake=_attention_bwd_fake, refuse_grad="attention")
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   bwd_blocks: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for the caller's k: the kernels run on the centred keys again, then the centring's adjoint."""
    dq, dk, dv = attention_kernels().attention_backward(grad_out, q, center_keys(k), v, out, lse, scale,
                                                        _blocks(bwd_blocks))
    return dq, center_keys_adjoint(dk), dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, _, bwd_blocks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.bwd_blocks = scale, bwd_blocks
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.bwd_blocks)
    return dq, dk, dv, None, None, None


_attention = KernelAutograd(_attention_fwd, setup_context=_setup_context, backward=_backward)


def center_keys(k: Tensor) -> Tensor:
    """k − mean_j k_j over the key axis (dim −2), per batch and head: an exact reformulation for the kernels.

    softmax_j(s_ij) is unchanged when every row i is shifted by a constant: q_i·(k_j − k̄) = q_i·k_j − q_i·k̄
    (and for TPP's mixed maps, Σ_c W[o, c] q_ic·k̄_c is also constant along j). Why the kernels use it: the
    flash backward forms dS_ij = P_ij (dP_ij − δ_i) with δ_i = dO_i·O_i from the forward, so Σ_j dS_ij,
    exactly 0 in exact arithmetic, is only 0 up to the rounding of O and the logsumexp, and dq_i = Σ_j dS_ij k_j
    multiplies that residue by the keys' common component k̄. Keys with a large mean relative to their
    spread (LayerNorm'd pooled tokens times a bias-free projection, as in SEM's spatial-reduction attention)
    then get q/k gradients several times less accurate than PyTorch's softmax backward. With centred keys
    dq_i = Σ_j dS_ij (k_j − k̄) carries no such term, and autograd of this subtraction gives
    dk = dk_c − mean_j dk_c, which removes the same residue from Σ_j dk_j (mathematically 0). The proof that
    it changes nothing in exact arithmetic and the test it fixes are in tests/test_attention.py.

    The Triton ops centre inside their forward and backward (transient copies), so autograd keeps the
    caller's k and no centred copy of it: saved activations stay O(N) (TPP's 1/20-of-eager target).
    Exact for finite keys only: one infinite key component makes the mean infinite, so every output row of
    that (batch, head) becomes NaN on the Triton path (the reference: the rows whose scores it reaches)."""
    return k - k.mean(dim=-2, keepdim=True)


def center_keys_adjoint(grad_centred: Tensor) -> Tensor:
    """The gradient of k from that of center_keys(k): dk = dk_c − mean_j dk_c over the key axis (dim −2)."""
    return grad_centred - grad_centred.mean(dim=-2, keepdim=True)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float, fwd_blocks=None, bwd_blocks=None) -> Tensor:
    """The Triton path on already validated inputs (the ops centre the keys, :func:`center_keys`);
    ``*_blocks``: a ``Blocks`` (None = default)."""
    def as_list(blocks):
        return blocks.as_list() if blocks is not None else []

    out, _ = _attention(q, k, v, float(scale), as_list(fwd_blocks), as_list(bwd_blocks))
    return out


def _triton_limits(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> list[str]:
    return attention_kernels().grid_limits(q, k, v)


def _reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    return _reference_attention(q, k, v, scale=scale)


_OP.register("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("triton", attention_triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES,
             available=triton_unavailable, limits=_triton_limits)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> dict[str, int]:
    """Shape/dtype/device validation; returns the sizes (B, H, Nq, Nk, Dqk, Dv)."""
    sizes = check_shapes(q=(q, "B H Nq Dqk"), k=(k, "B H Nk Dqk"), v=(v, "B H Nk Dv"))
    check_floating_same_device_dtype(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() == 0:
            raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(t.shape)}")
    return sizes


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str | None = None) -> Tensor:
    """softmax(scale · q kᵀ, -1) v: q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv) -> (B,H,Nq,Dv).
    Under torch.autocast the inputs are cast to its dtype first (:func:`~mtlfast.ops._checks.autocast_inputs`)."""
    q, k, v = autocast_inputs(q, k, v)
    sizes = _check_inputs(q, k, v)
    scale = resolve_scale(scale, sizes["Dqk"])
    impl = _OP.select(backend, q.device, q.dtype, (q, k, v), {"scale": scale})
    return impl.fn(q, k, v, scale=scale)
