"""Model-level benchmark behind ``mtlfast bench --models`` (issue 8): kernel path vs reference path.

For each model setting (method, backbone, dataset input size, paper batch size) and each path
(``kernels``: backend ``auto``; ``reference``: backend ``reference``; ``kernels_checkpointed``: backend ``auto``
with every activation checkpoint on, ``model.set_checkpointing(True)``: the decoder stages and the ViT/Swin
backbone blocks, the configuration that the exact activation counts of ``mtlfast info --models --activations``
show is needed for large memory savings outside TPIM), in bf16 autocast on a GPU:

- one training step (forward + backward + optimiser step): median time, images/s, peak memory;
- one inference forward: median time, images/s, peak memory;
- the largest batch that fits for a training step (doubling, then bisection, catching OOM);
- a per-block breakdown (forward time and memory increase of every mtlfast.nn block and the backbone).

Both paths run in the same process on the same device, one after the other, with identical weights and
inputs; ratios are printed and everything goes to ``<out>/<device>/models.json`` with versions and commit,
plus a bar plot ``models.png``. On a CPU the same code runs at tiny sizes (``--quick``) as a check only;
its timings are not a claim about the kernels.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtlfast.backends import use_backend
from mtlfast.bench.harness import peak_memory_cuda
from mtlfast.models.summary import NYUD, PASCAL, PATHS, SummarySetting


@dataclass(frozen=True)
class ModelSetting(SummarySetting):
    """A model of the summary table with the batch size of a training step."""
    batch: int = field(kw_only=True)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.backbone}-{self.dataset}"


#: The papers' settings (paper input size, batch size per GPU as reported or as in their public code).
SETTINGS = [
    ModelSetting("bridgenet", "vit_b", "nyud", NYUD, batch=2),
    ModelSetting("bridgenet", "vit_l", "nyud", NYUD, batch=2),
    ModelSetting("bridgenet", "vit_l", "pascal", PASCAL, batch=2),
    ModelSetting("tpim", "hrnet_w18_small_v2", "nyud", NYUD, batch=4),
    ModelSetting("tif", "swin_t", "nyud", NYUD, batch=4),
    ModelSetting("sem", "vit_b", "nyud", NYUD, batch=2),
    ModelSetting("mtinet", "hrnet_w18_small_v2", "nyud", NYUD, batch=8),
    ModelSetting("mtinet", "hrnet_w18_small_v2", "pascal", PASCAL, batch=8),
]


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


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    return peak_memory_cuda(fn) if device.type == "cuda" else None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class _Runner:
    """A model with its loss and optimiser, and closures for a training step and an inference forward."""

    def __init__(self, setting: ModelSetting, device: torch.device, state: dict | None,
                 checkpointed: bool = False):
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

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from mtlfast.data import num_outputs

        h, w = self.setting.size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, h, w, generator=g).to(self.device)
        labels = {}
        for t in self.setting.tasks:
            if t in ("semseg", "parts"):
                labels[t] = torch.randint(0, num_outputs(t, self.setting.dataset), (n, h, w), generator=g).to(self.device)
            elif t == "normals":
                labels[t] = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1).to(self.device)
            elif t == "depth":
                labels[t] = (torch.rand(n, 1, h, w, generator=g) * 5 + 0.5).to(self.device)
            else:
                labels[t] = (torch.rand(n, 1, h, w, generator=g) > 0.9).float().to(self.device)
        return images, labels

    def train_step(self, images, labels) -> None:
        self.model.train()
        with self.autocast:
            preds, aux = self.model.forward_train(images)
            total, _ = self.loss(preds, labels, aux)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, images) -> None:
        self.model.eval()
        with self.autocast:
            self.model(images)


def block_breakdown(runner: _Runner, images: torch.Tensor) -> list[dict]:
    """Forward time (CUDA events) and allocated-memory increase of each block, one inference-mode pass."""
    import mtlfast.nn as blocks

    block_types = tuple(v for v in vars(blocks).values() if isinstance(v, type) and issubclass(v, torch.nn.Module))
    records, handles, starts = [], [], {}
    cuda = runner.device.type == "cuda"

    def pre(name):
        def hook(module, args):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                starts[name] = (event, torch.cuda.memory_allocated())
            else:
                starts[name] = (time.perf_counter(), 0)
        return hook

    def post(name):
        def hook(module, args, out):
            start, mem = starts.pop(name)
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                records.append((name, type(module).__name__, start, end, torch.cuda.memory_allocated() - mem))
            else:
                records.append((name, type(module).__name__, (time.perf_counter() - start) * 1e3, None, None))
        return hook

    for name, module in runner.model.named_modules():
        if name == "backbone" or (block_types and isinstance(module, block_types)):
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    try:
        runner.infer(images)
        if cuda:
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    return [{"block": n, "type": t, "fwd_ms": (s.elapsed_time(e) if cuda else s), "mem_increase_bytes": m}
            for n, t, s, e, m in records]


def max_batch(runner: _Runner, limit: int = 256) -> int:
    """Largest batch for which a training step fits in memory (doubling, then bisection)."""
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
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def failures(results: list[dict]) -> list[str]:
    """``setting/path: error`` of every path that failed other than by running out of memory (an OOM at the
    paper's batch size is a result; any other error is a defect)."""
    return [f"{res['setting']}/{path}: {e['error']}" for res in results for path, e in res["paths"].items()
            if "error" in e and not e["out_of_memory"]]


def run_setting(setting: ModelSetting, device: torch.device, *, quick: bool, find_max_batch: bool) -> dict:
    reps, warmup = (2, 1) if quick else (10, 3)
    result: dict = {"setting": setting.name, "method": setting.method, "backbone": setting.backbone,
                    "dataset": setting.dataset, "size": list(setting.size), "batch": setting.batch, "paths": {}}
    state = None
    for path, (backend, checkpointed) in PATHS.items():
        entry: dict = {}
        try:
            with use_backend(backend):
                torch.manual_seed(0)
                runner = _Runner(setting, device, state, checkpointed=checkpointed)
                state = state or {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
                images, labels = runner.batch(setting.batch)
                train_ms = _median_ms(lambda: runner.train_step(images, labels), device, reps, warmup)
                infer_ms = _median_ms(lambda: runner.infer(images), device, reps, warmup)
                entry.update({
                    "train_ms": train_ms, "train_images_per_s": setting.batch / train_ms * 1e3,
                    "train_peak_bytes": _peak_bytes(lambda: runner.train_step(images, labels), device),
                    "infer_ms": infer_ms, "infer_images_per_s": setting.batch / infer_ms * 1e3,
                    "infer_peak_bytes": _peak_bytes(lambda: runner.infer(images), device),
                    "blocks": block_breakdown(runner, images)})
                if find_max_batch and device.type == "cuda":
                    entry["max_train_batch"] = max_batch(runner)
        except Exception as exc:  # OOM or a failing model: recorded, the other path still runs
            entry["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            entry["out_of_memory"] = _is_oom(exc)
        finally:
            runner = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["paths"][path] = entry
    r = result["paths"]["reference"]
    for path in (p for p in PATHS if p != "reference"):
        k = result["paths"][path]
        for key in ("train_ms", "infer_ms", "train_peak_bytes", "infer_peak_bytes"):
            if k.get(key) and r.get(key):
                result[f"{key}_ratio_{path}_over_reference"] = k[key] / r[key]
    return result


def format_models_table(results: list[dict]) -> str:
    lines = [f"{'setting':<40} {'path':<20} {'train ms':>9} {'img/s':>7} {'peak GiB':>9} {'infer ms':>9} "
             f"{'max batch':>9}"]
    for res in results:
        for path, e in res["paths"].items():
            if "error" in e:
                lines.append(f"{res['setting']:<40} {path:<20} {e['error']}")
                continue
            peak = f"{e['train_peak_bytes'] / 2**30:.2f}" if e.get("train_peak_bytes") is not None else "-"
            lines.append(f"{res['setting']:<40} {path:<20} {e['train_ms']:>9.1f} {e['train_images_per_s']:>7.1f} "
                         f"{peak:>9} {e['infer_ms']:>9.1f} {e.get('max_train_batch', '-'):>9}")
        for path in (p for p in PATHS if p != "reference"):
            suffix = f"_ratio_{path}_over_reference"
            ratios = {k[:-len(suffix)]: v for k, v in res.items() if k.endswith(suffix)}
            if ratios:
                lines.append(f"    {path}/reference: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


def plot_models(results: list[dict], path: str) -> None:
    """Bars per model setting: training step time and peak memory, per path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(names)), 4.5))
    for ax, key, label in ((axes[0], "train_ms", "training step (ms)"), (axes[1], "train_peak_bytes", "peak memory (GiB)")):
        width = 0.8 / len(PATHS)
        for j, p in enumerate(PATHS):
            values = [(r["paths"].get(p, {}).get(key) or 0) / (2**30 if "bytes" in key else 1) for r in results]
            offset = (j - (len(PATHS) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(names))], values, width=width, label=p)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
