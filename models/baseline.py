"""Baselines: ``baseline`` (shared encoder + one head per task, no interaction) and ``single_task`` (the
same network for exactly one task; the reference of Δm).

Head: :class:`mtlfast.nn.FeatureAggregation` on the backbone's 4 scales (resized to 1/4, concatenated,
1×1 conv + BN + ReLU, 1×1 conv), the HRNet segmentation head that MTI-Net and ATRC use as their baseline.
``head_channels`` sets the width of its hidden 1×1 conv (default: the sum of the backbone's channels for HRNet,
as in the public MTI-Net code, and 256 for the wider backbones, where the sum would be 1–4 thousand).
Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): each task's head.
"""
from __future__ import annotations

from torch import nn

from mtlfast.models.base import MultiTaskModel, build_backbone, method
from mtlfast.nn import FeatureAggregation
from mtlfast.nn.common import resize

__all__ = ["Baseline"]


class Baseline(MultiTaskModel):
    def __init__(self, tasks, dataset, backbone, *, head_channels=None) -> None:
        super().__init__(tasks, dataset, backbone)
        if head_channels is None and backbone.family != "hrnet":
            head_channels = 256
        self.heads = nn.ModuleDict({t: FeatureAggregation(backbone.channels, n, head_channels)
                                    for t, n in self.num_outputs.items()})

    def _forward_train(self, images):
        feats = self.backbone(images)
        return {t: resize(self.stage(head, feats), images.shape[-2:]) for t, head in self.heads.items()}, {}


@method("baseline")
def baseline(tasks, *, backbone="hrnet_w18_small_v2", dataset="nyud", pretrained=None, img_size=None,
             backbone_kwargs=None, head_channels=None) -> Baseline:
    return Baseline(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                    head_channels=head_channels)


@method("single_task")
def single_task(tasks, *, backbone="hrnet_w18_small_v2", dataset="nyud", pretrained=None, img_size=None,
                backbone_kwargs=None, head_channels=None) -> Baseline:
    if len(tasks) != 1:
        raise ValueError(f"single_task: expected exactly one task, got {tasks}; use 'baseline' for several")
    return Baseline(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                    head_channels=head_channels)
