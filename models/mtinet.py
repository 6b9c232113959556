"""MTI-Net (Vandenhende et al., ECCV 2020): multi-scale multi-modal distillation with feature propagation.

Pipeline (paper §2.3–2.5, Fig. 1 right; structure of the public implementation, DESIGN.md §4):
backbone -> 4 scales (1/4 .. 1/32). From the coarsest scale to the finest, for every front-end task
(the tasks plus ``aux_tasks``): the scale's input is the backbone feature, concatenated (from the second
coarsest scale on) with that task's FeaturePropagation output of the coarser scale resized to this scale;
two BasicBlocks give the task feature and a 1×1 conv the initial prediction (deep supervision,
``aux["scale_s"]``). MultiModalDistillation refines the task features at every scale; FeatureAggregation
(per task) upsamples the four distilled scales to 1/4, fuses them and predicts.

Options: ``aux_tasks`` (predicted in the front-end only, e.g. edge + normals on NYUD as in the paper's
Table S1), ``channels`` (None: the backbone's channels, as with HRNet; else a 1×1 conv + BN + ReLU per
scale projects the backbone to these widths, useful for wide backbones such as ResNet-50).
Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): per scale the initial task
prediction with the feature propagation to the next finer scale, per scale the distillation, and each
task's aggregation head.
Parameter counts with hrnet_w18_small_v2 (DESIGN §4, public implementation): NYUD semseg+depth 8.58 M,
with edge+normals auxiliary 14.84 M, PASCAL 5 tasks 24.49 M.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from mtlfast.models.base import MultiTaskModel, build_backbone, check_aux_tasks, method
from mtlfast.data.tasks import num_outputs
from mtlfast.nn import FeatureAggregation, FeaturePropagation, MultiModalDistillation
from mtlfast.nn.common import BasicBlock, Bottleneck, ConvBNAct, resize

__all__ = ["MTINet", "InitialTaskPrediction", "ScaleProjection"]


class InitialTaskPrediction(nn.Module):
    """Per task: two residual blocks (cin -> c -> c) then a 1×1 conv predictor: MTI-Net's task-specific heads
    with ``block=BasicBlock``, PAD-Net's with ``block=Bottleneck`` (as in the public code of both).

    ``forward(inputs)`` with ``{task: (B, cin, H, W)}`` -> ``(features {task: (B, c, H, W)},
    predictions {task: (B, C_task, H, W)})``."""

    def __init__(self, outputs: Mapping[str, int], cin: int, channels: int,
                 block: type[BasicBlock] | type[Bottleneck] = BasicBlock) -> None:
        super().__init__()
        self.refine = nn.ModuleDict({t: nn.Sequential(block(cin, channels), block(channels, channels))
                                     for t in outputs})
        self.predict = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in outputs.items()})

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        features = {t: self.refine[t](inputs[t]) for t in self.refine}
        return features, {t: self.predict[t](f) for t, f in features.items()}


class ScaleProjection(nn.Module):
    """Optional per-scale 1×1 conv + BN + ReLU from the backbone widths to ``channels`` (identity if None)."""

    def __init__(self, cin: Sequence[int], channels: Sequence[int] | None) -> None:
        super().__init__()
        if channels is not None and len(channels) != len(cin):
            raise ValueError(f"channels: expected {len(cin)} widths (one per backbone scale), got {list(channels)}")
        self.channels = list(channels) if channels is not None else list(cin)
        self.proj = (nn.ModuleList(ConvBNAct(a, b, 1) for a, b in zip(cin, channels))
                     if channels is not None else None)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(feats) if self.proj is None else [p(f) for p, f in zip(self.proj, feats)]


class MTINet(MultiTaskModel):
    def __init__(self, tasks, dataset, backbone, *, aux_tasks=(), channels=None) -> None:
        super().__init__(tasks, dataset, backbone)
        self.aux_tasks = check_aux_tasks(aux_tasks, self.tasks, self.dataset)
        self.front_tasks = self.tasks + self.aux_tasks
        self.project = ScaleProjection(backbone.channels, channels)
        c = self.project.channels
        outputs = {t: num_outputs(t, self.dataset) for t in self.front_tasks}
        scales = len(c)
        self.initial = nn.ModuleList(
            InitialTaskPrediction(outputs, c[s] + (c[s + 1] if s + 1 < scales else 0), c[s]) for s in range(scales))
        # propagation from scale s (1..3) to s-1; index s-1
        self.propagate = nn.ModuleList(FeaturePropagation(self.front_tasks, c[s]) for s in range(1, scales))
        self.distill = nn.ModuleList(MultiModalDistillation(self.tasks, c[s], self.front_tasks) for s in range(scales))
        self.heads = nn.ModuleDict({t: FeatureAggregation(c, self.num_outputs[t]) for t in self.tasks})

    def _scale(self, s: int, x: torch.Tensor, propagated: dict | None):
        """Scale s: initial task features and predictions from the backbone feature (and the coarser scale's
        propagated features), and their propagation to scale s - 1 (None at s = 0)."""
        inputs = {t: x if propagated is None else torch.cat([x, resize(propagated[t], x.shape[-2:])], 1)
                  for t in self.front_tasks}
        features, predictions = self.initial[s](inputs)
        return features, predictions, (self.propagate[s - 1](features) if s > 0 else None)

    def _forward_train(self, images):
        feats = self.stage(self.project, self.backbone(images))
        task_feats: list[dict] = [{} for _ in feats]
        aux = {}
        propagated = None
        for s in reversed(range(len(feats))):
            task_feats[s], aux[f"scale_{s}"], propagated = self.stage(self._scale, s, feats[s], propagated)
        distilled = [self.stage(self.distill[s], task_feats[s]) for s in range(len(feats))]
        size = images.shape[-2:]
        preds = {t: resize(self.stage(self.heads[t], [d[t] for d in distilled]), size) for t in self.tasks}
        return preds, aux


@method("mtinet")
def mtinet(tasks, *, backbone="hrnet_w18_small_v2", dataset="nyud", pretrained=None, img_size=None,
           backbone_kwargs=None, aux_tasks=(), channels=None) -> MTINet:
    return MTINet(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                  aux_tasks=aux_tasks, channels=channels)
