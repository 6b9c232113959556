"""MTI-Net's blocks (Vandenhende et al., ECCV 2020, §2.3–2.5) and PAD-Net's distillation (Xu et al., CVPR 2018).

These blocks are convolutions and gates only: no attention op is involved, so they run the same on every
backend. Task features are dicts ``{task: (B, C, H, W)}``.

Choices the paper leaves open follow the public MTI-Net implementation (facts listed in DESIGN.md §4):
3×3 convolutions without bias in the distillation; feature harmonisation f = two BasicBlocks
(T·C -> T·C/4 -> T·C/4) and a 1×1 conv back to T·C; reduction = one BasicBlock (T·C -> C); SE with r = 16
(hidden width at least 1); aggregation = 1×1 conv + BN + ReLU on the concatenated scales, then a 1×1 conv.
One deliberate difference: the public code takes the softmax over groups of T *consecutive* channels of the
concatenation, which mixes channels of one task; here the softmax runs over the task axis of the
(B, T, C, H, W) view of the concatenation, which is what the paper describes. The parameter count is the same.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from mtlfast.nn.common import (BasicBlock, SEBlock, check_sizes, check_stage_features, check_task_features,
                                check_task_names, resize)

__all__ = ["MultiModalDistillation", "FeaturePropagation", "FeatureAggregation"]


class _SpatialAttention(nn.Module):
    """σ(W x) ⊙ (W' x) with W, W' 3×3 convolutions (no bias): one term of eq. 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mask = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.value = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mask(x)) * self.value(x)


class MultiModalDistillation(nn.Module):
    """Multi-modal distillation at one scale, MTI-Net eq. 1 (the PAD-Net distillation unit):

        F°_k = Fⁱ_k + Σ_{l ≠ k} σ(W_{k,l} Fⁱ_l) ⊙ (W'_{k,l} Fⁱ_l)

    for every target task k in ``tasks``, the sources l ranging over ``source_tasks`` (the targets plus
    any auxiliary tasks). Input: ``{task: (B, C, H, W)}`` for every source task; output: ``{k: (B, C, H, W)}``
    for every target. With a single source task the sum is empty and the block is the identity.
    """

    def __init__(self, tasks: Sequence[str], channels: int, source_tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.tasks = check_task_names(tasks)
        check_sizes(channels=channels)
        self.source_tasks = check_task_names(source_tasks, "source_tasks") if source_tasks is not None else self.tasks
        missing = [t for t in self.tasks if t not in self.source_tasks]
        if missing:
            raise ValueError(f"source_tasks: must contain every target task; missing {missing}")
        self.channels = channels
        self.attention = nn.ModuleDict({
            k: nn.ModuleDict({l: _SpatialAttention(channels) for l in self.source_tasks if l != k})
            for k in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_task_features(features, self.source_tasks, channels=self.channels)
        out = {}
        for k in self.tasks:
            x = features[k]
            for l, block in self.attention[k].items():
                x = x + block(features[l])
            out[k] = x
        return out


class FeaturePropagation(nn.Module):
    """Feature Propagation Module (MTI-Net §2.4, Fig. 3) from one scale to the next finer one.

    For T tasks with features X_t (B, C, H, W):
    harmonisation  X = concat_t X_t (B, T·C, H, W);  G = f(X) viewed (B, T, C, H, W);
                   M = softmax over t of G;  S = reduce(concat_t M_t ⊙ X_t)  (B, C, H, W);
    refinement     out_t = SE_t(S) + X_t.
    f = BasicBlock(T·C -> T·C/4), BasicBlock(T·C/4), 1×1 conv (T·C/4 -> T·C); reduce = BasicBlock(T·C -> C);
    SE_t a squeeze-and-excitation with reduction ``se_reduction`` (16). The caller upsamples the outputs
    and concatenates them with the backbone features of the finer scale.
    """

    def __init__(self, tasks: Sequence[str], channels: int, se_reduction: int = 16) -> None:
        super().__init__()
        self.tasks = check_task_names(tasks)
        check_sizes(channels=channels, se_reduction=se_reduction)
        self.channels = channels
        n = len(self.tasks)
        shared = n * channels
        quarter = max(1, shared // 4)
        self.harmonize = nn.Sequential(BasicBlock(shared, quarter), BasicBlock(quarter, quarter),
                                       nn.Conv2d(quarter, shared, 1))
        self.reduce = BasicBlock(shared, channels)
        self.se = nn.ModuleDict({t: SEBlock(channels, se_reduction) for t in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_task_features(features, self.tasks, channels=self.channels)
        x = torch.stack([features[t] for t in self.tasks], dim=1)  # (B, T, C, H, W)
        b, n, c, h, w = x.shape
        gate = torch.softmax(self.harmonize(x.reshape(b, n * c, h, w)).reshape(b, n, c, h, w), dim=1)
        shared = self.reduce((gate * x).reshape(b, n * c, h, w))
        return {t: self.se[t](shared) + features[t] for t in self.tasks}


class FeatureAggregation(nn.Module):
    """Feature aggregation head (MTI-Net §2.5; the HRNet segmentation head): every scale resized to the
    first (finest) one, concatenated (ΣC channels), 1×1 conv + BN + ReLU (width ``mid_channels``, default ΣC),
    1×1 conv to ``num_outputs``. Input: a list of (B, C_s, H_s, W_s); output (B, num_outputs, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], num_outputs: int, mid_channels: int | None = None) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels: expected the channels of at least one scale")
        check_sizes(num_outputs=num_outputs, mid_channels=mid_channels,
                    **{f"in_channels[{i}]": c for i, c in enumerate(in_channels)})
        self.in_channels = list(in_channels)
        total = sum(in_channels)
        mid = mid_channels or total
        self.fuse = nn.Sequential(nn.Conv2d(total, mid, 1), nn.BatchNorm2d(mid), nn.ReLU())
        self.predict = nn.Conv2d(mid, num_outputs, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_stage_features(features, self.in_channels)
        size = features[0].shape[-2:]
        x = torch.cat([resize(f, size) for f in features], dim=1)
        return self.predict(self.fuse(x))
