"""``tpp_attention``: BridgeNet's Task Pattern Propagation attention (DESIGN.md §3 op 2, paper eq. 1–2).

q (B, T, H, Nq, D), k (B, T, H, Nk, D), v (B, T, H, Nk, Dv); mix_weight (T, H, T·H) (per task, the
official code) or (H, T·H) (shared by all tasks); mix_bias (T, H) / (H,) or None. Channel c = t'·H + h:

    A_c = scale · q[:, t', h] k[:, t', h]ᵀ,   Ā[t, o] = Σ_c W[t, o, c] A_c + b[t, o],
    out[:, t, o] = softmax(Ā[t, o], -1) · v[:, t, o]                      -> (B, T, H, Nq, Dv)

The literal definition is :func:`mtlfast.reference.tpp_attention.tpp_attention`.

Backends: ``reference`` (any device, float16/bfloat16/float32/float64) and ``triton`` (CUDA in
float16/bfloat16/float32, CPU through the interpreter in float16/float32; T·H <= 16): one fused flash-style
kernel computes the T·H score tiles once per key block, mixes them in registers and runs an online softmax
per output map, saving only the logsumexp (B, T·H, Nq); see :mod:`mtlfast.kernels.tpp_attention`. The bias is constant along the
softmax axis, so it cancels: the kernels never read it and its gradient is exactly zero. A shared weight
is expanded to (T, H, T·H) before the kernel (its gradient is the sum over tasks, by autograd), and the
ops centre the keys of every (task, head) over the key axis on a transient copy (exact, see
:func:`mtlfast.ops.attention.center_keys`), so only the caller's k is kept for the backward.

The Triton path is two torch.library custom ops, ``mtlfast::tpp_attention_fwd`` and
``mtlfast::tpp_attention_bwd``, so it composes with torch.compile (plain eager calls run the same functions
without the dispatcher, :mod:`mtlfast.ops._kernel_op`). The launch configuration comes from
:func:`mtlfast.kernels.tpp_attention.current_config` (pinned with ``use_config`` in tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from mtlfast.backends import (FLOAT_DTYPES, GPU_DTYPES, Op, grid_axis_refusals, offset_refusals, slice_extent,
                              triton_unavailable)
from mtlfast.ops._checks import (autocast_inputs, check_floating_same_device_dtype, check_shapes, check_tensor,
                                 resolve_scale)
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function
from mtlfast.ops.attention import center_keys, center_keys_adjoint
from mtlfast.reference import tpp_attention as _reference

Tensor = torch.Tensor

_OP = Op("tpp_attention")


# --- the Triton path as custom ops ---------------------------------------------------------------------

def _fwd_fake(q, k, v, w, b, scale, config):
    B, T, H, Nq, _ = q.shape
    return q.new_empty(B, T, H, Nq, v.shape[-1]), q.new_empty(B, T * H, Nq, dtype=torch.float32)


@kernel_function("tpp_attention_fwd", fake=_fwd_fake)
def _fwd(q: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Optional[Tensor], scale: float,
         config: list[int]) -> tuple[Tensor, Tensor]:
    """w (T·H, T·H) rows t·H + o; b is not read (it cancels) -> (out, logsumexp (B, T·H, Nq) f32), computed on
    the centred keys (a transient copy: autograd keeps the caller's k)."""
    from mtlfast.kernels import tpp_attention as kernels

    return kernels.forward(q, center_keys(k), v, w, scale, kernels.Config(*config))


def _bwd_fake(do, q, k, v, w, out, lse, scale, config):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),  # contiguous, as the kernels write them
            w.new_empty(w.shape, dtype=torch.float32))


@kernel_function("tpp_attention_bwd", fake=_bwd_fake, refuse_grad="tpp_attention")
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, out: Tensor, lse: Tensor, scale: float,
         config: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dw (T·H, T·H) float32), dk for the caller's k (the centring's adjoint applied)."""
    from mtlfast.kernels import tpp_attention as kernels

    dq, dk, dv, dw = kernels.backward(do, q, center_keys(k), v, w, out, lse, scale, kernels.Config(*config))
    return dq, center_keys_adjoint(dk), dv, dw


def _setup_context(ctx, inputs, output):
    q, k, v, w, b, scale, config = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, w, out, lse)
    ctx.args = (scale, config, b is not None)


def _backward(ctx, g_out, _g_lse):
    q, k, v, w, out, lse = ctx.saved_tensors
    scale, config, has_bias = ctx.args
    g_out = torch.zeros_like(out) if g_out is None else g_out
    dq, dk, dv, dw = _bwd(g_out, q, k, v, w, out, lse, scale, config)
    # the bias is constant along the softmax axis: its gradient is exactly zero
    db = q.new_zeros(w.shape[0]) if has_bias else None
    return dq, dk, dv, dw.to(w.dtype), db, None, None


_tpp = KernelAutograd(_fwd, setup_context=_setup_context, backward=_backward)


def _triton(q, k, v, mix_weight, mix_bias, *, scale):
    from mtlfast.kernels.tpp_attention import current_config

    B, T, H, Nq, D = q.shape
    C = T * H
    w = mix_weight.expand(T, H, C).reshape(C, C)  # shared (H, T·H): the same rows for every task
    b = None if mix_bias is None else mix_bias.expand(T, H).reshape(C)
    out, _ = _tpp(q, k, v, w, b, scale, current_config(C, D, v.shape[-1], q.element_size()).as_list())
    return out


def _triton_limits(q, k, v, mix_weight, mix_bias, **kwargs) -> list[str]:
    from mtlfast.kernels.tpp_attention import MAX_CHANNELS

    C = q.shape[1] * q.shape[2]
    reasons = grid_axis_refusals("B", q.shape[0])
    if C > MAX_CHANNELS:
        reasons.append(f"T·H={C} score maps exceed the kernel's limit of {MAX_CHANNELS} (all of them are mixed in "
                       "registers)")
    (n_q, d), (n_k, d_v) = q.shape[3:], v.shape[3:]
    return reasons + offset_refusals("batch", q=slice_extent(q, 1), k=slice_extent(k, 1), v=slice_extent(v, 1),
                                     out=C * n_q * d_v, dq=C * n_q * d, dk=C * n_k * d, dv=C * n_k * d_v)


_OP.register("reference", _reference.tpp_attention, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("triton", _triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES, available=triton_unavailable,
             limits=_triton_limits)


# --- public function -----------------------------------------------------------------------------------

def tpp_attention(q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Tensor | None = None, *,
                  scale: float | None = None, backend: str | None = None) -> Tensor:
    """Task Pattern Propagation attention: T·H score maps mixed by a 1×1 conv, softmax, per-task values.

    Args:
        q: (B, T, H, Nq, D) queries of every task t and head h.
        k: (B, T, H, Nk, D) keys.
        v: (B, T, H, Nk, Dv) values; output map (t, o) attends over v[:, t, o].
        mix_weight: (T, H, T·H), one 1×1 conv per task (W[t, o, c], c = t'·H + h), or (H, T·H) shared.
        mix_bias: (T, H) or (H,) matching mix_weight, or None. It cancels in the softmax (zero gradient).
        scale: score scale; None means D ** -0.5.
        backend: see :mod:`mtlfast.backends`.

    Returns:
        (B, T, H, Nq, Dv). Under torch.autocast the inputs are cast to its dtype first (as attention).
    """
    q, k, v, mix_weight, mix_bias = autocast_inputs(q, k, v, mix_weight, mix_bias)
    sizes = check_shapes(q=(q, "B T H Nq D"), k=(k, "B T H Nk D"), v=(v, "B T H Nk Dv"))
    T, H = sizes["T"], sizes["H"]
    known = {"T": (T, "q"), "H": (H, "q"), "T·H": (T * H, "q")}
    check_tensor("mix_weight", mix_weight)
    if mix_weight.dim() == 3:
        check_shapes(known, mix_weight=(mix_weight, "T H T·H"))
        bias_spec = "T H"
    elif mix_weight.dim() == 2:
        check_shapes(known, mix_weight=(mix_weight, "H T·H"))
        bias_spec = "H"
    else:
        raise ValueError(f"mix_weight: expected shape (T, H, T·H) = ({T}, {H}, {T * H}) (per task) or "
                         f"(H, T·H) = ({H}, {T * H}) (shared), got {tuple(mix_weight.shape)}")
    if mix_bias is not None:
        check_shapes(known, mix_bias=(mix_bias, bias_spec))
    check_floating_same_device_dtype(q=q, k=k, v=v, mix_weight=mix_weight, mix_bias=mix_bias)
    for name, t, dims in (("q", q, "B T H Nq D"), ("k", k, "B T H Nk D"), ("v", v, "B T H Nk Dv")):
        if t.numel() == 0:
            raise ValueError(f"{name}: expected every size of ({', '.join(dims.split())}) >= 1, got {tuple(t.shape)}")
    scale = resolve_scale(scale, sizes["D"])
    args = (q, k, v, mix_weight, mix_bias)
    impl = _OP.select(backend, q.device, q.dtype, args, dict(scale=scale))
    return impl.fn(*args, scale=scale)
