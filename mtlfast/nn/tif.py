"""TIF's blocks ("Task Interaction Free" multi-task decoders, §3.2–3.4): ScaleAttentiveFeatureFusion
(SA + SEFF), SelfFeatureDistillation (the two lowest scales), LowToHighDiffusion (the two highest).

Scales: X⁰..X³ at strides 4, 8, 16, 32 (eq. 1). All decoder features have one width ``dim`` (the SFD
key/value must match the feature it is added to, and LTHD mixes the scale-2 and scale-3 query/key maps,
so the paper's "low dimension" XL is common to every scale).

TIF has no public code; the choices its text leaves open:
- SA (eq. 2): P resizes every other scale bilinearly (align_corners=False) to the target scale; W_i is a
  1×1 conv + BN on their concatenation; XL^i is a 1×1 conv + BN of X^i (the paper's words).
- SFF (eq. 3): "two convolution layers and ReLU": 3×3 conv (2·dim -> dim) + ReLU + 3×3 conv on [XL, Y].
- SFD (eq. 6–10): ``Flat`` = flatten + LayerNorm. K = V = Σ_n Flat(X̂_t) W_n is a sum of linear maps of the
  same tokens, i.e. one linear map (one weight). Eq. 7 writes the query as Flat(X̂_0^i) W_tq; since §3.3
  restricts the SFD input to the target task's own feature, the query is taken from X̂_t^i too. Eq. 8 has
  no scale; the scores use dim^-0.5 (standard attention; one scale is needed so that LTHD can add
  the maps of two scales). One head.
- LTHD (eq. 11–13): the approximate map A⁰ = up(A³) + A² (up = bilinear along the query and key grids)
  is never formed: :func:`mtlfast.ops.lthd_attention` takes the SFD query/key tokens of scales 2 and 3.
  Pool = adaptive average pool of X̂_t^j to the scale-2 grid; W_t^j a linear map; FFN as in SFD but, as eq.
  13 reads, without eq. 10's residual; the result is resized to scale j and FeatureFuse ("convolutional
  layers followed by batch normalization") = 3×3 conv + BN, no activation, on [RX, X̂_t^j].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlfast.nn.common import ConvBNAct, FeedForward, check_sizes, check_stage_features, resize, to_map, to_tokens
from mtlfast.ops._checks import check_shapes
from mtlfast.ops.attention import attention
from mtlfast.ops.lthd_attention import lthd_attention

__all__ = ["ScaleAttentiveFeatureFusion", "SelfFeatureDistillation", "LowToHighDiffusion"]


class ScaleAttentiveFeatureFusion(nn.Module):
    """Scale Attentive Feature Fusion for target scale ``index`` (§3.2, Fig. 3, eq. 2–5):

        XL^i = BN(Conv1×1(X^i)),   Y^i = W_i(Concat_{j≠i} P(X^j))          (SA, eq. 2)
        SFX^i = SFF(XL^i, Y^i) + XL^i                                        (SEFF, eq. 3)
        X̂^i = Conv1×1(ReLU(GroupConv3×3(SFX^i)))   (groups = channels)     (eq. 4–5)

    ``forward(features)`` with the list of all scales (B, C_j, H_j, W_j) -> (B, dim, H_i, W_i).
    """

    def __init__(self, in_channels: Sequence[int], index: int, dim: int) -> None:
        super().__init__()
        check_sizes(dim=dim, **{f"in_channels[{i}]": c for i, c in enumerate(in_channels)})
        if not 0 <= index < len(in_channels):
            raise ValueError(f"index: expected a scale in 0..{len(in_channels) - 1}, got {index}")
        self.index, self.in_channels = index, list(in_channels)
        others = sum(c for j, c in enumerate(in_channels) if j != index)
        self.low = ConvBNAct(in_channels[index], dim, 1, act=None)
        self.align = ConvBNAct(others, dim, 1, act=None) if others else None
        self.sff = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.spatial = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mix = nn.Conv2d(dim, dim, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_stage_features(features, self.in_channels)
        target = features[self.index]
        low = self.low(target)
        if self.align is None:
            aligned = torch.zeros_like(low)
        else:
            size = target.shape[-2:]
            aligned = self.align(torch.cat([resize(f, size) for j, f in enumerate(features) if j != self.index], 1))
        sfx = self.sff(torch.cat([low, aligned], 1)) + low
        return self.mix(F.relu(self.spatial(sfx)))


class SelfFeatureDistillation(nn.Module):
    """Self-Feature Distillation of one task at one low scale (§3.3, Fig. 4, eq. 6–10):

        K = V = Flat(X̂_t) W_kv,  Q = Flat(X̂_t) W_q,  A = Q Kᵀ · dim^-0.5     (eq. 6–8)
        RX = Softmax(A) V + X̂_t,  RX = FFN(RX) + RX                           (eq. 9–10)

    via :func:`mtlfast.ops.attention`. ``forward(x)`` with x (B, dim, H, W) returns ``(RX (B, dim, H, W),
    q, k)``, q and k (B, H·W, dim) the factors of A, which :class:`LowToHighDiffusion` reuses.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        check_sizes(dim=dim, mlp_ratio=mlp_ratio)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim)
        self.ffn = FeedForward(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor):
        check_shapes({"dim": (self.dim, "the module")}, x=(x, "B dim H W"))
        tokens = self.norm(to_tokens(x))
        q, kv = self.q(tokens), self.kv(tokens)
        out = attention(q[:, None], kv[:, None], kv[:, None], scale=self.dim ** -0.5)[:, 0]
        refined = self.ffn(out + to_tokens(x))
        return to_map(refined, x.shape[-2:]), q, kv


class LowToHighDiffusion(nn.Module):
    """Low-To-High Scale Feature Diffusion of one task to one high scale j ∈ {0, 1} (§3.4, Fig. 5, eq. 11–13):

        A⁰ = up(A³) + A²,   RX = Softmax(A⁰) · Pool(X̂_t^j) W_t^j,   RX = FeatureFuse(FFN(RX), X̂_t^j)

    A² = q₂ k₂ᵀ · s and A³ = q₃ k₃ᵀ · s are the SFD maps of scales 2 and 3 (s = dim^-0.5), given by their
    factors; :func:`mtlfast.ops.lthd_attention` computes the attention without forming any of them.
    ``forward(x, fine, coarse)``: x (B, dim, H_j, W_j); fine = (q₂, k₂, (h₂, w₂)); coarse = (q₃, k₃, (h₃, w₃)).
    """

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        check_sizes(dim=dim, mlp_ratio=mlp_ratio)
        self.dim = dim
        self.value = nn.Linear(dim, dim)
        self.ffn = FeedForward(dim, mlp_ratio * dim, residual=False)  # eq. 13: FeatureFuse(FFN(RX), X̂), no "+ RX"
        self.fuse = ConvBNAct(2 * dim, dim, 3, act=None)

    def forward(self, x: torch.Tensor, fine, coarse) -> torch.Tensor:
        q_f, k_f, size_f = fine
        q_c, k_c, size_c = coarse
        check_shapes({"dim": (self.dim, "the module")}, x=(x, "B dim H W"),
                     **{"fine[0]": (q_f, "B Nf dim"), "coarse[0]": (q_c, "B Nc dim")})
        v = self.value(to_tokens(F.adaptive_avg_pool2d(x, tuple(size_f))))
        out = lthd_attention(q_f, k_f, q_c, k_c, v, tuple(size_f), tuple(size_c), scale=self.dim ** -0.5)
        refined = resize(to_map(self.ffn(out), size_f), x.shape[-2:])
        return self.fuse(torch.cat([refined, x], 1))
