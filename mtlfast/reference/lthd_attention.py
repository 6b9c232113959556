"""Literal definition of TIF's Low-To-High Diffusion attention (DESIGN.md §3, op 3; TIF eq. 11–12).

    A   = scale · q_f k_fᵀ + Up(scale · q_c k_cᵀ)          (eq. 11: A⁰ = f_up(A³) + A²)
    out = softmax(A, dim=-1) v                              (eq. 12)

q_fine, k_fine (B, Nf, D) are tokens of the fine grid size_fine = (hf, wf) (row-major, Nf = hf·wf);
q_coarse, k_coarse (B, Nc, D) of the coarse grid size_coarse = (hc, wc); v (B, Nf, C) -> (B, Nf, C).
``scale=None`` means D ** -0.5, used for both terms.

Up resizes the coarse score map, read as (hc, wc, hc, wc), to (hf, wf, hf, wf): a bilinear resize
(F.interpolate, mode="bilinear", align_corners=False) along the key grid and along the query grid (they
act on different axes, so their order does not matter). The paper says only "upsample"; bilinear
without corner alignment is DESIGN.md's choice. Both resizes are done literally on the score map,
forming (B, Nc, Nf) and (B, Nf, Nf) tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _resize_grid_axis(maps: torch.Tensor, size_in: tuple[int, int], size_out: tuple[int, int]) -> torch.Tensor:
    """(B, M, Nin) -> (B, M, Nout): the last axis, a grid of size_in, bilinearly resized to size_out."""
    B, M, _ = maps.shape
    images = maps.reshape(B * M, 1, *size_in)
    resized = F.interpolate(images, size=tuple(size_out), mode="bilinear", align_corners=False)
    return resized.reshape(B, M, size_out[0] * size_out[1])


def upsample_score_map(scores: torch.Tensor, size_coarse: tuple[int, int], size_fine: tuple[int, int]) -> torch.Tensor:
    """Up: (B, Nc, Nc) score map on the coarse grid (queries × keys) -> (B, Nf, Nf) on the fine grid."""
    along_keys = _resize_grid_axis(scores, size_coarse, size_fine)                      # (B, Nc_q, Nf_k)
    along_queries = _resize_grid_axis(along_keys.transpose(1, 2), size_coarse, size_fine)  # (B, Nf_k, Nf_q)
    return along_queries.transpose(1, 2)


def lthd_attention(q_fine: torch.Tensor, k_fine: torch.Tensor, q_coarse: torch.Tensor, k_coarse: torch.Tensor,
                   v: torch.Tensor, size_fine, size_coarse, *, scale: float | None = None) -> torch.Tensor:
    if scale is None:
        scale = q_fine.shape[-1] ** -0.5
    fine = scale * (q_fine @ k_fine.transpose(-2, -1))
    coarse = scale * (q_coarse @ k_coarse.transpose(-2, -1))
    scores = fine + upsample_score_map(coarse, tuple(size_coarse), tuple(size_fine))
    return torch.softmax(scores, dim=-1) @ v
