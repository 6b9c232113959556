"""PAD-Net (Xu et al., CVPR 2018) on a multi-scale backbone, as MTI-Net's paper compares it (§3.1).

Backbone scales resized to 1/4 and concatenated (ΣC channels), 1×1 conv + BN + ReLU (the public MTI-Net
code's HRNet fuse); per front-end task (tasks + ``aux_tasks``) two bottleneck blocks to ``channels`` (256,
the first with a 1×1 conv + BN shortcut, as in the public PAD-Net code) and a 1×1 conv give the initial
predictions (deep supervision, ``aux["initial"]``); the multi-modal distillation
(:class:`mtlfast.nn.MultiModalDistillation`, PAD-Net's attention-guided distillation, MTI-Net eq. 1 at one
scale) refines the task features; per task two bottleneck blocks and a 1×1 conv predict.
Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): the scale fusion, the initial task
prediction, the interaction (distillation, or the TPIM of :mod:`mtlfast.models.tpim`), each task's head.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlfast.data.tasks import num_outputs
from mtlfast.models.base import MultiTaskModel, build_backbone, check_aux_tasks, method
from mtlfast.models.mtinet import InitialTaskPrediction
from mtlfast.nn import MultiModalDistillation
from mtlfast.nn.common import Bottleneck, resize

__all__ = ["PADNet"]


class PADNet(MultiTaskModel):
    """``interaction(targets, sources, channels)`` builds the module between the initial and the final
    predictions (default: PAD-Net's distillation); the TPIM network passes its TaskPairInteraction."""

    def __init__(self, tasks, dataset, backbone, *, aux_tasks=(), channels=256, interaction=None) -> None:
        super().__init__(tasks, dataset, backbone)
        self.aux_tasks = check_aux_tasks(aux_tasks, self.tasks, self.dataset)
        self.front_tasks = self.tasks + self.aux_tasks
        total = sum(backbone.channels)
        self.fuse = nn.Sequential(nn.Conv2d(total, total, 1), nn.BatchNorm2d(total), nn.ReLU())
        self.initial = InitialTaskPrediction({t: num_outputs(t, self.dataset) for t in self.front_tasks},
                                             total, channels, block=Bottleneck)
        if interaction is None:
            self.interaction = MultiModalDistillation(self.tasks, channels, self.front_tasks)
        else:
            self.interaction = interaction(self.tasks, self.front_tasks, channels)
        self.heads = nn.ModuleDict({t: nn.Sequential(Bottleneck(channels), Bottleneck(channels),
                                                     nn.Conv2d(channels, n, 1))
                                    for t, n in self.num_outputs.items()})

    def _fuse(self, feats):
        size = feats[0].shape[-2:]
        return self.fuse(torch.cat([resize(f, size) for f in feats], 1))

    def _forward_train(self, images):
        x = self.stage(self._fuse, self.backbone(images))
        task_feats, initial = self.stage(self.initial, {t: x for t in self.front_tasks})
        distilled = self.stage(self.interaction, task_feats)
        preds = {t: resize(self.stage(self.heads[t], distilled[t]), images.shape[-2:]) for t in self.tasks}
        return preds, {"initial": initial}


@method("padnet")
def padnet(tasks, *, backbone="hrnet_w18_small_v2", dataset="nyud", pretrained=None, img_size=None,
           backbone_kwargs=None, aux_tasks=(), channels=256) -> PADNet:
    return PADNet(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                  aux_tasks=aux_tasks, channels=channels)
