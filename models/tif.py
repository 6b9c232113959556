"""TIF (§3.1, Fig. 2): task-sharing encoder (backbone + ScaleAttentiveFeatureFusion per scale) and one
task-specific decoder per task (SelfFeatureDistillation on scales 2, 3; LowToHighDiffusion on 0, 1).

Per task t (choices marked * are open in the paper): X̂_t^i = 3×3 conv + BN + ReLU of the shared X̂^i*
(the split into task-specific features); RX_t^2, RX_t^3 by SFD; RX_t^0, RX_t^1 by LTHD from the SFD query/
key maps of scales 2 and 3; FX_t = FeatureFuse(RX_t^0..RX_t^3) (eq. 14): every RX resized to scale 0 and
concatenated, 3×3 conv + BN + ReLU*; a 1×1 conv predicts*; resized to the input. No deep supervision.
Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): each scale's SAFF, each task's decoder
(split, SFD, LTHD, fusion and head).
``dim``: the decoder width (all scales), not given in the paper*: chosen so that the NYUD 4-task models have
Table 3's parameter counts: default 84 with Swin-T (32.94 M; paper 32.91 M; 80 gives 32.46 M, 88 33.44 M),
44 with HRNet-18 (5.27 M; paper 5.27 M), set in configs/*/hrnet_w18_small_v2/tif.yaml.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlfast.models.base import MultiTaskModel, build_backbone, method
from mtlfast.nn import LowToHighDiffusion, ScaleAttentiveFeatureFusion, SelfFeatureDistillation
from mtlfast.nn.common import ConvBNAct, resize

__all__ = ["TIF"]


class TIF(MultiTaskModel):
    normals_loss_reduction = "pixel"  # "identical experimental settings as ... [1]" (ATRC, InvPT's loss code)

    def __init__(self, tasks, dataset, backbone, *, dim=84, mlp_ratio=4) -> None:
        super().__init__(tasks, dataset, backbone)
        c = backbone.channels
        if len(c) != 4:
            raise ValueError(f"tif: needs a 4-scale backbone, {backbone.name} has {len(c)} scales")
        self.saff = nn.ModuleList(ScaleAttentiveFeatureFusion(c, i, dim) for i in range(4))
        self.split = nn.ModuleDict({t: nn.ModuleList(ConvBNAct(dim, dim, 3) for _ in range(4)) for t in self.tasks})
        self.sfd = nn.ModuleDict({t: nn.ModuleList(SelfFeatureDistillation(dim, mlp_ratio) for _ in range(2))
                                  for t in self.tasks})
        self.lthd = nn.ModuleDict({t: nn.ModuleList(LowToHighDiffusion(dim, mlp_ratio) for _ in range(2))
                                   for t in self.tasks})
        self.heads = nn.ModuleDict({t: nn.Sequential(ConvBNAct(4 * dim, dim, 3), nn.Conv2d(dim, n, 1))
                                    for t, n in self.num_outputs.items()})

    def _decode(self, t: str, shared: list) -> torch.Tensor:
        """Task t's decoder on the shared SAFF features: its prediction at scale 0."""
        x = [split(s) for split, s in zip(self.split[t], shared)]
        rx2, q2, k2 = self.sfd[t][0](x[2])
        rx3, q3, k3 = self.sfd[t][1](x[3])
        fine, coarse = (q2, k2, x[2].shape[-2:]), (q3, k3, x[3].shape[-2:])
        rx0 = self.lthd[t][0](x[0], fine, coarse)
        rx1 = self.lthd[t][1](x[1], fine, coarse)
        size = rx0.shape[-2:]
        return self.heads[t](torch.cat([rx0] + [resize(r, size) for r in (rx1, rx2, rx3)], 1))

    def _forward_train(self, images):
        feats = self.backbone(images)
        shared = [self.stage(saff, feats) for saff in self.saff]
        return {t: resize(self.stage(self._decode, t, shared), images.shape[-2:]) for t in self.tasks}, {}


@method("tif")
def tif(tasks, *, backbone="swin_t", dataset="nyud", pretrained=None, img_size=None, backbone_kwargs=None,
        dim=84, mlp_ratio=4) -> TIF:
    return TIF(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
               dim=dim, mlp_ratio=mlp_ratio)
