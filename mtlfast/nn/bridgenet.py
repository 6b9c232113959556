"""BridgeNet's blocks (Zhang et al., "BridgeNet: Comprehensive and Effective Feature Interactions via Bridge
Feature for Multi-task Dense Predictions", §3.2–3.4): TaskPatternPropagation, BridgeFeatureExtractor,
TaskFeatureRefiner.

Task features are dicts ``{task: (B, C, H, W)}``; the attention runs through :func:`mtlfast.ops.tpp_attention`
and :func:`mtlfast.ops.attention` (BFE's in :class:`~mtlfast.nn.common.ProjectedAttention`), so the backend
switch applies.

Choices the paper leaves open (facts from the official code listed in DESIGN.md §4 where there are any):
- queries: depth-wise 3×3 conv at stride ``q_stride`` (2) + BN, then LayerNorm and a linear projection;
  keys/values: average pooling by ``kv_stride`` (an adaptive average pool to ⌈H/s⌉×⌈W/s⌉ cells, so that
  any size works), then LayerNorm and linear projections. 2 heads; the score scale is C_a^-0.5 of the
  full attention width C_a (not of the head width).
- after the attention: a linear output projection, the token map (at the query grid) resized bilinearly
  to the input size, the input added (the paper's "residual paths"), then the FFN (LayerNorm + MLP with
  ratio 4, GELU) with its own residual (§3.3: "a feed-forward network which is composed of a layer
  normalization and an MLP"); TPP uses "an FFN which has a similar structure in BFE".
- TPP's 1×1 conv over the concatenated maps is per task (``mix_weight`` (T, H, T·H)). Biases that cancel
  in the softmax are left out: the conv's bias, and a bias on the keys (it adds the same q·b to every
  score of a query row); both would only be parameters with an exactly zero gradient.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlfast.nn.common import FeedForward, ProjectedAttention, merge_heads, resize, split_heads, to_map, to_tokens
from mtlfast.ops.tpp_attention import tpp_attention

__all__ = ["TaskPatternPropagation", "BridgeFeatureExtractor", "TaskFeatureRefiner", "TFR_SIZES"]

#: TFR depth (number of layers M, eq. 7) of the paper's three sizes (§4.1).
TFR_SIZES = {"base": 2, "large": 4, "huge": 6}


def _pool_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average pooling by ``stride`` (adaptive, ⌈H/s⌉×⌈W/s⌉ cells) -> tokens (B, N, C)."""
    h, w = x.shape[-2:]
    return to_tokens(F.adaptive_avg_pool2d(x, (math.ceil(h / stride), math.ceil(w / stride))))


class _QueryEmbed(nn.Sequential):
    """Depth-wise 3×3 conv at ``stride`` + BN (the query patch embedding)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                         nn.BatchNorm2d(channels))


class TaskPatternPropagation(nn.Module):
    """Task Pattern Propagation, BridgeNet §3.2, eq. 1–2, on the task features of the coarsest scale.

    For every task j with feature P_j (B, C, H, W): Q_j (queries at stride ``q_stride``), K_j, V_j (keys and
    values pooled by ``kv_stride``), all of width C_a = ``dim`` split into ``heads`` heads;
        A_j = Q_j K_jᵀ / √C_a                                   (eq. 1, per head h: channel c = j·heads + h)
        Ā_t = Conv1×1_t(Concat(A_1, …, A_T))                     (per task t, T·heads -> heads maps)
        x_t = Softmax(Ā_t, -1) V_t                               (eq. 2)
    via :func:`mtlfast.ops.tpp_attention`; then y_t = P_t + Up(Linear(x_t)), out_t = y_t + MLP(LN(y_t)).
    Input and output: ``{task: (B, C, H, W)}`` for the ``tasks`` given at construction.
    """

    def __init__(self, tasks: Sequence[str], channels: int, dim: int | None = None, *, heads: int = 2,
                 q_stride: int = 2, kv_stride: int = 2, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        dim = dim or channels
        if dim % heads:
            raise ValueError(f"dim: attention width {dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.kv_stride = dim, heads, kv_stride
        t = len(self.tasks)
        self.q_embed = nn.ModuleDict({k: _QueryEmbed(channels, q_stride) for k in self.tasks})
        self.q_norm = nn.ModuleDict({k: nn.LayerNorm(channels) for k in self.tasks})
        self.kv_norm = nn.ModuleDict({k: nn.LayerNorm(channels) for k in self.tasks})
        self.q = nn.ModuleDict({k: nn.Linear(channels, dim) for k in self.tasks})
        self.k = nn.ModuleDict({k: nn.Linear(channels, dim, bias=False) for k in self.tasks})
        self.v = nn.ModuleDict({k: nn.Linear(channels, dim) for k in self.tasks})
        # Conv1×1 over the T·heads concatenated maps, one per task; default Conv2d init (bound 1/√fan_in).
        self.mix_weight = nn.Parameter(torch.empty(t, heads, t * heads).uniform_(-1, 1) / math.sqrt(t * heads))
        self.proj = nn.ModuleDict({k: nn.Linear(dim, channels) for k in self.tasks})
        self.ffn = nn.ModuleDict({k: FeedForward(channels, mlp_ratio * channels) for k in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        qs, ks, vs, grids = [], [], [], []
        for t in self.tasks:
            x = features[t]
            qmap = self.q_embed[t](x)
            grids.append(qmap.shape[-2:])
            qs.append(self.q[t](self.q_norm[t](to_tokens(qmap))))
            kv = self.kv_norm[t](_pool_tokens(x, self.kv_stride))
            ks.append(self.k[t](kv))
            vs.append(self.v[t](kv))
        q = split_heads(torch.stack(qs, 1), self.heads)  # (B, T, heads, Nq, dim / heads)
        k = split_heads(torch.stack(ks, 1), self.heads).to(q.dtype)
        v = split_heads(torch.stack(vs, 1), self.heads).to(q.dtype)
        out = merge_heads(tpp_attention(q, k, v, self.mix_weight.to(q.dtype), scale=self.dim ** -0.5))
        result = {}
        for i, t in enumerate(self.tasks):
            x = features[t]
            y = x + resize(to_map(self.proj[t](out[:, i]), grids[i]), x.shape[-2:])
            result[t] = to_map(self.ffn[t](to_tokens(y)), y.shape[-2:])
        return result


class BridgeFeatureExtractor(nn.Module):
    """Bridge Feature Extraction, BridgeNet §3.3, eq. 3–6, at one scale.

    S (B, C, H, W) task-generic, P_j (B, C_p, H_p, W_p) task-specific (j over every task):
        S̃ = Flat(Conv(S)) (stride ``q_stride``),   P̃_j = Flat(Pool(P_j)) (stride ``kv_stride``)   (eq. 3)
        Q = LP(S̃),  K = LP(Concat_j P̃_j),  V = LP(Concat_j P̃_j)   (eq. 4; tasks concatenated along tokens)
        x = Softmax(Q Kᵀ / √C_a) V                                    (eq. 5–6, ``heads`` heads, C_a = C)
    then y = S + Up(Linear(x)), S' = y + MLP(LN(y)) -> (B, C, H, W). Submodules: Q's LayerNorm ``q_norm``;
    ``attn`` (:class:`~mtlfast.nn.common.ProjectedAttention`, scale C^-0.5) with the tokens' LayerNorm, the
    projections of Q, K, V, the attention and the output Linear; ``ffn``.
    """

    def __init__(self, channels: int, task_channels: int | None = None, *, heads: int = 2, q_stride: int = 2,
                 kv_stride: int = 2, mlp_ratio: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels: attention width {channels} is not divisible by heads={heads}")
        self.kv_stride = kv_stride
        self.q_embed = _QueryEmbed(channels, q_stride)
        self.q_norm = nn.LayerNorm(channels)
        self.attn = ProjectedAttention(channels, task_channels, heads=heads, scale=channels ** -0.5)
        self.ffn = FeedForward(channels, mlp_ratio * channels)

    def forward(self, generic: torch.Tensor, task_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]):
        maps = list(task_features.values()) if isinstance(task_features, Mapping) else list(task_features)
        qmap = self.q_embed(generic)
        kv = torch.cat([_pool_tokens(p, self.kv_stride) for p in maps], dim=1)
        x = self.attn(self.q_norm(to_tokens(qmap)), kv)
        y = generic + resize(to_map(x, qmap.shape[-2:]), generic.shape[-2:])
        return to_map(self.ffn(to_tokens(y)), y.shape[-2:])


class _RefinerBlock(nn.Module):
    """x + Conv1×1(GELU(BN(DWConv3×3_d(GELU(BN(Conv1×1(Concat(x, S')))))))): 2C -> C/2 -> C/2 -> C."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        mid = max(1, channels // 2)
        self.body = nn.Sequential(
            nn.Conv2d(2 * channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, channels, 1))

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        return x + self.body(torch.cat([x, bridge], dim=1))


class TaskFeatureRefiner(nn.Module):
    """Task Feature Refiner, BridgeNet §3.4, eq. 7: x⁽ᵏ⁾ = TFRlayer⁽ᵏ⁾(Concat(S', x⁽ᵏ⁻¹⁾)), x⁽⁰⁾ = P_j,
    k = 1..M, with M = ``layers`` (an int or "base"/"large"/"huge" = 2/4/6), one refiner per task.

    Each TFR layer follows Hybrid Dilated Convolution: three depth-wise separable dilated blocks with
    dilations ``dilations`` (1, 2, 5); a block is Concat(x, S') -> 1×1 conv to C/2 -> BN, GELU -> depth-wise
    3×3 dilated conv -> BN, GELU -> 1×1 conv to C, added to x (the official code's block, DESIGN §4).
    The bridge S' is concatenated before every block. Input ``{task: (B, C, H, W)}`` and S' (B, C, H, W).
    """

    def __init__(self, tasks: Sequence[str], channels: int, layers: int | str = "base",
                 dilations: Sequence[int] = (1, 2, 5)) -> None:
        super().__init__()
        if isinstance(layers, str):
            if layers not in TFR_SIZES:
                raise ValueError(f"layers: unknown TFR size {layers!r}; valid choices: {', '.join(TFR_SIZES)} "
                                 f"or a number of layers")
            layers = TFR_SIZES[layers]
        if layers < 1:
            raise ValueError(f"layers: expected >= 1 TFR layers, got {layers}")
        self.tasks = tuple(tasks)
        self.refiners = nn.ModuleDict({
            t: nn.ModuleList(_RefinerBlock(channels, d) for _ in range(layers) for d in dilations)
            for t in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor], bridge: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.tasks:
            x = features[t]
            for block in self.refiners[t]:
                x = block(x, bridge)
            out[t] = x
        return out
