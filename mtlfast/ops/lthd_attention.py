"""``lthd_attention``: TIF's Low-To-High Diffusion attention (DESIGN.md §3, op 3; TIF eq. 11–12).

    A = scale · q_f k_fᵀ + Up(scale · q_c k_cᵀ),   out = softmax(A, -1) v

q_fine, k_fine (B, Nf, D) on the grid size_fine = (hf, wf), Nf = hf·wf (row-major tokens);
q_coarse, k_coarse (B, Nc, D) on size_coarse = (hc, wc); v (B, Nf, C) -> (B, Nf, C). ``scale=None``
means D ** -0.5, applied to both terms. Up = bilinear resize (align_corners=False) of the (hc,wc,hc,wc)
score map to (hf,wf,hf,wf) along the query grid and the key grid; the literal definition is
:func:`mtlfast.reference.lthd_attention.lthd_attention`.

Kernel path (exact rewrite, never forming Up(A) or any Nf × Nf map): Up acts on each axis through one
linear map U (Nf × Nc, the bilinear weights), so Up(q_c k_cᵀ) = U q_c (U k_c)ᵀ = up(q_c) up(k_c)ᵀ where
up resizes the coarse tokens as a (B, D, hc, wc) image with the same F.interpolate. Hence

    A = scale · [q_f | up(q_c)] [k_f | up(k_c)]ᵀ,

one attention with query/key width 2D whose scale is the given ``scale`` (not (2D) ** -0.5). The widened
q and k are transient: the forward forms them for the attention kernel and the backward forms them again
(two resizes and concatenations), so autograd keeps only the inputs, the output and its row logsumexp
(B, Nf) for the backward, O(Nf · C) besides the inputs (keeping the widened pair would cost 4·B·Nf·D: at
D = 384 on a 28 x 36 grid, more than eager's Nf × Nf maps). Gradients reach the coarse tokens through the adjoint
of the resize (aten's upsample_bilinear2d_backward, what F.interpolate's autograd runs).

The Triton path is a torch.library custom op pair, ``mtlfast::lthd_attention_fwd`` / ``_bwd``, around the
attention kernels (:mod:`mtlfast.ops._kernel_op`), so it composes with torch.compile as one node.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlfast.backends import FLOAT_DTYPES, GPU_DTYPES, Op, triton_unavailable
from mtlfast.ops._checks import (autocast_inputs, check_floating_same_device_dtype, check_positive_int, check_shapes,
                                 resolve_scale)
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function
from mtlfast.ops.attention import _attention_bwd, _attention_fwd, attention_kernels
from mtlfast.reference.lthd_attention import lthd_attention as _reference_lthd

__all__ = ["lthd_attention", "upsample_tokens", "widened_qk"]

_OP = Op("lthd_attention")


def upsample_tokens(x: Tensor, size_coarse: tuple[int, int], size_fine: tuple[int, int]) -> Tensor:
    """up: tokens (B, Nc, D) of the grid size_coarse resized as an image to size_fine -> (B, Nf, D)."""
    B, _, D = x.shape
    image = x.transpose(1, 2).reshape(B, D, *size_coarse)
    resized = F.interpolate(image, size=tuple(size_fine), mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2)


def widened_qk(q_fine: Tensor, k_fine: Tensor, q_coarse: Tensor, k_coarse: Tensor,
               size_fine: tuple[int, int], size_coarse: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """([q_f | up(q_c)], [k_f | up(k_c)]), each (B, Nf, 2D): their product is q_f k_fᵀ + Up(q_c k_cᵀ)."""
    q = torch.cat([q_fine, upsample_tokens(q_coarse, size_coarse, size_fine)], dim=-1)
    k = torch.cat([k_fine, upsample_tokens(k_coarse, size_coarse, size_fine)], dim=-1)
    return q, k


def upsample_tokens_adjoint(grad: Tensor, size_coarse: tuple[int, int], size_fine: tuple[int, int]) -> Tensor:
    """The adjoint of :func:`upsample_tokens`: (B, Nf, D) gradient of up(x) -> (B, Nc, D) gradient of x."""
    B, _, D = grad.shape
    image = grad.transpose(1, 2).reshape(B, D, *size_fine)
    coarse = torch.ops.aten.upsample_bilinear2d_backward(image, list(size_fine), [B, D, *size_coarse], False,
                                                         None, None)
    return coarse.flatten(2).transpose(1, 2)


# --- the Triton path as custom ops: the widened q/k are formed in the forward and again in the backward -----------

def _lthd_fwd_fake(q_fine, k_fine, q_coarse, k_coarse, v, size_fine, size_coarse, scale):
    B, n_f, _ = q_fine.shape
    return q_fine.new_empty((B, n_f, v.shape[-1])), q_fine.new_empty((B, n_f), dtype=torch.float32)


@kernel_function("lthd_attention_fwd", fake=_lthd_fwd_fake)
def _lthd_fwd(q_fine: Tensor, k_fine: Tensor, q_coarse: Tensor, k_coarse: Tensor, v: Tensor, size_fine: list[int],
              size_coarse: list[int], scale: float) -> tuple[Tensor, Tensor]:
    """-> (out (B, Nf, C), logsumexp (B, Nf) f32) of the widened attention."""
    q, k = widened_qk(q_fine, k_fine, q_coarse, k_coarse, size_fine, size_coarse)
    out, lse = _attention_fwd.fn(q[:, None], k[:, None], v[:, None], scale, [], [])
    return out[:, 0], lse[:, 0]


def _lthd_bwd_fake(grad_out, q_fine, k_fine, q_coarse, k_coarse, v, out, lse, size_fine, size_coarse, scale):
    return tuple(t.new_empty(t.shape) for t in (q_fine, k_fine, q_coarse, k_coarse, v))  # contiguous, as returned


@kernel_function("lthd_attention_bwd", fake=_lthd_bwd_fake, refuse_grad="lthd_attention")
def _lthd_bwd(grad_out: Tensor, q_fine: Tensor, k_fine: Tensor, q_coarse: Tensor, k_coarse: Tensor, v: Tensor,
              out: Tensor, lse: Tensor, size_fine: list[int], size_coarse: list[int],
              scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq_fine, dk_fine, dq_coarse, dk_coarse, dv): the widened attention's backward split back."""
    q, k = widened_qk(q_fine, k_fine, q_coarse, k_coarse, size_fine, size_coarse)
    dq, dk, dv = _attention_bwd.fn(grad_out[:, None], q[:, None], k[:, None], v[:, None], out[:, None],
                                   lse[:, None], scale, [])
    D = q_fine.shape[-1]
    dq, dk = dq[:, 0], dk[:, 0]
    grads = (dq[..., :D], dk[..., :D], upsample_tokens_adjoint(dq[..., D:], size_coarse, size_fine),
             upsample_tokens_adjoint(dk[..., D:], size_coarse, size_fine), dv[:, 0])
    return tuple(g.contiguous() for g in grads)  # the layout the fake implementation gives


def _setup_context(ctx, inputs, output) -> None:
    *tensors, size_fine, size_coarse, scale = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.args = (size_fine, size_coarse, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    return (*_lthd_bwd(grad_out, *ctx.saved_tensors, *ctx.args), None, None, None)


_lthd = KernelAutograd(_lthd_fwd, setup_context=_setup_context, backward=_backward)


def _triton(q_fine, k_fine, q_coarse, k_coarse, v, *, size_fine, size_coarse, scale):
    return _lthd(q_fine, k_fine, q_coarse, k_coarse, v, list(size_fine), list(size_coarse), float(scale))[0]


def _triton_lthd_limits(q_fine, k_fine, q_coarse, k_coarse, v, *, size_fine, size_coarse, scale):
    B, n_f, D = q_fine.shape
    wide = torch.empty((B, 1, n_f, 2 * D), device="meta")  # shape and strides of the widened q and k
    return attention_kernels().grid_limits(wide, wide, v[:, None])


def _reference(q_fine, k_fine, q_coarse, k_coarse, v, *, size_fine, size_coarse, scale):
    return _reference_lthd(q_fine, k_fine, q_coarse, k_coarse, v, size_fine, size_coarse, scale=scale)


_OP.register("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("triton", _triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES,
             available=triton_unavailable, limits=_triton_lthd_limits)


def _check_grid(name: str, size, n_tokens: int, tokens_from: str) -> tuple[int, int]:
    """(height, width): a tuple/list/torch.Size of two integers >= 1 (Python or numpy: ``operator.index``)."""
    try:
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError
        h, w = (check_positive_int(name, s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width), two integers >= 1, got {size!r}") from None
    if h * w != n_tokens:
        raise ValueError(f"{name}: the grid {h}x{w} has {h * w} tokens, but {tokens_from} has {n_tokens}")
    return h, w


def lthd_attention(q_fine: Tensor, k_fine: Tensor, q_coarse: Tensor, k_coarse: Tensor, v: Tensor,
                   size_fine, size_coarse, *, scale: float | None = None, backend: str | None = None) -> Tensor:
    """softmax(scale·q_f k_fᵀ + Up(scale·q_c k_cᵀ), -1) v -> (B, Nf, C); see the module docstring. Under
    torch.autocast the inputs are cast to its dtype first (as attention)."""
    q_fine, k_fine, q_coarse, k_coarse, v = autocast_inputs(q_fine, k_fine, q_coarse, k_coarse, v)
    sizes = check_shapes(q_fine=(q_fine, "B Nf D"), k_fine=(k_fine, "B Nf D"), q_coarse=(q_coarse, "B Nc D"),
                         k_coarse=(k_coarse, "B Nc D"), v=(v, "B Nf C"))
    tensors = dict(q_fine=q_fine, k_fine=k_fine, q_coarse=q_coarse, k_coarse=k_coarse, v=v)
    check_floating_same_device_dtype(**tensors)
    for name, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(t.shape)}")
    size_fine = _check_grid("size_fine", size_fine, sizes["Nf"], "q_fine (dim 1)")
    size_coarse = _check_grid("size_coarse", size_coarse, sizes["Nc"], "q_coarse (dim 1)")
    scale = resolve_scale(scale, sizes["D"])
    args = (q_fine, k_fine, q_coarse, k_coarse, v)
    kwargs = dict(size_fine=size_fine, size_coarse=size_coarse, scale=scale)
    impl = _OP.select(backend, q_fine.device, q_fine.dtype, args, kwargs)
    return impl.fn(*args, **kwargs)
