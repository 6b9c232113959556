"""Literal definition of ``deform_sample``: hierarchy-adaptive deformed sampling (SEM eq. 1-4, DESIGN.md §3 op 6).

Shapes: values a sequence of S stage features (B, C, H_s, W_s) (sizes may differ per stage), points (B, N, 2)
normalised (x, y) (x along W, y along H; [-1, 1] spans the image, points outside are allowed), weights
(B, N, S) per-point stage weights (SEM's hierarchical weights W, eq. 3, after its softmax):

    out[b, n, :] = Σ_s weights[b, n, s] · φ(values[s][b]; points[b, n])        -> (B, N, C)

φ is the paper's differentiable bilinear interpolation (eq. 2), taken exactly as
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` as in DAT, which SEM follows:
pixel centres at ((2i + 1) / W_s - 1), corners outside the image read zero. The weighted sum over stages is
SEM's ⊗ (eq. 4), before the key/value projections.

Mixed precision (float16/bfloat16 values with float32 points and weights, the op's contract): the values are
upcast to the points' dtype (exact), the result is rounded to the values' dtype; with one dtype both casts are
no-ops.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def deform_sample(values: Sequence[torch.Tensor], points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values S x (B, C, H_s, W_s), points (B, N, 2), weights (B, N, S) -> (B, N, C); see the module docstring."""
    grid = points.unsqueeze(2)  # (B, N, 1, 2): grid_sample's output is then (B, C, N, 1)
    out = None
    for s, v in enumerate(values):
        sampled = F.grid_sample(v.to(points.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        term = weights[..., s, None] * sampled[..., 0].transpose(1, 2)
        out = term if out is None else out + term
    return out.to(values[0].dtype)
