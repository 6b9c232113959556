"""Small building blocks shared by the papers' modules: conv-BN-activation, ResNet blocks, squeeze-and-
excitation, the transformer feed-forward network, the projected multi-head attention of BridgeNet's BFE and
SEM (:class:`ProjectedAttention`), token <-> feature-map reshapes, the adaptive pooling of SEM's decoder and
the TPIM block (:func:`pool_to_grid`), the blocks' input checks, and activation checkpointing of a model
stage that keeps module buffers exact (:func:`checkpoint_stage`).

Conventions: feature maps are (B, C, H, W); token sequences are (B, N, C) with N = H·W in row-major
order (``x.flatten(2).transpose(1, 2)``); multi-head tensors are (B, heads, N, C / heads).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from mtlfast.backends import BackendScope
from mtlfast.ops._checks import check_positive_int, check_shapes
from mtlfast.ops.attention import attention

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "SEBlock", "FeedForward", "ChannelNorm", "ProjectedAttention",
           "to_tokens", "to_map", "split_heads", "merge_heads", "resize", "checkpoint_stage", "record_checkpoints",
           "check_task_names", "check_sizes", "check_task_features", "check_stage_features", "pool_to_grid"]


def check_task_names(tasks, name: str = "tasks") -> tuple[str, ...]:
    """A non-empty sequence of distinct task names, as a tuple (a bare string would become its letters)."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"{name}: expected a non-empty list of task names, got {tasks!r}")
    names = tuple(tasks)
    if len(set(names)) != len(names) or not all(isinstance(t, str) for t in names):
        raise ValueError(f"{name}: expected distinct task names (strings), got {list(names)}")
    return names


def check_sizes(**sizes) -> None:
    """Every given size (width, head count, stride, ratio, ...) is an integer >= 1; None means "default"."""
    for name, value in sizes.items():
        if value is not None:
            check_positive_int(name, value)


def check_task_features(features, tasks: Sequence[str] | None, name: str = "features", *, channels: int | None = None,
                        **others: tuple[torch.Tensor, str]) -> dict[str, int]:
    """``features`` holds a (B, C, H, W) map of one shape for every task of ``tasks`` (None: every map it holds,
    at least one), C = ``channels`` where given (the module's width); ``others`` are more ``name=(tensor, spec)``
    checked with them (:func:`~mtlfast.ops._checks.check_shapes`, sharing the symbols B, C, H, W). Shapes only,
    so no device sync. Returns the sizes by symbol."""
    if not isinstance(features, Mapping):
        raise TypeError(f"{name}: expected a dict {{task: (B, C, H, W) tensor}}, got {type(features).__name__}")
    if tasks is None:
        tasks = list(features)
        if not tasks:
            raise ValueError(f"{name}: expected at least one (B, C, H, W) feature map, got none")
    missing = [t for t in tasks if t not in features]
    if missing:
        raise KeyError(f"{name}: no feature map for tasks {missing} (got {sorted(features)})")
    known = {"C": (channels, "the module")} if channels is not None else None
    return check_shapes(known, **{f"{name}[{t!r}]": (features[t], "B C H W") for t in tasks}, **others)


def check_stage_features(features, in_channels: Sequence[int], name: str = "features") -> None:
    """``features`` is a list of one (B, C_s, H_s, W_s) map per stage, C_s = ``in_channels[s]`` (the module's), one
    batch size B; the stage sizes are free. Shapes only."""
    stages = len(in_channels)
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
        raise TypeError(f"{name}: expected a list of {stages} (B, C_s, H_s, W_s) tensors (one per stage), "
                        f"got {type(features).__name__}")
    if len(features) != stages:
        raise ValueError(f"{name}: expected {stages} maps (one per stage, channels {list(in_channels)}), "
                         f"got {len(features)}")
    check_shapes(**{f"{name}[{s}]": (f, f"B {c} * *") for s, (f, c) in enumerate(zip(features, in_channels))})


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, C, H, W) to ``size`` = (H', W'); identity if equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pool_to_grid(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Adaptive average pooling (``F.adaptive_avg_pool2d``) of (B, C, H, W) to (B, C, h, w), h = ⌈H/factor⌉,
    w = ⌈W/factor⌉: output row i averages input rows ⌊i·H/h⌋ .. ⌈(i+1)·H/h⌉ − 1 (columns alike), i.e. disjoint
    windows of H/h rows where h divides H (factor×factor blocks where ``factor`` divides the size), else windows
    that overlap. (BridgeNet's pooling is another one: disjoint windows, ceil mode, :mod:`mtlfast.nn.bridgenet`.)"""
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (math.ceil(h / factor), math.ceil(w / factor)))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_map(tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W) for ``size`` = (H, W)."""
    b, n, c = tokens.shape
    h, w = size
    if n != h * w:
        raise ValueError(f"tokens: expected {h}x{w}={h * w} tokens, got {n}")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, C) -> (..., heads, N, C / heads); channel c = head · (C / heads) + j."""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, heads, c // heads).movedim(-2, -3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, N, D) -> (..., N, heads · D), the inverse of :func:`split_heads`."""
    x = x.movedim(-3, -2)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation (``act=None``: none). 'same' padding for odd kernels."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1,
                 dilation: int = 1, act: type[nn.Module] | None = nn.ReLU) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)), the
    shortcut a 1x1 conv + BN when the width or stride changes (as in torchvision's ``BasicBlock``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (ConvBNAct(cin, cout, 1, stride=stride, act=None)
                           if cin != cout or stride != 1 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: relu(body(x) + shortcut(x)), body = 1x1 (cin -> cout/4), 3x3, 1x1 (-> cout), each
    with BN; the shortcut a 1x1 conv + BN when the width changes (``cout=None``: cout = cin)."""

    def __init__(self, cin: int, cout: int | None = None, reduction: int = 4) -> None:
        super().__init__()
        cout = cin if cout is None else cout
        mid = max(1, cout // reduction)
        self.body = nn.Sequential(ConvBNAct(cin, mid, 1), ConvBNAct(mid, mid, 3), ConvBNAct(mid, cout, 1, act=None))
        self.shortcut = ConvBNAct(cin, cout, 1, act=None) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.body(x))


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): x ⊙ σ(W₂ relu(W₁ mean_hw(x))), W₁: C -> max(1, C // r)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        check_sizes(channels=channels, reduction=reduction)
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class FeedForward(nn.Module):
    """Transformer feed-forward on tokens (..., C): x + W₂ GELU(W₁ LayerNorm(x)), or without the residual
    (``residual=False``: W₂ GELU(W₁ LayerNorm(x))) where a paper's equation adds none (TIF eq. 13)."""

    def __init__(self, dim: int, hidden: int | None = None, *, residual: bool = True) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.residual = residual
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(F.gelu(self.fc1(self.norm(x))))
        return x + out if self.residual else out


class DropPath(nn.Module):
    """Stochastic depth of a residual branch (Huang et al., 2016): in training each sample's branch is zeroed
    with probability ``p`` and the kept ones scaled by 1/(1-p), so the expectation is unchanged; the identity
    in eval mode and at p = 0. Input (B, ...)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"drop_path: expected a probability in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of every position of a (B, C, H, W) map (parameters as nn.LayerNorm(C))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ProjectedAttention(nn.Module):
    """Multi-head attention of given queries over (LayerNorm'd) key/value tokens, with its projections:

        X = LN(kv_tokens) (``kv_norm=False``: X = kv_tokens),  Q = queries W_q + b_q,  K = X W_k,  V = X W_v + b_v
        out = Concat_h(softmax(scale · Q_h K_hᵀ) V_h) W_o + b_o        (``heads`` heads of width dim / heads)

    ``forward(queries, kv_tokens)``: queries (B, Nq, dim), normalised by the caller (where and how differs
    between the blocks), kv_tokens (B, Nk, kv_dim) -> (B, Nq, dim), through :func:`mtlfast.ops.attention`
    (the backend switch applies). ``scale=None``: (dim / heads)^-0.5, the head width. W_k has no bias: it
    would add the same q·b_k to every score of a query row, which cancels in the softmax (and the kernels
    centre the keys, :func:`mtlfast.ops.attention.center_keys`), so it would only be a parameter with an
    exactly zero gradient (under autocast the op casts q, k, v to its dtype). Submodules ``kv_norm`` (an
    Identity with ``kv_norm=False``, for callers that normalise before pooling the tokens), ``q``, ``k``,
    ``v``, ``proj``; no residual, the caller adds it.
    """

    def __init__(self, dim: int, kv_dim: int | None = None, *, heads: int, scale: float | None = None,
                 kv_norm: bool = True) -> None:
        super().__init__()
        check_sizes(dim=dim, kv_dim=kv_dim, heads=heads)
        if dim % heads:
            raise ValueError(f"dim: attention width {dim} is not divisible by heads={heads}")
        kv_dim = kv_dim or dim
        self.dim, self.kv_dim, self.heads, self.scale = dim, kv_dim, heads, scale
        self.kv_norm = nn.LayerNorm(kv_dim) if kv_norm else nn.Identity()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, kv_tokens: torch.Tensor) -> torch.Tensor:
        check_shapes({"dim": (self.dim, "the module"), "kv_dim": (self.kv_dim, "the module")},
                     queries=(queries, "B Nq dim"),
                     kv_tokens=(kv_tokens, "B Nk kv_dim"))
        kv = self.kv_norm(kv_tokens)
        q = split_heads(self.q(queries), self.heads)
        k = split_heads(self.k(kv), self.heads)
        v = split_heads(self.v(kv), self.heads)
        return self.proj(merge_heads(attention(q, k, v, scale=self.scale)))


class _BufferReplay:
    """The two contexts (forward, recomputation) of one :func:`checkpoint_stage` call.

    Forward: a process-wide module forward pre-hook, active only while the stage runs, copies the buffers
    of every module whose forward is called, before its first call. Recomputation: those modules' current
    buffers are set aside, the copies are loaded, the stage runs again (the recomputation may stop early,
    once it has every tensor the backward needs), and the set-aside values are loaded back."""

    def __init__(self) -> None:
        self.before: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    @staticmethod
    def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in module.named_buffers(recurse=False)}

    @staticmethod
    def _load(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
        current = dict(module.named_buffers(recurse=False))
        with torch.no_grad():
            for name, value in values.items():
                current[name].copy_(value)

    def _record(self, module: nn.Module, _args) -> None:
        if id(module) not in self.before:
            self.before[id(module)] = (module, self._copy(module))

    def contexts(self) -> tuple["_ForwardContext", "_RecomputeContext"]:
        return _ForwardContext(self), _RecomputeContext(self, BackendScope.capture())


class _ForwardContext:
    def __init__(self, replay: _BufferReplay) -> None:
        self.replay, self.handle = replay, None

    def __enter__(self) -> None:
        self.handle = register_module_forward_pre_hook(self.replay._record)

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class _RecomputeContext:
    """Reusable: a second backward through a retained graph recomputes the stage again. The recomputation
    runs under the backend scope of the forward (``scope``)."""

    def __init__(self, replay: _BufferReplay, scope: BackendScope) -> None:
        self.replay, self.scope, self.current, self.scoped = replay, scope, [], None

    def __enter__(self) -> None:
        stateful = [(m, values) for m, values in self.replay.before.values() if values]
        self.current = [(m, self.replay._copy(m)) for m, _ in stateful]
        for module, values in stateful:
            self.replay._load(module, values)
        self.scoped = self.scope.active()
        self.scoped.__enter__()

    def __exit__(self, *exc) -> None:
        scoped, self.scoped = self.scoped, None
        scoped.__exit__(*exc)
        current, self.current = self.current, []
        for module, values in current:
            self.replay._load(module, values)


#: torch.utils.checkpoint.checkpoint's own keyword arguments (the others go to the checkpointed function).
_CHECKPOINT_OPTIONS = ("use_reentrant", "context_fn", "determinism_check", "debug", "preserve_rng_state")


@contextlib.contextmanager
def record_checkpoints(on_call: Callable[[Callable[..., Any], tuple, dict], None] | None = None,
                       ) -> Iterator[list[tuple[Callable[..., Any], tuple, dict]]]:
    """Yields a list that collects every activation checkpoint taken in the block (``torch.utils.checkpoint.
    checkpoint``: :func:`checkpoint_stage`'s and timm's per-block ones alike) as ``(function, args, kwargs)``:
    the tensors in ``args`` are what checkpointing keeps alive for the recomputation, which no saved-tensor hook
    sees, and ``function(*args, **kwargs)`` is the recomputation (memory accounting:
    bench.harness.saved_activation_bytes). ``on_call(function, args, kwargs)`` runs as each checkpoint is taken,
    before it runs. The function is wrapped process-wide while the block runs; not for checkpoints that
    torch.compile traces (Dynamo, torch 2.11, cannot bind the wrapped call: fullgraph fails)."""
    recorded: list[tuple[Callable[..., Any], tuple, dict]] = []
    plain = torch.utils.checkpoint.checkpoint

    def recording(function, *args, **kwargs):
        recorded.append((function, args, {k: v for k, v in kwargs.items() if k not in _CHECKPOINT_OPTIONS}))
        if on_call is not None:
            on_call(*recorded[-1])
        return plain(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = recording
    try:
        yield recorded
    finally:
        torch.utils.checkpoint.checkpoint = plain


@torch.compiler.disable
def checkpoint_stage(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``): the
    activations ``fn`` saves for backward are dropped after the forward and recomputed by running ``fn`` again
    during the backward. ``args`` and the result may be tensors, lists/dicts of tensors, or anything else.

    Module buffers stay exactly those of one plain call. Plain checkpointing runs the forward of every module
    in ``fn`` twice in a training step, so buffers updated in forward (BatchNorm's running statistics and
    ``num_batches_tracked``, SEM's EM bases :class:`mtlfast.nn.em_bases.EMBases`) would get two updates, and
    a module that reads a buffer it updates (EMBases reads μ⁽⁰⁾, then blends the new bases into it) would
    recompute from the updated value, i.e. compute other gradients. Here the buffers of every module called
    in ``fn`` are copied before its first call; the recomputation runs on these copies (so it sees exactly
    the buffers of the original forward) and afterwards the buffers get back the values they had when it
    began (the result of the one update). RNG state is restored for the recomputation by torch (dropout
    masks match), and so is autocast. Caveats: buffers changed inside ``fn`` other than through the forward
    of a module called in it are not covered. The recomputation chooses the backends the forward chose
    (:class:`mtlfast.backends.BackendScope`), also when the backward runs outside the forward's
    :func:`~mtlfast.backends.use_backend` block or on another thread. The forward pre-hook is process-wide
    while ``fn`` runs (a module run by another thread at that moment would be copied needlessly, not
    harmed); collectives inside ``fn`` (SyncBatchNorm under DDP) run again in the backward on every rank.

    Under torch.compile the call runs eagerly (``torch.compiler.disable``: a graph break, ``fn`` not compiled):
    the compiler's own activation checkpointing cannot recompute a region that updates buffers in place
    (BatchNorm's running statistics: "modified by an inplace operation" in the backward, torch 2.13).
    """
    replay = _BufferReplay()
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=replay.contexts)
