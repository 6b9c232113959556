"""Literal reference of the Iterative Fusion Block (IFB) of the TPIM network (DESIGN.md §3, op 4).

Shapes: q (B, N, D) target-task queries, k (B, N, D) source-task keys, v (B, N, C) source-task values,
alpha a 0-d tensor (the learnable weight), n_iter >= 1. Returns Vⁿ (B, N, C).

    Co  = softmax(scale · q kᵀ, dim=-1)                      (B, N, N), paper eq. 2
    V⁰  = v
    A:  Vᵗ⁺¹ = Co Vᵗ                                          paper eq. 6
    B:  Vᵗ⁺¹ = α Co Vᵗ + Vᵗ                                   paper eq. 7
    C:  Vᵗ⁺¹ = α Co Vᵗ + (1 − α) Vᵗ                           paper eq. 8

The paper writes Co = softmax(Kᵀ Q / √d) without naming the softmax axis; DESIGN.md fixes it: rows are
the target tokens (queries), the softmax runs over the source tokens (keys), so each row of Co is a
probability distribution and Co Vᵗ averages source values. ``scale=None`` means D ** -0.5 (the paper's
1/√d). Variant A ignores alpha (its gradient is None here).
"""
from __future__ import annotations

import torch

VARIANTS = ("A", "B", "C")


def iterative_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, n_iter: int, *,
                     scale: float | None = None, variant: str = "C") -> torch.Tensor:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    co = torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1)
    alpha = alpha.to(torch.promote_types(alpha.dtype, v.dtype))  # 1 - α in the wider of the two dtypes
    out = v
    for _ in range(n_iter):
        if variant == "A":
            out = co @ out
        elif variant == "B":
            out = alpha * (co @ out) + out
        else:
            out = alpha * (co @ out) + (1 - alpha) * out
    return out
