"""Blocks of the iterative-fusion TPIM network ("Cross-task interaction with iterative fusion", §3.2–3.4):
IterativeFusionBlock, CrossTaskInteractionBlock, TaskPairInteraction.

The paper has no public code; its open choices are written here:
- ↓sc (eq. 2) is adaptive average pooling (:func:`~mtlfast.nn.common.pool_to_grid`) to an h×w = ⌈H/sc⌉×⌈W/sc⌉
  grid: output row i averages input rows ⌊i·H/h⌋ .. ⌈(i+1)·H/h⌉ − 1 (columns alike), so disjoint windows of
  H/h rows where h divides H (sc×sc cells where sc divides H and W), else windows that overlap; no pooling at
  sc = 1. ↑sc (eq. 3) is a bilinear resize back to the target's size. P_Q, P_K reduce to ``dim`` channels
  (default C/4), P_V keeps C so that V_{s→t} can be added to the self-attention term (eq. 4); each P_* is a
  1×1 conv + BN + ReLU as the paper says.
- Co_{s→t} = softmax(Q Kᵀ / √d) with the softmax over the *source* pixels, so that row i of Co weights
  the source values V for target pixel i; d = ``dim``.
- F_s and F_m of the self-attention (eq. 1) are 3×3 convolutions without bias (as MTI-Net's
  distillation, which the branch mirrors).
- In :class:`TaskPairInteraction` every ordered pair (s, t), s ≠ t, has its own CIB weights. Whether the pairs
  share α the paper does not say: each CIB has an IFB (§3.3, eq. 3), and "the learnable parameter α is one of
  the CNN model parameters" (§3.4). By default they share one α (``shared_alpha=True``), so that all pairs ×
  batch go through one :func:`mtlfast.ops.iterative_fusion` call per layer; ``shared_alpha=False`` gives each
  pair its own α (one call per pair). Both start at the initial α of Table 4 (0.3).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from mtlfast.nn.common import (ConvBNAct, check_sizes, check_task_features, check_task_names, pool_to_grid, resize,
                                to_map, to_tokens)
from mtlfast.ops._checks import check_shapes
from mtlfast.ops.iterative_fusion import MODES, VARIANTS, iterative_fusion

__all__ = ["IterativeFusionBlock", "CrossTaskInteractionBlock", "TaskPairInteraction"]


class IterativeFusionBlock(nn.Module):
    """Iterative Fusion Block (§3.4, eq. 6–8) on Co = softmax(scale · q kᵀ, -1) and V⁰ = v:
    A: Vᵗ⁺¹ = Co Vᵗ;  B: Vᵗ⁺¹ = α Co Vᵗ + Vᵗ;  C: Vᵗ⁺¹ = α Co Vᵗ + (1 − α) Vᵗ;  returns Vⁿ.

    α is a learnable scalar initialised to ``alpha`` (0.3, Table 4) for B and C; variant A has no α.
    ``n_iter``: 18 on NYUD-v2, 4 on PASCAL (§4.3). ``mode`` goes to :func:`mtlfast.ops.iterative_fusion`
    (materialised Co or flash-style recomputation). q, k (B, N, D), v (B, N, C) -> (B, N, C).
    """

    def __init__(self, n_iter: int, variant: str = "C", alpha: float = 0.3, mode: str = "auto") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown IFB variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
        check_sizes(n_iter=n_iter)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.n_iter, self.variant, self.mode = n_iter, variant, mode
        if variant == "A":  # unused by the update; kept as a buffer because the op takes a tensor
            self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        else:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return iterative_fusion(q, k, v, self.alpha, self.n_iter, scale=scale, variant=self.variant, mode=self.mode)

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}, variant={self.variant!r}, mode={self.mode!r}"


class CrossTaskInteractionBlock(nn.Module):
    """Cross-task Interaction Block (§3.3, Fig. 2) from source task s to target task t:

        self_{s→t} = F_s(f_s) ⊙ σ(F_m(f_s))                                        (eq. 1)
        Q = P_Q(↓sc f_t), K = P_K(↓sc f_s), V = P_V(↓sc f_s), Co = softmax(Q Kᵀ/√d) (eq. 2)
        V_{s→t} = ↑sc IFB(V, Co)                                                    (eq. 3)
        f_{s→t} = self_{s→t} + V_{s→t}                                              (eq. 4)

    f_s, f_t (B, C, H, W) -> (B, C, H, W). With ``fusion=None`` the block owns an IterativeFusionBlock built
    from ``n_iter``/``variant``/``alpha``; :class:`TaskPairInteraction` builds its CIBs without one
    (``own_fusion=False``) and runs :meth:`prepare` / :meth:`combine` around a batched fusion.
    """

    def __init__(self, channels: int, dim: int | None = None, *, downscale: int = 2, n_iter: int = 18,
                 variant: str = "C", alpha: float = 0.3, mode: str = "auto", own_fusion: bool = True) -> None:
        super().__init__()
        check_sizes(channels=channels, dim=dim, downscale=downscale)
        self.dim = dim or max(1, channels // 4)
        self.channels, self.downscale = channels, downscale
        self.f_s = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.f_m = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.p_q = ConvBNAct(channels, self.dim, 1)
        self.p_k = ConvBNAct(channels, self.dim, 1)
        self.p_v = ConvBNAct(channels, channels, 1)
        self.fusion = IterativeFusionBlock(n_iter, variant, alpha, mode) if own_fusion else None

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downscale == 1 else pool_to_grid(x, self.downscale)

    def prepare(self, source: torch.Tensor, target: torch.Tensor):
        """-> (q, k, v tokens (B, n, ·), the self-attention term (B, C, H, W), the reduced grid (h, w))."""
        self_term = self.f_s(source) * torch.sigmoid(self.f_m(source))
        small_s, small_t = self._down(source), self._down(target)
        q = to_tokens(self.p_q(small_t))
        k = to_tokens(self.p_k(small_s))
        v = to_tokens(self.p_v(small_s))
        return q, k, v, self_term, small_t.shape[-2:]

    @staticmethod
    def combine(fused: torch.Tensor, self_term: torch.Tensor, grid) -> torch.Tensor:
        return self_term + resize(to_map(fused, grid), self_term.shape[-2:])

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fusion is None:
            raise RuntimeError("this CrossTaskInteractionBlock was built without its own fusion (own_fusion=False)")
        check_shapes({"C": (self.channels, "the module")}, source=(source, "B C H W"), target=(target, "B C H W"))
        q, k, v, self_term, grid = self.prepare(source, target)
        return self.combine(self.fusion(q, k, v, scale=self.dim ** -0.5), self_term, grid)


class TaskPairInteraction(nn.Module):
    """Task Pair Interaction Module (§3.2, Fig. 1): one CIB per ordered pair (s, t), s ≠ t, and per target
    the aggregation (eq. 5) f°_t = f_t + Σ_{s≠t} f_{s→t} (the pair (t, t) is the identity).

    ``targets`` (default: all ``tasks``) are the tasks whose refined features are computed and returned; every
    task of ``tasks`` is a source (auxiliary tasks: sources only). With ``shared_alpha`` (default) the pairs share
    one α and all pairs × B batch elements go through one :func:`mtlfast.ops.iterative_fusion` call; without, each
    pair's CIB has its own IterativeFusionBlock (α) and one call. Input ``{task: (B, C, H, W)}`` for ``tasks``,
    output for ``targets``; without pairs (one task) the module returns its targets' inputs.
    """

    def __init__(self, tasks: Sequence[str], channels: int, dim: int | None = None, *, downscale: int = 2,
                 n_iter: int = 18, variant: str = "C", alpha: float = 0.3, mode: str = "auto",
                 targets: Sequence[str] | None = None, shared_alpha: bool = True) -> None:
        super().__init__()
        self.tasks = check_task_names(tasks)
        self.targets = self.tasks if targets is None else check_task_names(targets, "targets")
        unknown = [t for t in self.targets if t not in self.tasks]
        if unknown:
            raise ValueError(f"targets: {unknown} are not among tasks {list(self.tasks)}")
        self.pairs = [(s, t) for t in self.targets for s in self.tasks if s != t]
        if not isinstance(shared_alpha, bool):
            raise TypeError(f"shared_alpha: expected True or False, got {shared_alpha!r}")
        self.cib = nn.ModuleDict({f"{s}_to_{t}": CrossTaskInteractionBlock(
            channels, dim, downscale=downscale, n_iter=n_iter, variant=variant, alpha=alpha, mode=mode,
            own_fusion=not shared_alpha) for s, t in self.pairs})
        # one task: no pairs, no fusion (so no parameter outside the graph)
        self.fusion = IterativeFusionBlock(n_iter, variant, alpha, mode) if self.pairs and shared_alpha else None
        self.channels, self.dim = channels, dim or max(1, channels // 4)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_task_features(features, self.tasks, channels=self.channels)
        if not self.pairs:
            return {t: features[t] for t in self.targets}
        out = dict(features)
        prepared = [self.cib[f"{s}_to_{t}"].prepare(features[s], features[t]) for s, t in self.pairs]
        scale = self.dim ** -0.5
        if self.fusion is not None:  # one α: all pairs in one call
            q, k, v = (torch.cat([p[i] for p in prepared]) for i in range(3))
            fused = self.fusion(q, k, v, scale=scale).chunk(len(self.pairs))
        else:
            fused = [self.cib[f"{s}_to_{t}"].fusion(*p[:3], scale=scale) for (s, t), p in zip(self.pairs, prepared)]
        for (s, t), (_, _, _, self_term, grid), f in zip(self.pairs, prepared, fused):
            out[t] = out[t] + CrossTaskInteractionBlock.combine(f, self_term, grid)
        return {t: out[t] for t in self.targets}
