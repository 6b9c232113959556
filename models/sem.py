"""SEM (Synergy Embedding Models, §3.1, Fig. 3–4): a shared encoder, per task an intra-task
HierarchyAdaptiveAttention over all encoder stages, then per task a decoder of increasing resolution whose
every stage ends with the inter-task EMInteraction (§4.3: the inter-task module in all decoder stages).

Decoder (§3.3 last paragraph; the appendix with its details is not part of the paper text, so the
choices marked * are ours): the intra-task output (at the coarsest stage) starts the decoder; at decoder
stage i (coarsest to finest) the feature is resized bilinearly to encoder stage i and added to that stage
projected to ``dim`` (1×1 conv + BN + ReLU*, per task), then refined by a lightweight global self-attention
(spatial-reduction attention as in PVT/SegFormer*: keys/values average-pooled by ``sr_ratios[i]``
(8, 4, 2, 1 from the finest stage; adaptive pooling to the ⌈h/sr⌉×⌈w/sr⌉ grid,
:func:`~mtlfast.nn.common.pool_to_grid`), LayerNorm, ``heads`` heads, residual, FFN with residual), then the
EMInteraction of that stage across the tasks (R = ``em_iters`` 5, the best in Fig. 6c; K = ``num_bases`` 64*,
EMANet's: SEM gives no number for K, only "the number of these bases corresponds to the total number of key
points" (§1) and K ≪ HW (§3.3); EMA momentum 0.9). Head per task: 3×3 conv + BN + ReLU and a 1×1 conv (the
"3×3 convolution block" of §4.4), resized to the input.

Open values*, with the reason for each default: ``dim`` 256 (our choice; the paper gives no decoder width);
``heads`` 2 (as BridgeNet's decoder attention, DESIGN.md §4; the paper gives no head count); ``offset_range``
2.0 (DAT's range factor: offsets of up to ``offset_range`` / 2 = 1 cell of the reference grid per axis, as
DAT's factor 2 gives); EM temperature τ = 1 (EMANet's softmax has none); ``detach_iterations`` False (the
paper's X̃ = A⁽ᴿ⁾μ⁽ᴿ⁾, with the gradient through all R iterations; True is a cheaper truncated gradient,
em_attention's detached mode, that reconstructs from one more E-step, A⁽ᴿ⁺¹⁾: a different forward. EMANet's own
code passes no gradient through its EM unit at all; :mod:`mtlfast.nn.sem`). No deep supervision: SEM trains
"with the same loss function as in [42]" (InvPT), whose intermediate terms supervise InvPT's preliminary
decoder, a part SEM does not have; we read it as InvPT's task losses and weights (DESIGN.md §5).

Stages under ``checkpoint_decoder`` (:mod:`mtlfast.models.base`): each task's intra-task attention, each
decoder stage (every task's lateral + refinement, then the EMInteraction: its EM bases are updated once per
step, as without checkpointing), each task's head.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlfast.models.base import MultiTaskModel, build_backbone, method
from mtlfast.nn import EMInteraction, HierarchyAdaptiveAttention
from mtlfast.nn.common import ConvBNAct, FeedForward, ProjectedAttention, pool_to_grid, resize, to_map, to_tokens

__all__ = ["SEM"]


class _SRAttention(nn.Module):
    """Spatial-reduction self-attention block on a map: x + Attn(LN(x), pool_sr(LN(x))), then the FFN; ``attn``
    (:class:`~mtlfast.nn.common.ProjectedAttention`) applies its own LayerNorm to the pooled tokens."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.sr = sr
        self.norm = nn.LayerNorm(dim)
        self.attn = ProjectedAttention(dim, heads=heads)
        self.ffn = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = to_tokens(x)
        normed = self.norm(tokens)
        pooled = pool_to_grid(to_map(normed, (h, w)), self.sr)
        y = tokens + self.attn(normed, to_tokens(pooled))
        return to_map(self.ffn(y), (h, w))


class SEM(MultiTaskModel):
    normals_loss_reduction = "pixel"  # "the same loss function as in [42]" (InvPT)

    def __init__(self, tasks, dataset, backbone, *, dim=256, heads=2, num_bases=64, em_iters=5, em_momentum=0.9,
                 detach_iterations=False, sr_ratios=None, offset_range=2.0) -> None:
        super().__init__(tasks, dataset, backbone)
        c = backbone.channels
        n = len(c)
        sr = list(sr_ratios) if sr_ratios is not None else [2 ** (n - 1 - i) for i in range(n)]
        if len(sr) != n:
            raise ValueError(f"sr_ratios: expected {n} values (one per stage, finest first), got {sr}")
        self.intra = nn.ModuleDict({t: HierarchyAdaptiveAttention(c, dim, heads=heads, offset_range=offset_range)
                                    for t in self.tasks})
        self.lateral = nn.ModuleDict({t: nn.ModuleList(ConvBNAct(ci, dim, 1) for ci in c) for t in self.tasks})
        self.refine = nn.ModuleDict({t: nn.ModuleList(_SRAttention(dim, heads, r) for r in sr) for t in self.tasks})
        self.inter = nn.ModuleList(EMInteraction(self.tasks, dim, num_bases=num_bases, n_iter=em_iters,
                                                 momentum=em_momentum, detach_iterations=detach_iterations)
                                   for _ in c)
        self.heads = nn.ModuleDict({t: nn.Sequential(ConvBNAct(dim, dim, 3), nn.Conv2d(dim, k, 1))
                                    for t, k in self.num_outputs.items()})

    def _decode(self, i: int, x: dict, feat: torch.Tensor) -> dict:
        """Decoder stage i: per task resize to encoder stage i + its lateral, refinement; then the EMInteraction."""
        size = feat.shape[-2:]
        x = {t: self.refine[t][i](resize(x[t], size) + self.lateral[t][i](feat)) for t in self.tasks}
        return self.inter[i](x)

    def _forward_train(self, images):
        feats = self.backbone(images)
        x = {t: self.stage(self.intra[t], feats) for t in self.tasks}
        for i in reversed(range(len(feats))):
            x = self.stage(self._decode, i, x, feats[i])
        return {t: resize(self.stage(self.heads[t], x[t]), images.shape[-2:]) for t in self.tasks}, {}


@method("sem")
def sem(tasks, *, backbone="vit_l", dataset="nyud", pretrained=None, img_size=None, backbone_kwargs=None, dim=256,
        heads=2, num_bases=64, em_iters=5, em_momentum=0.9, detach_iterations=False, sr_ratios=None,
        offset_range=2.0) -> SEM:
    return SEM(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs), dim=dim,
               heads=heads, num_bases=num_bases, em_iters=em_iters, em_momentum=em_momentum,
               detach_iterations=detach_iterations, sr_ratios=sr_ratios, offset_range=offset_range)
