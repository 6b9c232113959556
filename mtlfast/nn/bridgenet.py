"""BridgeNet's blocks (Zhang et al., "BridgeNet: Comprehensive and Effective Feature Interactions via Bridge
Feature for Multi-task Dense Predictions", §3.2–3.4): TaskPatternPropagation, BridgeFeatureExtractor,
TaskFeatureRefiner.

Task features are dicts ``{task: (B, C, H, W)}``; the attention runs through :func:`mtlfast.ops.tpp_attention`
and :func:`mtlfast.ops.attention`, so the backend switch applies.

What follows the official code (github.com/Evergreen0929/EEMTL, BridgeNet/, read for its structure only):
- BFE (its cross-attention block): queries by a depth-wise 3×3 conv at stride ``q_stride`` (2) + BN, then a
  linear projection (no LayerNorm on the queries); the task tokens LayerNorm'd (one LayerNorm, shared by
  the tasks) at their full resolution, then average-pooled by ``kv_stride`` (kernel = stride, no padding,
  ceil mode: a window cut by the border averages its valid cells) and concatenated along the tokens, then
  the key / value projections; 2 heads; score scale C^-0.5 of the full attention width C; a linear
  output projection, the token map (at the query grid) resized bilinearly to the input size and passed
  through a depth-wise 3×3 conv (with bias), added to the generic input S, then the FFN (LayerNorm + MLP,
  ratio 4, GELU) with its own residual.
- TFR: per task, a cascade of blocks Concat(x, S') -> 1×1 conv to C/2 -> BN, GELU -> depth-wise 3×3 conv
  with dilation cycling 1, 2, 5 -> BN, GELU -> 1×1 conv to C, added to x; S' is resized (bilinear) to the
  task feature's size and concatenated before every block. The official configs count blocks (REFINE_DEPTH
  6 / 12 / 18 = the paper's 2 / 4 / 6 layers of three blocks).
- TPP: 2 heads, queries by a depth-wise conv + BN at stride 2, the per-task 1×1 mixing of all T·H score
  maps (DESIGN.md §4; the official TPP block's own file is not in the public snapshot that was read).

What follows the paper: eq. 1–2 (TPP), eq. 3–6 and the up-sampling + FFN of §3.3 (BFE), eq. 7 and the HDC
dilations 1, 2, 5 (TFR), the three TFR sizes base / large / huge = 2 / 4 / 6 layers (§4.1).

Open choices (*):
- * TPP's queries are LayerNorm'd per task after the depth-wise conv + BN (BFE's are not, as in the official
  code; TPP's file is missing there): its queries and keys then meet at the same scale in the mixed scores.
- * TPP's keys / values are pooled like BFE's (stride ``kv_stride`` 2, ceil mode) and LayerNorm'd after
  the pooling; TPP's output: y = P + Up(Linear(x)), out = y + MLP(LN(y)) ("an FFN which has a similar
  structure in BFE", §3.2).
- * biases that cancel are left out: the key projection's (it adds the same q·b to every score of a query
  row, softmax removes it; the kernels centre the keys), TPP's mixing-conv bias (constant along the
  softmax axis), and the bias of the TFR block's first 1×1 conv (BatchNorm follows and removes it). The
  official code has them; each would be a parameter with an exactly zero gradient.
- * stochastic depth: the official decoder spec sets DROP_PATH_RATE 0.15 for each stage (and linspace(0,
  0.15, 1) = 0 for its TPP blocks, transformer_decoder.py); how its stage blocks spread the rate is in the
  decoder file the public snapshot lacks. Here: the TFR blocks only (``drop_path``, rising linearly from 0
  within each stage as CvT / InvPT stages do; the ViT configs set 0.15), none in TPP and BFE.
- * PyTorch's default initialisation (the official decoder's init is in the missing file as well).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlfast.nn.common import (ChannelNorm, DropPath, FeedForward, ProjectedAttention, check_sizes,
                                check_task_features, check_task_names, merge_heads, resize, split_heads, to_map,
                                to_tokens)
from mtlfast.ops.tpp_attention import tpp_attention

__all__ = ["TaskPatternPropagation", "BridgeFeatureExtractor", "TaskFeatureRefiner", "TFR_SIZES"]

#: TFR depth (number of layers M, eq. 7) of the paper's three sizes (§4.1).
TFR_SIZES = {"base": 2, "large": 4, "huge": 6}


def _pool_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average pooling by ``stride`` (kernel = stride, ceil mode: ⌈H/s⌉×⌈W/s⌉ cells, a border cell averages
    only its valid positions) -> tokens (B, N, C)."""
    return to_tokens(F.avg_pool2d(x, stride, stride, ceil_mode=True))


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
        self.tasks = check_task_names(tasks)
        check_sizes(channels=channels, dim=dim, heads=heads, q_stride=q_stride, kv_stride=kv_stride,
                    mlp_ratio=mlp_ratio)
        dim = dim or channels
        if dim % heads:
            raise ValueError(f"dim: attention width {dim} is not divisible by heads={heads}")
        self.channels, self.dim, self.heads, self.kv_stride = channels, dim, heads, kv_stride
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
        check_task_features(features, self.tasks, channels=self.channels)
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
        k = split_heads(torch.stack(ks, 1), self.heads)
        v = split_heads(torch.stack(vs, 1), self.heads)
        out = merge_heads(tpp_attention(q, k, v, self.mix_weight, scale=self.dim ** -0.5))
        result = {}
        for i, t in enumerate(self.tasks):
            x = features[t]
            y = x + resize(to_map(self.proj[t](out[:, i]), grids[i]), x.shape[-2:])
            result[t] = to_map(self.ffn[t](to_tokens(y)), y.shape[-2:])
        return result


class BridgeFeatureExtractor(nn.Module):
    """Bridge Feature Extraction, BridgeNet §3.3, eq. 3–6, at one scale.

    S (B, C, H, W) task-generic, P_j (B, C_p, H_p, W_p) task-specific (j over every task, all of one size):
        S̃ = Flat(DWConv_d(S)),   P̃_j = Flat(Pool_l(LN(P_j)))                  (eq. 3; d = ``q_stride``,
                                                                                l = ``kv_stride``)
        Q = S̃ W_q + b_q,  K = Concat_j(P̃_j) W_k,  V = Concat_j(P̃_j) W_v + b_v  (eq. 4, tasks along tokens)
        x = Softmax(Q Kᵀ / √C) V                                               (eq. 5–6, ``heads`` heads)
    then y = S + DWConv3×3(Up(x W_o + b_o)) (Up: bilinear, query grid -> H×W), S' = y + MLP(LN(y))
    -> (B, C, H, W). DWConv_d is a depth-wise 3×3 conv at stride d + BN, LN one LayerNorm over the channels
    shared by the tasks, Pool_l an average pooling (ceil mode) by l. Submodules ``q_embed``, ``kv_norm``,
    ``attn`` (:class:`~mtlfast.nn.common.ProjectedAttention` without its own LayerNorm: q, k, v, proj),
    ``restore`` (the depth-wise conv after the up-sampling), ``ffn``.
    """

    def __init__(self, channels: int, task_channels: int | None = None, *, heads: int = 2, q_stride: int = 2,
                 kv_stride: int = 2, mlp_ratio: int = 4) -> None:
        super().__init__()
        check_sizes(channels=channels, task_channels=task_channels, heads=heads, q_stride=q_stride,
                    kv_stride=kv_stride, mlp_ratio=mlp_ratio)
        if channels % heads:
            raise ValueError(f"channels: attention width {channels} is not divisible by heads={heads}")
        task_channels = task_channels or channels
        self.channels, self.task_channels, self.kv_stride = channels, task_channels, kv_stride
        self.q_embed = _QueryEmbed(channels, q_stride)
        self.kv_norm = ChannelNorm(task_channels)  # before the pooling, so not the attention's own
        self.attn = ProjectedAttention(channels, task_channels, heads=heads, scale=channels ** -0.5, kv_norm=False)
        self.restore = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.ffn = FeedForward(channels, mlp_ratio * channels)

    def forward(self, generic: torch.Tensor, task_features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]):
        if isinstance(task_features, torch.Tensor) or not isinstance(task_features, (Mapping, Sequence)):
            raise TypeError(f"task_features: expected a dict {{task: (B, C_p, H_p, W_p) tensor}} or a list of such "
                            f"maps, got {type(task_features).__name__}")
        named = task_features if isinstance(task_features, Mapping) else dict(enumerate(task_features))
        check_task_features(named, None, "task_features", channels=self.task_channels,
                            generic=(generic, f"B {self.channels} * *"))
        maps = list(named.values())
        qmap = self.q_embed(generic)
        kv = torch.cat([_pool_tokens(self.kv_norm(p), self.kv_stride) for p in maps], dim=1)
        x = self.attn(to_tokens(qmap), kv)
        y = generic + self.restore(resize(to_map(x, qmap.shape[-2:]), generic.shape[-2:]))
        return to_map(self.ffn(to_tokens(y)), y.shape[-2:])


class _RefinerBlock(nn.Module):
    """x + DropPath(Conv1×1(GELU(BN(DWConv3×3_d(GELU(BN(Conv1×1(Concat(x, S'))))))))): 2C -> C/2 -> C/2 -> C."""

    def __init__(self, channels: int, dilation: int, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = max(1, channels // 2)
        self.body = nn.Sequential(
            nn.Conv2d(2 * channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, channels, 1))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.body(torch.cat([x, bridge], dim=1)))


class TaskFeatureRefiner(nn.Module):
    """Task Feature Refiner, BridgeNet §3.4, eq. 7: x⁽ᵏ⁾ = TFRlayer⁽ᵏ⁾(Concat(S', x⁽ᵏ⁻¹⁾)), x⁽⁰⁾ = P_j,
    k = 1..M, with M = ``layers`` (an int or "base"/"large"/"huge" = 2/4/6), one refiner per task.

    Each TFR layer follows Hybrid Dilated Convolution: three depth-wise separable dilated blocks with
    dilations ``dilations`` (1, 2, 5); a block is Concat(x, S') -> 1×1 conv to C/2 -> BN, GELU -> depth-wise
    3×3 dilated conv -> BN, GELU -> 1×1 conv to C, added to x (the official code's block). S' is resized
    (bilinear) to the task features' size and concatenated before every block. Input ``{task: (B, C, H, W)}``
    and S' (B, C, H', W').

    ``drop_path``: stochastic depth of the blocks' residual branches in training, the rate rising linearly
    from 0 at the first block to ``drop_path`` at the last (official stages: 0.15; module docstring).
    """

    def __init__(self, tasks: Sequence[str], channels: int, layers: int | str = "base",
                 dilations: Sequence[int] = (1, 2, 5), drop_path: float = 0.0) -> None:
        super().__init__()
        if isinstance(layers, str):
            if layers not in TFR_SIZES:
                raise ValueError(f"layers: unknown TFR size {layers!r}; valid choices: {', '.join(TFR_SIZES)} "
                                 f"or a number of layers")
            layers = TFR_SIZES[layers]
        if layers < 1:
            raise ValueError(f"layers: expected >= 1 TFR layers, got {layers}")
        check_sizes(channels=channels)
        self.tasks = check_task_names(tasks)
        self.channels = channels
        blocks = layers * len(dilations)
        rates = [drop_path * i / max(1, blocks - 1) for i in range(blocks)]
        self.refiners = nn.ModuleDict({
            t: nn.ModuleList(_RefinerBlock(channels, d, rate) for d, rate in zip(list(dilations) * layers, rates))
            for t in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor], bridge: torch.Tensor) -> dict[str, torch.Tensor]:
        check_task_features(features, self.tasks, channels=self.channels, bridge=(bridge, "B C Hb Wb"))
        out = {}
        for t in self.tasks:
            x = features[t]
            guide = resize(bridge, x.shape[-2:])
            for block in self.refiners[t]:
                x = block(x, guide)
            out[t] = x
        return out
