"""Literal reference of BridgeNet's Task Pattern Propagation attention (paper §3.2, eq. 1–2).

Shapes: q (B, T, H, Nq, D), k (B, T, H, Nk, D), v (B, T, H, Nk, Dv); mix_weight (T, H, T·H) (one 1×1
conv per task, as in the official code) or (H, T·H) (one conv shared by all tasks, the paper's eq. 2
read literally); mix_bias (T, H) or (H,), optional. Returns (B, T, H, Nq, Dv).

    A_c      = scale · q[:, t', h] k[:, t', h]ᵀ                  c = t'·H + h   (eq. 1, T·H maps)
    Ā[t, o]  = Σ_c W[t, o, c] · A_c + b[t, o]                     (1×1 conv over the concatenated maps)
    out[:, t, o] = softmax(Ā[t, o], dim=-1) · v[:, t, o]          (eq. 2, per task values)

This is the definition the kernels are tested against: it forms all T·H score maps (B, T·H, Nq, Nk),
runs the 1×1 convolution (``F.conv2d`` with the bias) over them, and applies the softmax, in that order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def tpp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix_weight: torch.Tensor,
                  mix_bias: torch.Tensor | None = None, *, scale: float | None = None) -> torch.Tensor:
    B, T, H, Nq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    # eq. 1: one score map per (task t', head h), concatenated along channels c = t'·H + h
    maps = scale * torch.matmul(q.flatten(1, 2), k.flatten(1, 2).transpose(-1, -2))  # (B, T·H, Nq, Nk)
    # eq. 2: the 1×1 convolution across the T·H maps; per-task weights give T·H output maps, shared ones H
    out_maps = mix_weight.shape[0] * mix_weight.shape[1] if mix_weight.dim() == 3 else mix_weight.shape[0]
    bias = None if mix_bias is None else mix_bias.reshape(out_maps)
    mixed = F.conv2d(maps, mix_weight.reshape(out_maps, T * H, 1, 1), bias)
    attn = torch.softmax(mixed, dim=-1)
    if mix_weight.dim() == 2:  # shared: every task propagates the same H maps
        attn = attn.unsqueeze(1).expand(B, T, H, Nq, -1)
    else:
        attn = attn.view(B, T, H, Nq, -1)
    return torch.matmul(attn, v)  # (B, T, H, Nq, Dv)
