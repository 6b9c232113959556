"""Model-level benchmark behind ``mtlfast bench --models`` (issue 8): kernel path vs reference path.

For each model setting (method, backbone, dataset input size, paper batch size) and each path
(``kernels``: backend ``auto``; ``reference``: backend ``reference``; ``kernels_checkpointed``: backend ``auto``
with every activation checkpoint on, ``model.set_checkpointing(True)``: the decoder stages and the ViT/Swin
backbone blocks, the configuration that the exact activation counts of ``mtlfast info --models --activations``
show is needed for large memory savings outside TPIM), in bf16 autocast on a GPU; with ``compiled`` (``mtlfast
bench --models --compile``) also ``reference_compiled`` and ``kernels_compiled``: the training forward (and the
inference forward) under ``torch.compile(fullgraph=True)`` (Inductor), what ``mtlfast train train.compile=true``
runs, so that the kernels are also weighed against the compiled reference:

- one training step (forward + backward + optimiser step, gradients dropped before the forward as
  ``mtlfast train`` does): median time, images/s, peak memory;
- one inference forward: median time, images/s, peak memory;
- the largest batch that fits for a training step (doubling, then bisection, catching OOM), where the time
  budget leaves room for it (eager paths only: every new batch size would compile again);
- the first call of each (``train_first_s``, ``infer_first_s``: cuDNN's algorithm search, Triton's and Inductor's
  compilation);
- a per-block breakdown (:func:`block_breakdown`; eager paths only: a compiled step has no block boundaries): the
  time of an inference forward and of a training step's forward, backward and optimiser step charged to every
  mtlfast.nn block, the backbone's parts and the loss, printed as the largest first (:func:`format_block_breakdown`);
  where the training memory goes, exactly and without a GPU: ``mtlfast info --models --blocks``.

Peak memory: ``*_peak_bytes`` is the whole allocated peak of the step (weights, gradients, Adam state, inputs
and activations: the issue's "peak training memory", which its <= 0.6x target compares);
``*_peak_above_start_bytes`` is the part above what was allocated when the step began (activations and
transients). Timings run with cuDNN's algorithm search on (``train.cudnn_benchmark``'s default), the batch
search with it off (every new batch size would start a search). Inputs are drawn on the device (a host-side
448 x 576 image with its labels takes ~40 ms to draw, which a batch search would pay thousands of times).

All paths run in the same process on the same device, one after the other, with identical weights and
inputs; ratios are printed and everything goes to ``<out>/<device>/models.json`` with versions and commit,
plus a bar plot ``models.png``. On a CPU the same code runs at small sizes (``--quick``) as a check only;
its timings are not a claim about the kernels.
"""
from __future__ import annotations

import bisect
import gc
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint

from mtlfast.backends import use_backend
from mtlfast.bench.harness import _error_text, _stop_if_cuda_lost, cuda_peak_and_start
from mtlfast.models.summary import NYUD, OUTSIDE_BLOCKS, PASCAL, PATHS, SummarySetting, breakdown_blocks, running_block


@dataclass(frozen=True)
class ModelSetting(SummarySetting):
    """A model of the summary table with the batch size of a training step."""
    batch: int = field(kw_only=True)


#: The papers' settings (paper input size, batch size per GPU as reported or as in their public code), one per
#: method first (the four with targets, then MTI-Net), so that a short time budget still measures every method.
SETTINGS = [
    ModelSetting("bridgenet", "vit_b", "nyud", NYUD, batch=2),
    ModelSetting("tpim", "hrnet_w18_small_v2", "nyud", NYUD, batch=4),
    ModelSetting("tif", "swin_t", "nyud", NYUD, batch=4),
    ModelSetting("sem", "vit_b", "nyud", NYUD, batch=2),
    ModelSetting("mtinet", "hrnet_w18_small_v2", "nyud", NYUD, batch=8),
    ModelSetting("bridgenet", "vit_l", "nyud", NYUD, batch=2),
    ModelSetting("bridgenet", "vit_l", "pascal", PASCAL, batch=2),
    ModelSetting("mtinet", "hrnet_w18_small_v2", "pascal", PASCAL, batch=8),
]
#: ``--compile``'s paths: name -> (backend, checkpointed), as :data:`PATHS`, compiled.
COMPILED_PATHS = {"reference_compiled": ("reference", False), "kernels_compiled": ("auto", False)}


def bench_paths(compiled: bool) -> dict[str, tuple[str, bool]]:
    """The paths a run measures: :data:`PATHS`, then :data:`COMPILED_PATHS` where ``compiled``."""
    return {**PATHS, **COMPILED_PATHS} if compiled else dict(PATHS)


def baseline(path: str) -> str:
    """The path a path's ratios are judged against: the compiled reference for the compiled kernel path (what
    torch.compile alone gains is not the kernels'), else the eager reference."""
    return "reference_compiled" if path == "kernels_compiled" else "reference"


def uses_kernels(path: str) -> bool:
    """Whether ``path`` (of :data:`PATHS` or :data:`COMPILED_PATHS`) runs the kernels: the targets judge those."""
    return bench_paths(compiled=True)[path][0] != "reference"


#: Seconds a max-batch search needs at least: with less time left in the budget it is not started.
MAX_BATCH_MIN_SECONDS = 60


def _median_ms(fn: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int | None, int | None]:
    """(whole allocated peak during ``fn()``, the part of it above what was allocated before); None on a CPU."""
    if device.type != "cuda":
        return None, None
    peak, start = cuda_peak_and_start(fn)
    return peak, peak - start


def _free_cuda(device: torch.device) -> None:
    gc.collect()  # reference cycles (e.g. of a model whose build imported timm) would keep tensors alive
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    """CUDA's caching allocator (OutOfMemoryError) or a library's own allocation (cuBLAS/cuDNN ALLOC_FAILED)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


class _Runner:
    """A model with its loss and optimiser, and closures for a training step and an inference forward;
    ``compiled``: both forwards under torch.compile(fullgraph=True) (a graph break or a recompilation over the limit
    is an error, not a silently eager step). Dynamo's caches are reset first: they are kept per code object, so that
    the earlier models' entries would count towards the recompilation limit."""

    def __init__(self, setting: ModelSetting, device: torch.device, state: dict | None,
                 checkpointed: bool = False, compiled: bool = False):
        from mtlfast.losses import MultiTaskLoss

        self.setting, self.device = setting, device
        self.model = setting.create().to(device)
        self.model.set_checkpointing(checkpointed)
        if state is not None:
            self.model.load_state_dict(state)
        self.loss = MultiTaskLoss.for_model(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-6)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.compiled = compiled
        self.forward_train, self.forward = self.model.forward_train, self.model
        if compiled:
            torch._dynamo.reset()
            self.forward_train = torch.compile(self.model.forward_train, fullgraph=True)
            self.forward = torch.compile(self.model, fullgraph=True)

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from mtlfast.data import num_outputs

        h, w = self.setting.size
        on = dict(generator=torch.Generator(self.device).manual_seed(0), device=self.device)
        images = torch.randn(n, 3, h, w, **on)
        labels = {}
        for t in self.setting.tasks:
            if t in ("semseg", "parts"):
                labels[t] = torch.randint(0, num_outputs(t, self.setting.dataset), (n, h, w), **on)
            elif t == "normals":
                labels[t] = torch.nn.functional.normalize(torch.randn(n, 3, h, w, **on), dim=1)
            elif t == "depth":
                labels[t] = torch.rand(n, 1, h, w, **on) * 5 + 0.5
            else:
                labels[t] = (torch.rand(n, 1, h, w, **on) > 0.9).float()
        return images, labels

    def train_step(self, images, labels) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # as the trainer: no old gradients beside the activations
        with self.autocast:
            preds, aux = self.forward_train(images)
            total, _ = self.loss(preds, labels, aux)
        total.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, images) -> None:
        self.model.eval()
        with self.autocast:
            self.forward(images)


#: Rows of a :func:`block_breakdown` beside the blocks: the loss (forward and backward), the optimiser step.
LOSS, OPTIMIZER = "(loss)", "(optimizer step)"
#: Columns of a :func:`block_breakdown` row (milliseconds); a training step is the sum of the train_* ones.
BREAKDOWN_PHASES = ("infer_ms", "train_fwd_ms", "train_bwd_ms", "train_recompute_ms", "train_opt_ms")
TRAIN_PHASES = BREAKDOWN_PHASES[1:]


class _Timeline:
    """Consecutive segments of the work queued on the current stream, each charged to an owner: :meth:`switch`
    ends the running segment and starts the next one (a CUDA event and the allocated bytes on a GPU, the host
    clock on a CPU), and does nothing while the owner stays the same, so that marks cost only where it changes."""

    clock = staticmethod(time.perf_counter)  # the host clock (a test's own clock in its place)

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def switch(self, owner) -> None:
        """Charge what is queued from now on to ``owner`` (None: to nobody)."""
        if self.marks and self.marks[-1][0] == owner:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((owner, event, torch.cuda.memory_allocated()))
        else:
            self.marks.append((owner, self.clock(), None))

    def totals(self) -> tuple[dict, dict]:
        """({owner: milliseconds}, {owner: allocated-bytes change (GPU only)}) of the segments so far."""
        self.switch(None)
        if self.cuda:
            torch.cuda.synchronize()
        ms: dict = defaultdict(float)
        memory: dict = defaultdict(int)
        for (owner, t0, m0), (_, t1, m1) in zip(self.marks, self.marks[1:]):
            if owner is not None:
                ms[owner] += t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3
                if self.cuda:
                    memory[owner] += m1 - m0
        return ms, memory


_SEQUENCE_PROBE = torch.zeros((), requires_grad=True)


def _sequence_nr() -> int:
    """The autograd sequence number of a node created now: nodes created later on this thread have larger ones."""
    with torch.enable_grad():
        return _SEQUENCE_PROBE.view(()).grad_fn._sequence_nr()


def _autograd_nodes(root) -> Iterator:
    """Every node of the autograd graph that ``root`` (a grad_fn) reaches, each once."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def block_breakdown(runner: _Runner, images: torch.Tensor, labels: dict[str, torch.Tensor],
                    reps: int = 1) -> list[dict]:
    """Where an inference forward and a training step spend their time, per block of :func:`breakdown_blocks`
    (mean of ``reps`` instrumented runs after the timed ones), one row per block with :data:`BREAKDOWN_PHASES`:

    - exclusive times: a block is charged what runs while it is the innermost running block (as
      ``mtlfast info --models --blocks`` charges saved bytes), so the rows add up to the whole step;
    - ``train_bwd_ms``: every autograd node is charged to the block whose forward created it (its sequence number
      lies between the block's forward hooks), a parameter's gradient accumulation to the innermost block holding
      the parameter;
    - ``train_recompute_ms``: the forward of an activation-checkpointed block run again inside the backward node
      that needs its tensors (a recomputed module that is no block of the breakdown, e.g. one of a timm backbone's
      own blocks, is charged to the innermost block holding it); the node's own work stays its block's backward. The
      instrumented step recomputes checkpoints whole (a training step stops once the needed tensors are back,
      possibly before a stage's last ops). With reentrant checkpointing the backward of the recomputed graph is
      charged to the block that called ``checkpoint`` (its nodes do not exist before the backward runs);
    - rows :data:`OUTSIDE_BLOCKS` (the model's own forward code), :data:`LOSS`, :data:`OPTIMIZER`;
    - ``infer_mem_increase_bytes`` (GPU): allocated bytes after minus before the block's inference segments.

    Marks (CUDA events on a GPU, the host clock on a CPU) are taken only where the charged block changes; the
    hooks' host time can still stretch small segments, so the rows' sum may exceed the step's median time. The
    training memory per block: ``mtlfast info --models --blocks`` (exact saved-activation counts)."""
    model, cuda = runner.model, runner.device.type == "cuda"
    blocks = breakdown_blocks(model)
    holder = {id(p): OUTSIDE_BLOCKS for p in model.parameters()}
    for name, module in blocks.items():  # pre-order: an inner block overwrites its parent
        holder.update((id(p), name) for p in module.parameters())
    timeline = _Timeline(cuda)

    def infer() -> None:
        model.eval()
        timeline.switch(("infer_ms", OUTSIDE_BLOCKS))
        with torch.no_grad(), runner.autocast, running_block(model, lambda b: timeline.switch(("infer_ms", b))):
            model(images)
        timeline.switch(None)

    def train_step() -> None:
        model.train()
        runner.optimizer.zero_grad(set_to_none=True)
        created: list[tuple[int, str]] = []  # (sequence number, block creating the nodes from there on)
        node_owner = [None]  # the block of the backward node running; None during the forward

        def block_change(block: str) -> None:
            if node_owner[0] is None:
                created.append((_sequence_nr(), block))
                timeline.switch(("train_fwd_ms", block))
            elif block != OUTSIDE_BLOCKS:  # a checkpoint recomputes this block's forward
                timeline.switch(("train_recompute_ms", block))
            else:  # the recomputation left its outermost block: the node's own backward goes on
                timeline.switch(("train_bwd_ms", node_owner[0]))

        def before_node(owner: str) -> None:
            node_owner[0] = owner
            timeline.switch(("train_bwd_ms", owner))

        plain_depth = [0]  # nesting of recomputed modules that are no breakdown block, outside every block

        def plain_enter(owner: str):
            def hook(module, args):
                if running() == OUTSIDE_BLOCKS:
                    plain_depth[0] += 1
                    if plain_depth[0] == 1:
                        timeline.switch(("train_recompute_ms", owner))
            return hook

        def plain_leave(module, args, out):
            if running() == OUTSIDE_BLOCKS and plain_depth[0]:
                plain_depth[0] -= 1
                if plain_depth[0] == 0:
                    timeline.switch(("train_bwd_ms", node_owner[0]))

        # checkpoints recompute whole (no early stop, which would end a recomputation inside its blocks, unseen)
        with running_block(model, block_change) as running, torch.utils.checkpoint.set_checkpoint_early_stop(False):
            with runner.autocast:
                block_change(OUTSIDE_BLOCKS)
                preds, aux = model.forward_train(images)
                created.append((_sequence_nr(), LOSS))
                timeline.switch(("train_fwd_ms", LOSS))
                total, _ = runner.loss(preds, labels, aux)
            timeline.switch(None)
            starts = [n for n, _ in created]
            handles = []
            for name, module in model.named_modules():  # modules run in the backward only when recomputed
                if name and name not in blocks:
                    owner = max((b for b in blocks if name.startswith(b + ".")), key=len, default=OUTSIDE_BLOCKS)
                    handles += [module.register_forward_pre_hook(plain_enter(owner)),
                                module.register_forward_hook(plain_leave)]
            for node in _autograd_nodes(total.grad_fn):
                variable = getattr(node, "variable", None)  # AccumulateGrad of a parameter
                owner = (holder.get(id(variable), OUTSIDE_BLOCKS) if variable is not None
                         else created[max(bisect.bisect_right(starts, node._sequence_nr()) - 1, 0)][1])
                handles.append(node.register_prehook(lambda grads, owner=owner: before_node(owner)))
            try:
                total.backward()
            finally:
                for handle in handles:
                    handle.remove()
        timeline.switch(("train_opt_ms", OPTIMIZER))
        runner.optimizer.step()
        timeline.switch(None)

    for _ in range(reps):
        infer()
        train_step()
    ms, memory = timeline.totals()
    names = {**{n: type(m).__name__ for n, m in blocks.items()}, OUTSIDE_BLOCKS: "", LOSS: "", OPTIMIZER: ""}
    rows = []
    for name, kind in names.items():
        row = {"block": name, "type": kind, **{phase: ms.get((phase, name), 0.0) / reps for phase in BREAKDOWN_PHASES}}
        row["infer_mem_increase_bytes"] = memory.get(("infer_ms", name), 0) // reps if cuda else None
        rows.append(row)
    return rows


def max_batch(runner: _Runner, limit: int = 256, deadline: float | None = None) -> dict:
    """Largest batch for which a training step fits in memory (doubling, then bisection), as
    {"max_train_batch": n, "max_train_batch_capped": n == limit (it may fit more), "max_train_batch_complete":
    False when ``deadline`` (time.monotonic()) stopped the search (n is then a lower bound)}. An error other
    than running out of memory propagates; one that lost the CUDA context stops the run (harness)."""
    def fits(n: int) -> bool:
        try:
            runner.train_step(*runner.batch(n))
            return True
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            return False
        finally:
            runner.optimizer.zero_grad(set_to_none=True)
            _free_cuda(runner.device)

    def time_left() -> bool:
        return deadline is None or time.monotonic() < deadline

    lo, hi, stopped = 0, 1, False
    while hi <= limit:
        if not time_left():
            stopped = True
            break
        if not fits(hi):
            break
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1 and not stopped:
        if not time_left():
            stopped = True
            break
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_train_batch": lo, "max_train_batch_capped": lo == limit, "max_train_batch_complete": not stopped}


def failures(results: list[dict]) -> list[str]:
    """``setting/path: error`` of every path that failed other than by running out of memory (an OOM at the
    paper's batch size is a result; any other error is a defect), and of every failed batch search or breakdown."""
    keys = ("error", "max_train_batch_error", "blocks_error")
    return [f"{res['setting']}/{path}: {e[key]}" for res in results for path, e in res["paths"].items()
            for key in keys if key in e and not (key == "error" and e["out_of_memory"])]


RATIO_KEYS = ("train_ms", "infer_ms", "train_peak_bytes", "train_peak_above_start_bytes", "infer_peak_bytes")


def _measure_path(entry: dict, setting: ModelSetting, runner: _Runner, reps: int, warmup: int) -> None:
    device = runner.device
    images, labels = runner.batch(setting.batch)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as `mtlfast train` (train.cudnn_benchmark)
    try:
        entry["train_first_s"] = _median_ms(lambda: runner.train_step(images, labels), device, 1, 0) / 1e3
        entry["infer_first_s"] = _median_ms(lambda: runner.infer(images), device, 1, 0) / 1e3
        train_ms = _median_ms(lambda: runner.train_step(images, labels), device, reps, warmup)
        infer_ms = _median_ms(lambda: runner.infer(images), device, reps, warmup)
        train_peak, train_above = _peak_bytes(lambda: runner.train_step(images, labels), device)
        infer_peak, infer_above = _peak_bytes(lambda: runner.infer(images), device)
        entry.update({
            "train_ms": train_ms, "train_images_per_s": setting.batch / train_ms * 1e3,
            "train_peak_bytes": train_peak, "train_peak_above_start_bytes": train_above,
            "infer_ms": infer_ms, "infer_images_per_s": setting.batch / infer_ms * 1e3,
            "infer_peak_bytes": infer_peak, "infer_peak_above_start_bytes": infer_above})
        if runner.compiled:
            entry["blocks_skipped"] = "compiled: one graph, no block boundaries"
            return
        try:  # the timings above stand; the breakdown's failure is reported
            entry["blocks"] = block_breakdown(runner, images, labels, reps=min(reps, 3))
        except Exception as exc:
            entry["blocks_error"] = _error_text(exc)
            _stop_if_cuda_lost(device.type, "block breakdown", entry["blocks_error"])
    finally:
        torch.backends.cudnn.benchmark = benchmark


def run_setting(setting: ModelSetting, device: torch.device, *, quick: bool, find_max_batch: bool,
                deadline: float | None = None, compiled: bool = False) -> dict:
    """Every path of :func:`bench_paths` on ``setting``, one after the other. ``deadline`` (time.monotonic()): no
    max-batch search starts with less than MAX_BATCH_MIN_SECONDS left, and a running one stops there."""
    reps, warmup = (2, 1) if quick else (10, 3)
    result: dict = {"setting": setting.name, "method": setting.method, "backbone": setting.backbone,
                    "dataset": setting.dataset, "size": list(setting.size), "batch": setting.batch, "paths": {}}
    state = None
    for path, (backend, checkpointed) in bench_paths(compiled).items():
        entry: dict = {}
        runner = None
        try:
            with use_backend(backend):  # traced into the compiled paths' graphs
                torch.manual_seed(0)
                runner = _Runner(setting, device, state, checkpointed=checkpointed, compiled=path in COMPILED_PATHS)
                if state is None:  # the other paths start from these weights; kept on the host, not in the GPU's way
                    state = {k: v.detach().to("cpu", copy=True) for k, v in runner.model.state_dict().items()}
                _measure_path(entry, setting, runner, reps, warmup)
                if find_max_batch and device.type == "cuda":
                    if runner.compiled:
                        entry["max_train_batch_skipped"] = "compiled"
                    elif deadline is not None and deadline - time.monotonic() < MAX_BATCH_MIN_SECONDS:
                        entry["max_train_batch_skipped"] = "time budget"
                    else:
                        try:
                            entry.update(max_batch(runner, deadline=deadline))
                        except Exception as exc:  # the timings above stand; the search's failure is reported
                            entry["max_train_batch_error"] = _error_text(exc)
                            _stop_if_cuda_lost(device.type, f"{setting.name}/{path} (batch search)",
                                               entry["max_train_batch_error"])
        except Exception as exc:  # OOM or a failing model: recorded, the other path still runs
            entry["error"] = _error_text(exc)
            entry["out_of_memory"] = _is_oom(exc)
            _stop_if_cuda_lost(device.type, f"{setting.name}/{path}", entry["error"])
        finally:
            runner = None
            _free_cuda(device)
        result["paths"][path] = entry
    for path, k in result["paths"].items():  # over the eager reference, and over the path's baseline
        for base in dict.fromkeys(("reference", baseline(path))):
            r = result["paths"].get(base, {})
            for key in RATIO_KEYS if path != base else ():
                if k.get(key) and r.get(key):
                    result[f"{key}_ratio_{path}_over_{base}"] = k[key] / r[key]
    return result


def merge_results(earlier: list[dict], new: list[dict]) -> list[dict]:
    """The results of a run (``new``) with those of an earlier run of the same sources for the settings it did
    not measure (a second call after a time budget, or another ``--cases``); a new result replaces the old one."""
    measured = {r["setting"] for r in new}
    return [r for r in earlier if r["setting"] not in measured] + new


def format_block_breakdown(result: dict, top: int = 10) -> str:
    """The ``top`` blocks of one :func:`run_setting` result by the reference path's training time (forward,
    backward, recomputation and optimiser step), with every path's training and inference milliseconds, the rest
    summed, the sum, and the steps' median times measured without the breakdown's hooks."""
    paths = [p for p, e in result["paths"].items() if "blocks" in e]
    if not paths:
        return ""
    rows = {p: result["paths"][p]["blocks"] for p in paths}
    train = {p: {b["block"]: sum(b[phase] for phase in TRAIN_PHASES) for b in rows[p]} for p in paths}
    infer = {p: {b["block"]: b["infer_ms"] for b in rows[p]} for p in paths}
    kinds = {b["block"]: b["type"] for p in paths for b in rows[p]}
    first = "reference" if "reference" in paths else paths[0]
    names = sorted(kinds, key=lambda b: -train[first].get(b, 0.0))
    label = "block (train = fwd + bwd + recompute + step, ms)"
    width = max(len(label), *(len(n) + len(kinds[n]) + 3 for n in names))
    header = f"{label:<{width}}" + "".join(
        f"{p + ' train':>{len(p) + 8}}{'infer':>8}" for p in paths)
    lines = [f"{result['setting']}: time per block", header]

    def line(text: str, cells) -> str:
        return f"{text:<{width}}" + "".join(f"{t:>{len(p) + 8}.2f}{i:>8.2f}" for p, t, i in cells)

    def sums(chosen: list[str]):
        return [(p, sum(train[p].get(b, 0.0) for b in chosen), sum(infer[p].get(b, 0.0) for b in chosen))
                for p in paths]
    for name in names[:top]:
        lines.append(line(f"{name} ({kinds[name]})" if kinds[name] else name, sums([name])))
    if names[top:]:
        lines.append(line(f"{len(names) - top} others", sums(names[top:])))
    lines.append(line("sum", sums(names)))
    lines.append(line("median step without hooks", [(p, result["paths"][p]["train_ms"], result["paths"][p]["infer_ms"])
                                                    for p in paths]))
    return "\n".join(lines)


def _max_batch_text(e: dict) -> str:
    """The max-batch cell: "-" not searched, ">= n" a lower bound (capped, or stopped by the budget)."""
    if "max_train_batch" not in e:
        if "max_train_batch_skipped" in e:
            return "skipped"
        return "error" if "max_train_batch_error" in e else "-"
    bound = e.get("max_train_batch_capped") or e.get("max_train_batch_complete") is False
    return f"{'>= ' if bound else ''}{e['max_train_batch']}"


def format_models_table(results: list[dict]) -> str:
    lines = [f"{'setting':<40} {'path':<20} {'train ms':>9} {'img/s':>7} {'peak GiB':>9} {'infer ms':>9} "
             f"{'max batch':>9} {'1st step s':>10}"]
    for res in results:
        for path, e in res["paths"].items():
            if "error" in e:
                lines.append(f"{res['setting']:<40} {path:<20} {e['error']}")
                continue
            peak = f"{e['train_peak_bytes'] / 2**30:.2f}" if e.get("train_peak_bytes") is not None else "-"
            lines.append(f"{res['setting']:<40} {path:<20} {e['train_ms']:>9.1f} {e['train_images_per_s']:>7.1f} "
                         f"{peak:>9} {e['infer_ms']:>9.1f} {_max_batch_text(e):>9} {e['train_first_s']:>10.1f}")
        for path in res["paths"]:
            for base in [b for b in dict.fromkeys(("reference", baseline(path))) if b != path]:
                suffix = f"_ratio_{path}_over_{base}"
                ratios = {k[:-len(suffix)]: v for k, v in res.items() if k.endswith(suffix)}
                if ratios:
                    lines.append(f"    {path}/{base}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


#: Issue 8's targets: for these methods a kernel path's peak training memory <= 0.6x and step time <= 0.8x the
#: reference path's; for every method the kernel path (without checkpointing) no slower than the reference.
TARGET_METHODS = ("bridgenet", "tpim", "tif", "sem")
MEMORY_TARGET, TIME_TARGET = 0.6, 0.8


def format_models_markdown(results: list[dict]) -> str:
    """The README table: per setting and path, step times, peak training memory, max batch, and each path's
    ratios to its :func:`baseline` (the eager reference; the compiled reference for kernels_compiled) with the
    issue's targets (met / missed)."""
    lines = ["| setting | path | train step ms | images/s | peak training GiB | inference ms | max batch | "
             "time / baseline | memory / baseline | targets |", "|---" * 10 + "|"]
    for res in results:
        for path, e in res["paths"].items():
            if "error" in e:
                lines.append(f"| {res['setting']} | {path} | {e['error']} |" + " |" * 7)
                continue
            peak = f"{e['train_peak_bytes'] / 2**30:.2f}" if e.get("train_peak_bytes") is not None else "-"
            time_ratio = res.get(f"train_ms_ratio_{path}_over_{baseline(path)}")
            memory_ratio = res.get(f"train_peak_bytes_ratio_{path}_over_{baseline(path)}")
            verdict = ""
            if time_ratio is not None:  # "no model slower": the plain kernel path (checkpointing trades time)
                checks = [("no slower", time_ratio <= 1.0)] if path == "kernels" else []
                if res["method"] in TARGET_METHODS and uses_kernels(path):
                    checks.append((f"time <= {TIME_TARGET}x", time_ratio <= TIME_TARGET))
                    if memory_ratio is not None:
                        checks.append((f"memory <= {MEMORY_TARGET}x", memory_ratio <= MEMORY_TARGET))
                verdict = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks)
            lines.append(f"| {res['setting']} | {path} | {e['train_ms']:.1f} | {e['train_images_per_s']:.1f} | "
                         f"{peak} | {e['infer_ms']:.1f} | {_max_batch_text(e)} | "
                         f"{'-' if time_ratio is None else f'{time_ratio:.2f}'} | "
                         f"{'-' if memory_ratio is None else f'{memory_ratio:.2f}'} | {verdict} |")
    return "\n".join(lines)


def plot_models(results: list[dict], path: str) -> None:
    """Bars per model setting: training step time and peak memory, per path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in results]
    paths = list(dict.fromkeys(p for r in results for p in r["paths"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(names)), 4.5))
    for ax, key, label in ((axes[0], "train_ms", "training step (ms)"),
                           (axes[1], "train_peak_bytes", "peak training memory (GiB)")):
        width = 0.8 / len(paths)
        for j, p in enumerate(paths):
            values = [(r["paths"].get(p, {}).get(key) or 0) / (2**30 if "bytes" in key else 1) for r in results]
            offset = (j - (len(paths) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(names))], values, width=width, label=p)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
