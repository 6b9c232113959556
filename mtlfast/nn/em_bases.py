"""SEM's shared initial EM bases mu⁽⁰⁾ with their exponential-moving-average update (SEM §3.3, EMANet).

SEM runs the EM iteration (:func:`mtlfast.ops.em_attention`) for every task from one shared mu⁽⁰⁾, fuses
the task bases (eq. 10: μ⁽ᴿ⁾ = mean over tasks of (μᵗ)⁽ᴿ⁾) and feeds the result back into mu⁽⁰⁾ for the
next batch with an EMA, in training only; "the learned μ⁽⁰⁾ remains constant during the inference".
SEM's text gives the update as μ⁽⁰⁾ = α μ⁽⁰⁾ + (1 − α) μ̄ with μ̄ the batch mean and cites EMANet for it;
the details it leaves open follow EMANet's public implementation:

- init: mu⁽⁰⁾ ~ N(0, sqrt(2 / K)) elementwise (std sqrt(2/K)), then each of the K rows l2-normalised over
  C as m / (eps + ‖m‖₂);
- update(μ): μ̄ = mean of μ over every leading dimension (batch, and tasks if not fused yet), then
  mu⁽⁰⁾ ← momentum · mu⁽⁰⁾ + (1 − momentum) · μ̄ in place (momentum = SEM's α, default 0.9). Neither μ̄ nor the
  blend is re-normalised, as in EMANet's training loop (the mean of unit rows has norm <= 1, so mu⁽⁰⁾'s rows may
  shrink; the first M-step normalises again).
  The update runs under ``torch.no_grad`` (μ's graph is untouched) and does nothing in eval mode.
- mu⁽⁰⁾ is a buffer, not a parameter: it gets no gradient, it is saved in the state dict, and under DDP
  (``broadcast_buffers=True``, the default) rank 0's copy is broadcast at every forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _l2normalize(m: torch.Tensor, eps: float) -> torch.Tensor:
    return m / (eps + torch.linalg.vector_norm(m, dim=-1, keepdim=True))


class EMBases(nn.Module):
    """Shared initial bases ``mu`` (K, C) (a float32 buffer) with an EMA update in training.

    >>> bases = EMBases(64, 512)
    >>> x_rec, mu_out, z = mtlfast.ops.em_attention(x, bases(x.shape[0]), 5)
    >>> bases.update(mu_out)   # no-op in eval mode
    """

    mu: torch.Tensor

    def __init__(self, num_bases: int, channels: int, *, momentum: float = 0.9, eps: float = 1e-6,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_bases < 1 or channels < 1:
            raise ValueError(f"EMBases: expected num_bases >= 1 and channels >= 1, got {num_bases}, {channels}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        mu = torch.randn(num_bases, channels, generator=generator) * math.sqrt(2.0 / num_bases)
        self.register_buffer("mu", _l2normalize(mu, self.eps))

    def forward(self, batch_size: int) -> torch.Tensor:
        """mu⁽⁰⁾ repeated over the batch, (batch_size, K, C): a copy, so a later in-place :meth:`update`
        cannot invalidate tensors autograd saved from it."""
        return self.mu.unsqueeze(0).repeat(batch_size, 1, 1)

    @torch.no_grad()
    def update(self, mu_new: torch.Tensor) -> None:
        """mu⁽⁰⁾ ← momentum · mu⁽⁰⁾ + (1 − momentum) · (mean of mu_new (..., K, C) over its leading dims).

        Training mode only; in eval mode mu⁽⁰⁾ is left unchanged."""
        if not self.training:
            return
        if mu_new.dim() < 2 or tuple(mu_new.shape[-2:]) != tuple(self.mu.shape):
            raise ValueError(f"mu_new: expected shape (..., {self.mu.shape[0]}, {self.mu.shape[1]}), "
                             f"got {tuple(mu_new.shape)}")
        mean = mu_new.detach().to(device=self.mu.device, dtype=self.mu.dtype).reshape(-1, *self.mu.shape).mean(dim=0)
        self.mu.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"num_bases={self.mu.shape[0]}, channels={self.mu.shape[1]}, momentum={self.momentum}"
