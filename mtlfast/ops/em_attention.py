"""``em_attention``: EM attention bases (DESIGN.md §3 op 5; SEM eq. 8-10 inter-task module, EMANet iteration).

x (B, N, C), mu (B, K, C) -> (x_rec (B, N, C), mu_out (B, K, C), z (B, N, K)). n_iter times (SEM's R):
z = softmax(x muᵀ / tau, over K); zn = z / (eps + Σ_N z); mu = l2normalize(znᵀ x) with
l2normalize(m) = m / (eps + ‖m‖₂) over C (EMANet's). Then x_rec = z mu with the last z and the last mu.
With ``detach_iterations=True`` the iterations carry no gradient and one more E step from the final bases
does: z = softmax(x mu_outᵀ / tau), x_rec = z mu_out; mu_out is returned detached and ``mu`` gets no
gradient. The literal definition is :func:`mtlfast.reference.em_attention.em_attention`.

Backends: ``reference`` (any device, float16/bfloat16/float32/float64) and ``triton`` (CUDA in
float16/bfloat16/float32, CPU through the interpreter in float16/float32; K <= 256): one pass over x per
iteration with E and M steps fused, z never stored; the backward recomputes each iteration's z from the saved per-iteration bases
(float32, (n_iter + 1) x K x C per batch element) instead of saving (B, N, K) per iteration. See
:mod:`mtlfast.kernels.em_attention` for the kernels and the adjoint formulas.

The Triton path is two torch.library custom ops, ``mtlfast::em_attention_fwd`` and its backward
(``mtlfast::em_attention_bwd`` / ``mtlfast::em_attention_bwd_detached``), so it composes with torch.compile;
plain eager calls run the same functions without the dispatcher (:mod:`mtlfast.ops._kernel_op`).
"""
from __future__ import annotations

import torch

from mtlfast.backends import FLOAT_DTYPES, GPU_DTYPES, Op, grid_axis_refusals, offset_refusals, triton_unavailable
from mtlfast.ops._checks import (autocast_inputs, check_floating_same_device_dtype, check_positive_float,
                                 check_positive_int, check_shapes)
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function
from mtlfast.reference import em_attention as _reference

Tensor = torch.Tensor

_OP = Op("em_attention")


# --- the Triton path as custom ops ---------------------------------------------------------------------

def _fwd_fake(x, mu, n_iter, tau, eps, detach_iterations):
    B, N, C = x.shape
    K = mu.shape[1]
    return (x.new_empty(B, N, C), mu.new_empty(B, K, C), x.new_empty(B, N, K),
            x.new_empty(B, n_iter + 1, K, C, dtype=torch.float32), x.new_empty(B, n_iter, 2, K, dtype=torch.float32))


@kernel_function("em_attention_fwd", fake=_fwd_fake)
def _fwd(x: Tensor, mu: Tensor, n_iter: int, tau: float, eps: float,
         detach_iterations: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (x_rec, mu_out, z, bases (B, n_iter+1, K, C) f32, stats (B, n_iter, 2, K) f32)."""
    from mtlfast.kernels import em_attention as kernels

    return kernels.forward(x, mu, n_iter, tau, eps, detach_iterations)


def _bwd_fake(g_xrec, g_mu, g_z, x, bases, stats, n_iter, tau, eps):
    return x.new_empty(x.shape), g_mu.new_empty(g_mu.shape)  # contiguous, as the kernels write them


@kernel_function("em_attention_bwd", fake=_bwd_fake, refuse_grad="em_attention")
def _bwd(g_xrec: Tensor, g_mu: Tensor, g_z: Tensor, x: Tensor, bases: Tensor, stats: Tensor, n_iter: int,
         tau: float, eps: float) -> tuple[Tensor, Tensor]:
    """Full unrolled backward -> (dx, dmu)."""
    from mtlfast.kernels import em_attention as kernels

    return kernels.backward(g_xrec, g_mu, g_z, x, bases, stats, n_iter, tau, eps)


def _bwd_detached_fake(g_xrec, g_z, x, bases, tau):
    return x.new_empty(x.shape)


@kernel_function("em_attention_bwd_detached", fake=_bwd_detached_fake, refuse_grad="em_attention")
def _bwd_detached(g_xrec: Tensor, g_z: Tensor, x: Tensor, bases: Tensor, tau: float) -> Tensor:
    """detach_iterations=True: gradient of the last E step and x_rec to x -> dx."""
    from mtlfast.kernels import em_attention as kernels

    return kernels.backward_detached(g_xrec, g_z, x, bases, tau)


def _setup_context(ctx, inputs, output):
    x, mu, n_iter, tau, eps, detach_iterations = inputs
    _, _, _, bases, stats = output
    ctx.mark_non_differentiable(bases, stats)
    ctx.save_for_backward(x, bases, stats)
    ctx.args = (n_iter, tau, eps, detach_iterations)


def _backward(ctx, g_xrec, g_mu, g_z, _g_bases, _g_stats):
    x, bases, stats = ctx.saved_tensors
    n_iter, tau, eps, detach_iterations = ctx.args
    B, N, C = x.shape
    K = bases.shape[2]
    g_xrec = torch.zeros_like(x) if g_xrec is None else g_xrec
    g_z = x.new_zeros(B, N, K) if g_z is None else g_z
    if detach_iterations:  # mu_out is returned detached: its cotangent is not part of the graph
        return _bwd_detached(g_xrec, g_z, x, bases, tau), None, None, None, None, None
    g_mu = x.new_zeros(B, K, C) if g_mu is None else g_mu
    dx, dmu = _bwd(g_xrec, g_mu, g_z, x, bases, stats, n_iter, tau, eps)
    return dx, dmu, None, None, None, None


_em = KernelAutograd(_fwd, setup_context=_setup_context, backward=_backward)


def _triton(x, mu, n_iter, *, tau, eps, detach_iterations):
    if detach_iterations:  # the initial bases enter only through the detached iterations: no gradient path
        mu = mu.detach()
    x_rec, mu_out, z, _, _ = _em(x, mu, n_iter, tau, eps, detach_iterations)
    return x_rec, (mu_out.detach() if detach_iterations else mu_out), z


def _triton_limits(x, mu, n_iter, **kwargs) -> list[str]:
    from mtlfast.kernels.em_attention import MAX_K

    K = mu.shape[1]
    reasons = grid_axis_refusals("B", x.shape[0])
    if K > MAX_K:
        reasons.append(f"K={K} bases exceed the kernel's limit of {MAX_K} (the logits tile is held in registers)")
    n, c = x.shape[1:]
    return reasons + offset_refusals("batch", x=n * c, z=n * K)  # x and the gradients are made contiguous


_OP.register("reference", _reference.em_attention, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("triton", _triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES, available=triton_unavailable,
             limits=_triton_limits)


# --- public function -----------------------------------------------------------------------------------

def em_attention(x: Tensor, mu: Tensor, n_iter: int, *, tau: float = 1.0, eps: float = 1e-6,
                 detach_iterations: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """EM attention: n_iter E/M iterations of bases mu over tokens x, then the reconstruction.

    Args:
        x: (B, N, C) tokens.
        mu: (B, K, C) initial bases (SEM: the shared EMA bases of :class:`mtlfast.nn.em_bases.EMBases`,
            expanded over the batch). K > N is allowed.
        n_iter: iterations R >= 1 (SEM uses 5, EMANet 3).
        tau: softmax temperature (> 0) of the E step (SEM eq. 8).
        eps: added to Σ_N z and to ‖m‖ in the M step (>= 0), as in EMANet.
        detach_iterations: run the iterations without gradient and differentiate one extra E step only.
        backend: see :mod:`mtlfast.backends`.

    Returns:
        x_rec (B, N, C) = z mu_out, mu_out (B, K, C) the final bases, z (B, N, K) the responsibilities used
        in x_rec (the last iteration's, or the extra E step's with ``detach_iterations``). Under torch.autocast
        x and mu are cast to its dtype first (as attention).
    """
    x, mu = autocast_inputs(x, mu)
    check_shapes(x=(x, "B N C"), mu=(mu, "B K C"))
    check_floating_same_device_dtype(x=x, mu=mu)
    for name, t, dims in (("x", x, "B N C"), ("mu", mu, "B K C")):
        if t.numel() == 0:
            raise ValueError(f"{name}: expected every size of ({', '.join(dims.split())}) >= 1, got {tuple(t.shape)}")
    n_iter = check_positive_int("n_iter", n_iter)
    tau = check_positive_float("tau", tau)
    eps = check_positive_float("eps", eps, allow_zero=True)
    if not isinstance(detach_iterations, bool):
        raise TypeError(f"detach_iterations: expected a bool, got {type(detach_iterations).__name__}")
    kwargs = dict(tau=tau, eps=eps, detach_iterations=detach_iterations)
    impl = _OP.select(backend, x.device, x.dtype, (x, mu, n_iter), kwargs)
    return impl.fn(x, mu, n_iter, **kwargs)
