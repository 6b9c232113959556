"""Parameter / FLOP / saved-activation table of the models (for ``mtlfast info --models``).

:func:`model_summary` builds each model on the ``meta`` device and runs it on fake CPU tensors (no storage:
no memory, no weights, seconds even for ViT-L; the ops' reference implementations serve them) and counts the forward FLOPs of one image at the paper's input size with
:class:`torch.utils.flop_counter.FlopCounterMode`, with every op on its reference path (the kernel paths
compute the same products). Convention: FLOPs = 2 × the multiply-adds of matrix products and convolutions
(torch's counter); element-wise work, softmax and resizing are not counted. Papers that use fvcore
report multiply-adds as "FLOPs", i.e. half of these numbers.

:func:`saved_activations` counts, exactly and without a GPU, the bytes of the activations one training forward
keeps for the backward on the reference path and on the GPU kernel path: the model runs in bfloat16 on meta
tensors with the backends planned as on a GPU (:func:`mtlfast.backends.meta_planning`), so every op runs its
fake implementation and autograd records what the real one saves. Parameters, buffers and the images are not
counted. This is the part of the training memory that the kernels change; the GPU peak (issue 8,
``mtlfast bench --models``) also holds weights, gradients, optimiser state and transients, and the bfloat16
model stands for bf16 autocast (which keeps a few ops in float32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mtlfast.backends import meta_planning, use_backend

__all__ = ["SummarySetting", "SETTINGS", "paper_options", "model_summary", "saved_activations", "format_table",
           "breakdown_blocks", "running_block", "OUTSIDE_BLOCKS", "format_block_table"]

NYUD = ("semseg", "depth", "normals", "edge")
PASCAL = ("semseg", "parts", "sal", "normals", "edge")
_SIZE = {"nyud": (448, 576), "pascal": (512, 512)}


def paper_options(method: str, backbone: str, dataset: str) -> dict:
    """The papers' settings that differ from the methods' defaults (the configs/ files set them too): TIF's
    HRNet decoder width (Table 3's parameter counts), BridgeNet's TFR size per dataset (§4.2) and, on a ViT,
    the official layout (no pyramid)."""
    if method == "tif" and backbone.startswith("hrnet"):
        return {"dim": 44}
    if method == "bridgenet":
        tfr = {"tfr": "huge" if dataset == "nyud" else "large"}
        return {**tfr, "backbone_kwargs": {"vit_pyramid": False}} if backbone.startswith("vit") else tfr
    return {}


@dataclass(frozen=True)
class SummarySetting:
    """One model: ``create_model`` arguments (``kwargs``: the method's options, by default
    :func:`paper_options`) and the input size (H, W), by default the paper's for the dataset. The model
    benchmark (mtlfast.bench.models) extends it."""
    method: str
    backbone: str
    dataset: str
    tasks: tuple[str, ...]
    kwargs: dict | None = None
    size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kwargs is None:
            object.__setattr__(self, "kwargs", paper_options(self.method, self.backbone, self.dataset))
        if self.size is None:
            object.__setattr__(self, "size", _SIZE[self.dataset])

    @property
    def name(self) -> str:
        return f"{self.method}-{self.backbone}-{self.dataset}"

    def create(self) -> torch.nn.Module:
        from mtlfast.models import create_model

        return create_model(self.method, list(self.tasks), backbone=self.backbone, dataset=self.dataset,
                            **self.kwargs)


def _settings() -> list[SummarySetting]:
    rows = []
    for dataset, tasks in (("nyud", NYUD), ("pascal", PASCAL)):
        for backbone in ("hrnet_w18_small_v2", "hrnet_w48"):
            rows += [SummarySetting(m, backbone, dataset, tasks) for m in ("baseline", "padnet", "mtinet")]
        rows.append(SummarySetting("tpim", "hrnet_w18_small_v2", dataset, tasks))
        rows += [SummarySetting("tif", b, dataset, tasks) for b in ("hrnet_w18_small_v2", "swin_t", "swin_b")]
        rows += [SummarySetting("bridgenet", b, dataset, tasks) for b in ("hrnet_w18_small_v2", "vit_b", "vit_l")]
        rows += [SummarySetting("sem", b, dataset, tasks) for b in ("swin_t", "vit_b", "vit_l")]
        rows += [SummarySetting("baseline", b, dataset, tasks) for b in ("resnet50d", "swin_t", "vit_b", "vit_l")]
    # MTI-Net's published parameter counts (DESIGN.md §4) are for these task sets.
    rows += [SummarySetting("mtinet", "hrnet_w18_small_v2", "nyud", ("semseg", "depth")),
             SummarySetting("mtinet", "hrnet_w18_small_v2", "nyud", ("semseg", "depth"),
                            {"aux_tasks": ("edge", "normals")})]
    return rows


#: The table's rows: every method with the backbones of its paper, at the paper input size.
SETTINGS = _settings()


#: The training paths compared, by :func:`saved_activations` here and by ``mtlfast bench --models`` on a GPU:
#: name -> (backend, every activation checkpoint on: ``MultiTaskModel.set_checkpointing``, the decoder stages and
#: the backbone's blocks where supported, i.e. ViT and Swin).
PATHS = {"reference": ("reference", False), "kernels": ("auto", False), "kernels_checkpointed": ("auto", True)}


def breakdown_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules a per-block breakdown reports, by qualified name: the model's parts (its children, those of
    a ModuleList/ModuleDict one by one: the backbone, each task's head...) and every mtlfast.nn block in them
    (blocks inside blocks too: a breakdown counts a part under the innermost running one)."""
    import mtlfast.nn as blocks

    block_types = tuple(v for v in vars(blocks).values() if isinstance(v, type) and issubclass(v, torch.nn.Module))

    def parts(prefix: str, module: torch.nn.Module) -> Iterator[str]:
        for name, child in module.named_children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # containers have no forward
                yield from parts(f"{prefix}{name}.", child)
            else:
                yield f"{prefix}{name}"

    named = set(parts("", model))
    return {name: m for name, m in model.named_modules() if name in named or isinstance(m, block_types)}


#: A breakdown's name for what runs outside every block of :func:`breakdown_blocks` (the model's own forward).
OUTSIDE_BLOCKS = "(outside blocks)"


@contextlib.contextmanager
def running_block(model: torch.nn.Module,
                  on_change: Callable[[str], None] | None = None) -> Iterator[Callable[[], str]]:
    """Yields a function naming the innermost block of :func:`breakdown_blocks` whose forward (a module call)
    is running, :data:`OUTSIDE_BLOCKS` between blocks; kept by forward pre/post hooks while the context is open.
    ``on_change(name)`` is called with the new innermost block at every block entry and exit."""
    running: list[str] = []

    def current() -> str:
        return running[-1] if running else OUTSIDE_BLOCKS

    def enter(name):
        def hook(module, args):
            running.append(name)
            if on_change is not None:
                on_change(name)
        return hook

    def leave(module, args, out):
        running.pop()
        if on_change is not None:
            on_change(current())

    handles = []
    for name, module in breakdown_blocks(model).items():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


def saved_activations(setting: SummarySetting, *, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                      paths: tuple[str, ...] = tuple(PATHS),
                      by_block: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
    """Bytes of the activations one training forward (``forward_train``, all outputs incl. deep supervision)
    of ``batch`` images keeps for the backward, in ``dtype``, per path of :data:`PATHS`: the
    reference ops, the GPU kernel path (backend auto as on a GPU), and the kernel path with every activation
    checkpoint on (decoder stages; ViT/Swin backbone blocks; their inputs count), with, under
    ``<path>_recompute``, what the largest recomputation saves on top of that while its backward runs (so
    ``<path> + <path>_recompute`` bounds the saved bytes alive at any time of the backward). ``by_block``: a dict
    that gets, per path, the bytes per block (:func:`running_block`: the innermost block whose forward first
    kept a storage, e.g. a block's output counts under the next block that saves it; a checkpoint's inputs
    under the block that took it), adding up to the path's count. See the module docstring."""
    from mtlfast.bench.harness import saved_activation_bytes

    counts = {}
    images = torch.empty(batch, 3, *setting.size, device="meta", dtype=dtype)
    for path in paths:
        backend, checkpointed = PATHS[path]
        with torch.device("meta"):
            model = setting.create().to(dtype).train()
        model.set_checkpointing(checkpointed)
        state = [*model.parameters(), *model.buffers()]
        recomputed: list[int] = []
        with meta_planning("cuda"), use_backend(backend), running_block(model) as block:
            blocks = None if by_block is None else (block, by_block.setdefault(path, {}))
            counts[path] = saved_activation_bytes(model.forward_train, {"images": images}, exclude=state,
                                                  recomputed=recomputed, by_owner=blocks)
        if checkpointed:
            counts[f"{path}_recompute"] = max(recomputed, default=0)
    return counts


def model_summary(settings=None, *, flops: bool = True, activations: bool = False,
                  blocks: bool = False) -> list[dict]:
    """One row per setting: method, backbone, dataset, tasks, options, input size, parameters, GFLOPs
    (forward, one image; None when ``flops=False``) and, with ``activations`` (or ``blocks``),
    :func:`saved_activations` of one image in MB per path (None otherwise); with ``blocks`` also
    ``saved_mb_by_block``: per path, MB per block (:func:`saved_activations`'s ``by_block``)."""
    rows = []
    for s in settings if settings is not None else SETTINGS:
        gflops = None
        with torch.device("meta"):
            model = s.create()
        params = sum(p.numel() for p in model.parameters())
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu").eval()
            if flops:
                counter = FlopCounterMode(display=False)
                images = torch.empty(1, 3, *s.size)
                with torch.no_grad(), use_backend("reference"), counter:
                    model(images)
                gflops = counter.get_total_flops() / 1e9
        by_block: dict[str, dict[str, int]] | None = {} if blocks else None
        saved = saved_activations(s, by_block=by_block) if activations or blocks else None
        row = {"method": s.method, "backbone": s.backbone, "dataset": s.dataset, "tasks": list(s.tasks),
               "options": dict(s.kwargs), "input": list(s.size), "params_m": params / 1e6, "gflops": gflops,
               "saved_mb": None if saved is None else {k: v / 1e6 for k, v in saved.items()}}
        if by_block is not None:
            row["saved_mb_by_block"] = {path: {b: n / 1e6 for b, n in counts.items()}
                                        for path, counts in by_block.items()}
        rows.append(row)
    return rows


def format_block_table(row: dict) -> str:
    """Plain-text table of one :func:`model_summary` row's ``saved_mb_by_block``: MB per block and path, the
    largest on the reference path first, and the totals."""
    by_block = row["saved_mb_by_block"]
    paths = list(by_block)
    names = sorted({b for counts in by_block.values() for b in counts},
                   key=lambda b: (-by_block[paths[0]].get(b, 0.0), b))
    width = max(len(n) for n in [*names, "block"]) + 2
    header = f"{'block':<{width}}" + "".join(f"{p:>22}" for p in paths)
    lines = [f"{row['method']} {row['backbone']} {row['dataset']} {'x'.join(map(str, row['input']))}: "
             "saved activations (MB, one image) per block", header, "-" * len(header)]
    for name in [*names, "total"]:
        cells = (sum(by_block[p].values()) if name == "total" else by_block[p].get(name, 0.0) for p in paths)
        lines.append(f"{name:<{width}}" + "".join(f"{mb:>22.1f}" for mb in cells))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`model_summary` rows (saved-activation columns where they were counted)."""
    saved = any(r.get("saved_mb") for r in rows)
    header = f"{'method':<12}{'backbone':<20}{'dataset':<8}{'tasks':<38}{'input':<10}{'params (M)':>11}{'GFLOPs':>10}"
    if saved:
        header += f"{'saved MB: ref':>15}{'kernels':>9}{'ratio':>7}{'+ckpt':>7}{'ratio':>7}{'+recomp':>9}{'ratio':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        tasks = ",".join(r["tasks"]) + ("+aux:" + ",".join(r["options"]["aux_tasks"]) if r["options"].get("aux_tasks")
                                        else "")
        gflops = "" if r["gflops"] is None else f"{r['gflops']:.1f}"
        line = (f"{r['method']:<12}{r['backbone']:<20}{r['dataset']:<8}{tasks:<38}"
                f"{'x'.join(map(str, r['input'])):<10}{r['params_m']:>11.2f}{gflops:>10}")
        if saved and r.get("saved_mb"):
            mb = r["saved_mb"]
            peak = mb["kernels_checkpointed"] + mb["kernels_checkpointed_recompute"]
            line += (f"{mb['reference']:>15.0f}{mb['kernels']:>9.0f}{mb['kernels'] / mb['reference']:>7.2f}"
                     f"{mb['kernels_checkpointed']:>7.0f}{mb['kernels_checkpointed'] / mb['reference']:>7.2f}"
                     f"{peak:>9.0f}{peak / mb['reference']:>7.2f}")
        lines.append(line)
    return "\n".join(lines)
