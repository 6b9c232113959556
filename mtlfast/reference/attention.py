"""Literal definition of scaled dot-product attention (DESIGN.md §3, op 1).

    out = softmax(scale · q kᵀ, dim=-1) v

q (B, H, Nq, Dqk), k (B, H, Nk, Dqk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv); ``scale=None`` means
Dqk ** -0.5. The full (B, H, Nq, Nk) score map is formed: this is the definition, not a fast path.
"""
from __future__ import annotations

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = scale * (q @ k.transpose(-2, -1))
    return torch.softmax(scores, dim=-1) @ v
