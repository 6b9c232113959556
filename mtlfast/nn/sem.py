"""SEM's blocks ("Going Beyond Multi-Task Dense Prediction with Synergy Embedding Models", §3.2–3.3):
HierarchyAdaptiveAttention (intra-task) and EMInteraction (inter-task).

SEM has no public code; its deformable points follow DAT and its EM iteration EMANet (facts in DESIGN.md §4).
Choices the paper leaves open:
- Stage features are unified to ``dim`` channels by a 1×1 conv + BN per stage ("a convolution operation").
- Offset net per stage (DAT): depth-wise k_s×k_s conv at stride r_s -> LayerNorm over channels -> GELU ->
  1×1 conv to 2 channels (no bias); offsets = tanh(·) · ``offset_range`` / (grid size) per axis in the
  normalised [-1, 1] frame, where a cell is 2 / (grid size) wide: at most ``offset_range`` / 2 cells (DAT's
  range factor); defaults r_s = 2^(S-1-s) (8, 4, 2, 1 for strides 4..32,
  so every stage has about as many points as the query map has pixels) and k_s = 2·log2(r_s) + 3 (9, 7,
  5, 3 as in DAT). Reference points at the cell centres of the offset conv's output grid, ⌈H_s/r_s⌉×⌈W_s/r_s⌉
  ('same' padding), (x, y) order. This departs from the paper's ⌊H_s/r_s⌋×⌊W_s/r_s⌋ points (eq. 1) where r_s
  does not divide the stage size (one more row / column of points) and equals it at the paper's crops (448×576,
  512×512: with the default r_s, stride·r_s = 32 divides them).
- Query map (eq. 3): every unified stage resized (bilinear) to the smallest stage, concatenated, 3×3 conv +
  GELU. θ_HW = Linear(C, C) -> ReLU -> Linear(C, S), softmax over the S stages.
- The sampling of eq. 2–4 is one :func:`mtlfast.ops.deform_sample` call (every stage at every point,
  weighted by W); φ(Q; p) is deform_sample with one stage and unit weights.
- Attention block: Q = LN(query tokens) W_q, K̃ = LN(x̃) W_k, V = LN(x̃) W_v, ``heads`` heads, scale
  (C/heads)^-0.5, output projection (``q_norm`` and ``attn``, :class:`~mtlfast.nn.common.ProjectedAttention`),
  residual to the query map, then FFN (LN + MLP, ratio 4) with residual. No bias on W_k (it cancels in the
  softmax).
- EMInteraction: per task a 1×1 conv in, and out ReLU(X + BN(Conv1×1(ReLU(X̃)))), as EMANet's EMA unit.
  The task bases (μᵗ)⁽ᴿ⁾ are averaged (eq. 10) and every task is reconstructed from its own
  responsibilities and the averaged bases: X̃_t = A_t⁽ᴿ⁾ μ⁽ᴿ⁾ (SEM: "the final μ⁽ᴿ⁾ and A⁽ᴿ⁾ are used to
  reconstruct X̃"), with the gradient through all R iterations (``detach_iterations=False``, the default).
  ``detach_iterations=True`` is a cheaper truncated gradient (em_attention's detached mode): the R iterations
  run without gradient, then one more E-step with it, so X̃_t = A_t⁽ᴿ⁺¹⁾ μ⁽ᴿ⁾ with A_t⁽ᴿ⁺¹⁾ =
  softmax(X_t (μᵗ)⁽ᴿ⁾ᵀ / τ), a different forward from the paper's, whose gradient reaches X_t through
  A_t⁽ᴿ⁺¹⁾ only. (EMANet's public code runs its whole EM loop
  under no_grad and reconstructs from the loop's last responsibilities and bases, so no gradient reaches its
  input conv through the EM unit; neither mode here is that.)
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlfast.nn.common import (ChannelNorm, ConvBNAct, FeedForward, ProjectedAttention, check_sizes,
                                check_stage_features, check_task_features, check_task_names, resize, to_map,
                                to_tokens)
from mtlfast.nn.em_bases import EMBases
from mtlfast.ops._checks import check_positive_float
from mtlfast.ops.deform_sample import deform_sample
from mtlfast.ops.em_attention import em_attention

__all__ = ["HierarchyAdaptiveAttention", "EMInteraction", "reference_points"]


def reference_points(grid: Sequence[int], batch: int, *, device=None, dtype=None) -> torch.Tensor:
    """Cell centres of a (gh, gw) grid as (batch, gh·gw, 2) normalised (x, y) in (-1, 1), row-major."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], -1).reshape(1, gh * gw, 2).expand(batch, -1, -1)


class _OffsetNet(nn.Module):
    """DAT offset network for one stage: (B, C, H, W) -> points (B, gh·gw, 2) = reference + offsets, in float32 (or
    float64) also under a 16-bit autocast. Rounded to bfloat16, a coordinate in [0.5, 1) moves by up to 2^-9, 0.11
    pixels of a 112-pixel-wide stage; in float16 small offsets (as at initialisation) snap onto their pixel
    centres, where the bilinear derivative changes side, so the offsets' gradient is rounding noise there. (Under
    autocast, torch's grid_sample, on its float32 list, would also sample in float32.)
    """

    def __init__(self, channels: int, stride: int, kernel: int, offset_range: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels),
            ChannelNorm(channels), nn.GELU(), nn.Conv2d(channels, 2, 1, bias=False))
        self.offset_range = offset_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.net(x)  # (B, 2, gh, gw): (x, y) offsets
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        b, _, gh, gw = raw.shape
        limit = raw.new_tensor([self.offset_range / gw, self.offset_range / gh])
        offsets = torch.tanh(raw).flatten(2).transpose(1, 2) * limit
        return reference_points((gh, gw), b, device=raw.device, dtype=raw.dtype) + offsets


class HierarchyAdaptiveAttention(nn.Module):
    """Intra-task hierarchy-adaptive attention (SEM §3.2, Fig. 3, eq. 1–4) for one task.

        p_s = p_s^ref + θ_offset(F_s)                                  (eq. 1, N_s points per stage)
        x̃_s = φ(F_s; p),  p = ∪_s p_s  (N = Σ N_s points)              (eq. 2)
        W = softmax_S(θ_HW(φ(Q; p)))  (N × S)                          (eq. 3)
        K̃ = (Wᵀ ⊗ x̃) W_k,  Ṽ = (Wᵀ ⊗ x̃) W_v                          (eq. 4, one deform_sample)
        out = MultiHead(Q, K̃, Ṽ)

    ``forward(features)`` with the S stages (B, C_s, H_s, W_s) -> (B, dim, H_S, W_S), the size of the last
    (smallest) stage.
    """

    def __init__(self, in_channels: Sequence[int], dim: int, *, heads: int = 2, strides: Sequence[int] | None = None,
                 kernels: Sequence[int] | None = None, offset_range: float = 2.0, mlp_ratio: int = 4) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels: expected the channels of at least one stage")
        check_sizes(dim=dim, heads=heads, mlp_ratio=mlp_ratio,
                    **{f"in_channels[{i}]": c for i, c in enumerate(in_channels)})
        stages = len(in_channels)
        strides = list(strides) if strides is not None else [2 ** (stages - 1 - s) for s in range(stages)]
        kernels = list(kernels) if kernels is not None else [2 * int(math.log2(r)) + 3 for r in strides]
        if len(strides) != stages or len(kernels) != stages:
            raise ValueError(f"strides/kernels: expected {stages} values (one per stage), got {strides}, {kernels}")
        self.in_channels = list(in_channels)
        self.unify = nn.ModuleList(ConvBNAct(c, dim, 1, act=None) for c in in_channels)
        self.offsets = nn.ModuleList(_OffsetNet(dim, r, k, offset_range) for r, k in zip(strides, kernels))
        self.query = nn.Sequential(nn.Conv2d(stages * dim, dim, 3, padding=1), nn.GELU())
        self.stage_weights = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, stages))
        self.q_norm = nn.LayerNorm(dim)
        self.attn = ProjectedAttention(dim, heads=heads)
        self.ffn = FeedForward(dim, mlp_ratio * dim)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_stage_features(features, self.in_channels)
        stages = [u(f) for u, f in zip(self.unify, features)]
        size = stages[-1].shape[-2:]
        qmap = self.query(torch.cat([resize(s, size) for s in stages], 1))
        points = torch.cat([net(s) for net, s in zip(self.offsets, stages)], 1)  # (B, N, 2)
        # The features in their own dtype at the points' (float32 in a 16-bit model or autocast: _OffsetNet), in
        # float32 arithmetic (deform_sample's mixed precision, no float32 copies of the maps), out in the features'
        ones = points.new_ones(points.shape[0], points.shape[1], 1)
        queries = deform_sample([qmap], points, ones)
        weights = torch.softmax(self.stage_weights(queries), -1)  # (B, N, S)
        sampled = deform_sample([s.to(qmap.dtype) for s in stages], points, weights.to(points.dtype))
        tokens = to_tokens(qmap)
        return to_map(self.ffn(tokens + self.attn(self.q_norm(tokens), sampled)), size)


class EMInteraction(nn.Module):
    """Inter-task EM-interactive module (SEM §3.3, Fig. 4, eq. 8–10) over the tasks' features at one scale.

    For every task t, from the shared initial bases μ⁽⁰⁾ (K, C) (an EMA buffer, :class:`EMBases`):
        R iterations of  A = softmax(X_t μᵀ / τ),  μ = l2norm(Aᵀ X_t / Σ_N A)   (eq. 8–9, em_attention)
        μ⁽ᴿ⁾ = (1/T) Σ_t (μᵗ)⁽ᴿ⁾                                              (eq. 10)
        X̃_t = A_t⁽ᴿ⁾ μ⁽ᴿ⁾,   out_t = ReLU(X_t + BN(Conv1×1(ReLU(X̃_t))))                 (EMANet's unit)
    and in training μ⁽⁰⁾ ← m μ⁽⁰⁾ + (1 − m) mean_batch(μ⁽ᴿ⁾). All tasks go through one
    :func:`mtlfast.ops.em_attention` call. Input and output ``{task: (B, C, H, W)}``, C = ``channels``.
    ``detach_iterations=True``: the truncated gradient of the module docstring, reconstructing from
    A_t⁽ᴿ⁺¹⁾ = softmax(X_t (μᵗ)⁽ᴿ⁾ᵀ / τ) instead of A_t⁽ᴿ⁾.
    """

    def __init__(self, tasks: Sequence[str], channels: int, *, num_bases: int = 64, n_iter: int = 5,
                 momentum: float = 0.9, tau: float = 1.0, detach_iterations: bool = False) -> None:
        super().__init__()
        self.tasks = check_task_names(tasks)
        check_sizes(channels=channels, num_bases=num_bases, n_iter=n_iter)
        check_positive_float("tau", tau)
        self.channels, self.n_iter, self.tau, self.detach_iterations = channels, n_iter, tau, detach_iterations
        self.bases = EMBases(num_bases, channels, momentum=momentum)
        self.inp = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in self.tasks})
        self.out = nn.ModuleDict({t: ConvBNAct(channels, channels, 1, act=None) for t in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_task_features(features, self.tasks, channels=self.channels)
        tasks = self.tasks
        b = features[tasks[0]].shape[0]
        x = torch.cat([to_tokens(self.inp[t](features[t])) for t in tasks])  # (T·B, N, C)
        mu0 = self.bases(x.shape[0]).to(x.dtype)
        _, mu, z = em_attention(x, mu0, self.n_iter, tau=self.tau, detach_iterations=self.detach_iterations)
        mu_mean = mu.reshape(len(tasks), b, *mu.shape[1:]).mean(0)  # (B, K, C)
        self.bases.update(mu_mean)
        recon = torch.bmm(z, mu_mean.repeat(len(tasks), 1, 1)).chunk(len(tasks))
        return {t: F.relu(features[t] + self.out[t](F.relu(to_map(r, features[t].shape[-2:]))))
                for t, r in zip(tasks, recon)}
