"""BridgeNet (Zhang et al., §3, Fig. 2): preliminary decoders with Task Pattern Propagation, then per scale
a Bridge Feature Extractor and a Task Feature Refiner, decoding from the coarsest scale to the finest.

Pipeline (choices the paper leaves open are marked *):
- backbone pyramid; the last ``num_scales`` levels are used (§4.1: 3 for ViT, "the last three layers";
  4 for HRNet and the other multi-scale backbones). Stage k = 0 is the coarsest.
- generic features S_k: the level embedded into the stage width ``stage_dims[k]`` by a 1×1 conv + BN + ReLU*.
- preliminary decoder per task on the coarsest level: 3×3 conv + BN + ReLU to ``prelim_channels``
  (§4.1: 768 / 1024 for ViT-B / -L, 144 / 384 for HRNet-W18 / -W48, i.e. the backbone's deepest width,
  the default), then :class:`~mtlfast.nn.TaskPatternPropagation` (attention width ``embed_dim``, 2 heads),
  then a 1×1 conv predictor per task: the initial predictions (deep supervision ``aux["initial"]``).
- task features P_0 = a 1×1 conv + BN + ReLU (shared by the tasks*) from ``prelim_channels`` to stage_dims[0].
- stage k: S'_k = BridgeFeatureExtractor(S_k, {P_k}) (keys/values pooled by ``kv_strides[k]``, 2/4/8(/16)),
  P_k <- TaskFeatureRefiner(P_k, S'_k) (``tfr`` = base/large/huge = 2/4/6 layers); then P_{k+1} = shared
  up-sampling layer (bilinear resize to the next level, 3×3 conv + BN + ReLU to stage_dims[k+1]*).
- prediction per task: the refined P_k of every stage resized to the finest stage and concatenated,
  3×3 conv + BN + ReLU to stage_dims[-1], 1×1 conv*; resized to the input.

Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): the preliminary decoders with TPP and
the initial predictions; per scale k the up-sampling from scale k-1, the embedding of S_k, the BFE and the
TFR; each task's prediction head.

Defaults: ``stage_dims`` (576, 288, 144[, 72]) and 2 heads (official code, DESIGN §4), ``embed_dim`` 512.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlfast.models.base import MultiTaskModel, build_backbone, method
from mtlfast.nn import BridgeFeatureExtractor, TaskFeatureRefiner, TaskPatternPropagation
from mtlfast.nn.common import ConvBNAct, resize

__all__ = ["BridgeNet"]

_STAGE_DIMS = (576, 288, 144, 72)
_KV_STRIDES = (2, 4, 8, 16)


def _per_stage(name: str, values, default, n: int) -> list[int]:
    values = list(default[:n] if values is None else values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per decoder stage, num_scales={n}), got {values}")
    return [int(v) for v in values]


class BridgeNet(MultiTaskModel):
    def __init__(self, tasks, dataset, backbone, *, num_scales=None, prelim_channels=None, embed_dim=512,
                 stage_dims=None, kv_strides=None, heads=2, tfr="base") -> None:
        super().__init__(tasks, dataset, backbone)
        n = num_scales or (3 if backbone.family == "vit" else 4)
        if not 1 <= n <= len(backbone.channels):
            raise ValueError(f"num_scales: expected 1..{len(backbone.channels)}, got {n}")
        self.num_scales = n
        dims = _per_stage("stage_dims", stage_dims, _STAGE_DIMS, n)
        strides = _per_stage("kv_strides", kv_strides, _KV_STRIDES, n)
        levels = list(reversed(backbone.channels[-n:]))  # coarsest first
        prelim = prelim_channels or levels[0]
        self.embed = nn.ModuleList(ConvBNAct(c, d, 1) for c, d in zip(levels, dims))
        self.prelim = nn.ModuleDict({t: ConvBNAct(levels[0], prelim, 3) for t in self.tasks})
        self.tpp = TaskPatternPropagation(self.tasks, prelim, embed_dim, heads=heads)
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(prelim, c, 1) for t, c in self.num_outputs.items()})
        self.to_stage0 = ConvBNAct(prelim, dims[0], 1)
        self.bfe = nn.ModuleList(BridgeFeatureExtractor(d, heads=heads, kv_stride=s) for d, s in zip(dims, strides))
        self.tfr = nn.ModuleList(TaskFeatureRefiner(self.tasks, d, tfr) for d in dims)
        self.upsample = nn.ModuleList(ConvBNAct(dims[k], dims[k + 1], 3) for k in range(n - 1))
        self.heads = nn.ModuleDict({t: nn.Sequential(ConvBNAct(sum(dims), dims[-1], 3), nn.Conv2d(dims[-1], c, 1))
                                    for t, c in self.num_outputs.items()})

    def _preliminary(self, coarsest: torch.Tensor):
        """Preliminary decoders + TPP on the coarsest level: (initial predictions, task features P_0)."""
        prelim = self.tpp({t: self.prelim[t](coarsest) for t in self.tasks})
        initial = {t: self.initial_heads[t](x) for t, x in prelim.items()}
        return initial, {t: self.to_stage0(x) for t, x in prelim.items()}

    def _scale(self, k: int, level: torch.Tensor, task: dict) -> dict:
        """Decoder stage k: task features of stage k-1 up-sampled to this level (k > 0), S_k, BFE, TFR."""
        if k > 0:
            task = {t: self.upsample[k - 1](resize(x, level.shape[-2:])) for t, x in task.items()}
        bridge = self.bfe[k](self.embed[k](level), task)
        return self.tfr[k](task, bridge)

    def _head(self, task: str, stages: list, size) -> torch.Tensor:
        return self.heads[task](torch.cat([resize(s, size) for s in stages], 1))

    def forward_train(self, images):
        levels = list(reversed(self.backbone(images)[-self.num_scales:]))  # coarsest first
        initial, task = self.stage(self._preliminary, levels[0])
        stages = []
        for k in range(self.num_scales):
            task = self.stage(self._scale, k, levels[k], task)
            stages.append(task)
        finest = stages[-1][self.tasks[0]].shape[-2:]
        preds = {t: resize(self.stage(self._head, t, [s[t] for s in stages], finest), images.shape[-2:])
                 for t in self.tasks}
        return preds, {"initial": initial}


@method("bridgenet")
def bridgenet(tasks, *, backbone="vit_l", dataset="nyud", pretrained=None, img_size=None, backbone_kwargs=None,
              num_scales=None, prelim_channels=None, embed_dim=512, stage_dims=None, kv_strides=None, heads=2,
              tfr="base") -> BridgeNet:
    return BridgeNet(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                     num_scales=num_scales, prelim_channels=prelim_channels, embed_dim=embed_dim,
                     stage_dims=stage_dims, kv_strides=kv_strides, heads=heads, tfr=tfr)
