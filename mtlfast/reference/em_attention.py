"""Literal definition of ``em_attention``: EM attention bases (SEM eq. 8-9, the EMANet iteration).

Shapes: x (B, N, C) tokens, mu (B, K, C) initial bases. For r = 1..n_iter (SEM's R):

- E step (eq. 8):  z = softmax(x muᵀ / tau, over K)                       (B, N, K)
- M step (eq. 9):  zn = z / (eps + Σ_N z);  mu = l2normalize(znᵀ x)        (B, K, C)

with l2normalize(m) = m / (eps + ‖m‖₂) row-wise over C, exactly as EMANet's ``_l2norm`` (the same eps as
the column-sum normaliser). Eq. 9 writes the M step without the l2 normalisation and without eps; both
are EMANet's, which SEM builds on (its ref. [16]), and DESIGN.md §3 fixes them.

Outputs (x_rec, mu_out, z):

- ``detach_iterations=False``: z = the last E step's z (computed from the bases of iteration R-1),
  mu_out = the bases after the last M step, x_rec = z mu_out (SEM's X̃ = A⁽ᴿ⁾ μ⁽ᴿ⁾). The gradient
  flows through every iteration.
- ``detach_iterations=True`` (DESIGN.md §3; a truncated gradient): the n_iter iterations run without gradient,
  as EMANet's loop, then one more E step with gradient from the detached final bases: z = softmax(x mu_outᵀ /
  tau), x_rec = z mu_out. So z is A⁽ᴿ⁺¹⁾, not A⁽ᴿ⁾: a different forward (EMANet itself reconstructs from its
  loop's last z without any gradient). mu_out is the detached final bases (no gradient, also not to ``mu``); z
  and x_rec differentiate with respect to x only.
"""
from __future__ import annotations

import torch


def _e_step(x: torch.Tensor, mu: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.softmax(torch.bmm(x, mu.transpose(1, 2)) / tau, dim=-1)


def _m_step(x: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    zn = z / (eps + z.sum(dim=1, keepdim=True))
    m = torch.bmm(zn.transpose(1, 2), x)
    return m / (eps + torch.linalg.vector_norm(m, dim=-1, keepdim=True))


def em_attention(x: torch.Tensor, mu: torch.Tensor, n_iter: int, *, tau: float = 1.0, eps: float = 1e-6,
                 detach_iterations: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B,N,C), mu (B,K,C) -> (x_rec (B,N,C), mu_out (B,K,C), z (B,N,K)); see the module docstring."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_iterations):
        for _ in range(n_iter):
            z = _e_step(x, mu, tau)
            mu = _m_step(x, z, eps)
    if detach_iterations:
        mu = mu.detach()
        z = _e_step(x, mu, tau)
    return torch.bmm(z, mu), mu, z
