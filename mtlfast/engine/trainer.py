"""Training and evaluation loop (DESIGN.md §5): one process or many (torchrun + DDP).

Reproducibility contract: given the same config, a run interrupted after a checkpoint and resumed with
``resume=<checkpoint>`` produces exactly the loss sequence of an uninterrupted run (on the same device
and thread count). This holds because the data order comes from ``(seed, epoch)``, every sample's
augmentation randomness from ``(seed, epoch, index)`` (:mod:`mtlfast.engine.sampler`), and the checkpoint
holds the model, optimiser, scheduler, RNG states and data position.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import sys
import time
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from mtlfast.backends import use_backend
from mtlfast.engine import checkpoint as ckpt
from mtlfast.engine.config import check_config
from mtlfast.engine.distributed import (DistInfo, barrier, broadcast_from_main, cleanup, gather_objects,
                                        init_distributed, mean_over_ranks, sum_over_ranks)
from mtlfast.engine.logs import RunLog, plot_curves, plot_predictions
from mtlfast.engine.sampler import ResumableSampler, SeededDataset


def _device_type(requested: str) -> str:
    """``train.device`` -> "cuda" or "cpu"."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cuda", "cpu"):
        raise ValueError(f"train.device: expected auto, cuda or cpu, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return requested


def _device(info: DistInfo, device_type: str) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if device_type == "cuda" else torch.device("cpu")


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    name = cfg["name"].lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"optim.name: unknown optimiser {cfg['name']!r}; valid: adam, adamw, sgd")


def poly_schedule(optimizer, iterations: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr * (1 - it / iterations) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, iterations) / iterations) ** power)


class _TrainForward(torch.nn.Module):
    """``forward = model.forward_train`` (predictions + deep-supervision outputs), so that DDP, which only
    hooks ``forward``, wraps the training call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.forward_train(images)


def _without_ddp(forward: torch.nn.Module) -> torch.nn.Module:
    """The module DDP wraps in ``forward`` (which torch.compile may wrap in turn)."""
    ddp = getattr(forward, "_orig_mod", forward)
    return ddp.module if isinstance(ddp, DistributedDataParallel) else forward


def _aux_tasks(model_cfg: dict, tasks: list[str], dataset: str) -> list[str]:
    """``model.kwargs.aux_tasks`` checked before any data loads: the method must take them, and the dataset
    must have their labels."""
    from mtlfast.data import TASKS, dataset_tasks
    from mtlfast.models.base import check_aux_tasks
    from mtlfast.models.registry import model_options

    for option in ("checkpoint_decoder", "checkpoint_backbone"):
        if option in model_cfg["kwargs"]:
            raise ValueError(f"model.kwargs.{option}: set model.{option} instead")
    aux = model_cfg["kwargs"].get("aux_tasks") or []
    aux = [aux] if isinstance(aux, str) else list(aux)
    if not aux:
        return []
    if "aux_tasks" not in model_options(model_cfg["name"]):
        raise ValueError(f"model.kwargs.aux_tasks: model {model_cfg['name']!r} has no auxiliary tasks "
                         f"(mtinet, padnet and tpim have)")
    unknown = [t for t in aux if t not in TASKS]
    if unknown:
        raise ValueError(f"model.kwargs.aux_tasks: unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    available = dataset_tasks(dataset)
    missing = [t for t in aux if t not in available]
    if missing:
        raise ValueError(f"model.kwargs.aux_tasks: dataset {dataset} has no labels for {missing} "
                         f"(it has {', '.join(available)}); an auxiliary task is supervised with its labels")
    try:
        return list(check_aux_tasks(aux, tasks, dataset))
    except ValueError as exc:
        raise ValueError(f"model.kwargs.{exc}") from None


def resolve_workers(value, dataset: str, key: str = "data.num_workers", node_shared: bool = True) -> int:
    """Worker processes of ``data.num_workers`` (the loaders) or ``eval.edge_workers`` (the edge metric's
    per-image work, :class:`mtlfast.metrics.EdgeMeter`): an integer >= 0, or ``auto``: 0 for the synthetic
    dataset (rendered in the training process, cheap next to a step; its few small edge maps too), else the CPU
    cores this process may use, at most 8, divided among the processes of this node (torchrun's
    LOCAL_WORLD_SIZE) when they all work at once (``node_shared``; not for an evaluation that rank 0 runs alone
    while the others wait): decoding and augmenting NYUD/PASCAL images in the training process would leave the
    GPU waiting (the log's ``data_s`` shows it), and the edge metric takes ~0.5 s of a core per image. The data
    order, every sample's augmentation (:mod:`mtlfast.engine.sampler`) and every metric do not depend on it."""
    if value == "auto":
        if dataset == "synthetic":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if node_shared else 1
        return max(1, min(8, cores // max(1, processes)))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected auto or an integer >= 0, got {value!r}")
    return value


def build_split(config: dict[str, Any], split: str, tasks: Sequence[str]):
    """The ``split`` ("train" or "val") of ``config["data"]`` with labels for ``tasks``, as training and evaluation
    read it: training samples augmented and cropped to ``train_size``, validation ones at their own size
    (synthetic: ``num_train`` / ``num_val`` scenes rendered at ``train_size`` from ``seed``)."""
    from mtlfast.data import build_dataset, canonical_dataset

    data_cfg, dataset = config["data"], canonical_dataset(config["data"]["dataset"])
    extra = {"length": data_cfg[f"num_{split}"], "seed": config["seed"]} if dataset == "synthetic" else {}
    size = tuple(data_cfg["train_size"]) if split == "train" or dataset == "synthetic" else None
    return build_dataset(dataset, data_cfg["root"], split, tasks, size=size, **extra)


def run_baseline(name_or_path, dataset: str, tasks: Sequence[str]) -> dict | None:
    """``eval.baseline`` (None or empty: no Δm) restricted to the run's main tasks (Δm averages over the tasks of
    the multi-task model); it must cover each of them."""
    if not name_or_path:
        return None
    from mtlfast.metrics import load_baseline

    baseline = load_baseline(name_or_path, dataset=dataset)
    missing = [t for t in tasks if t not in baseline]
    if missing:
        raise ValueError(f"eval.baseline={name_or_path!r}: no single-task numbers for {missing} "
                         f"(it has {sorted(baseline)}; data.tasks={list(tasks)})")
    return {t: baseline[t] for t in tasks}


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's training-time randomness (dropout, stochastic depth): each rank its own stream."""
    return (seed * 1_000_003 + rank) % 2**63


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    """The training log's memory column: on CUDA the peak of allocated tensor memory since training started
    (``peak_mem_mib``); on a CPU the process's peak resident set size (``peak_rss_mib``: it includes the
    Python interpreter and libraries, and never decreases; Linux reports KiB, macOS bytes)."""
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak / (2**20 if sys.platform == "darwin" else 2**10)}


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype (None: off). ``auto``: bfloat16 on a GPU that computes it natively
    (compute capability >= 8.0), float16 with loss scaling on an older one, off on a CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


#: A float16 step skipped at a loss scale below this (after ~32 halvings from 2**16) means gradients that are not
#: finite at any scale: the run stops instead of skipping every step from there on.
_MIN_LOSS_SCALE = 2.0 ** -16


def _check_micro_batches(drawn: int, count: int, drawing: bool = False) -> None:
    """A step takes train.accumulate micro-batches (``drawing``: ``drawn`` so far, more may follow)."""
    if drawn > count:
        raise ValueError(f"train_step: more than train.accumulate={count} micro-batches")
    if drawn < count and not drawing:
        raise ValueError(f"train_step: {drawn} micro-batches, expected {count}")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    """Builds data, model, loss, metrics and optimiser from a config (:mod:`mtlfast.engine.config`).

    Auxiliary tasks (``model.kwargs.aux_tasks``, MTI-Net / PAD-Net / TPIM): the training set loads labels
    for ``data.tasks`` + aux_tasks, and the loss scores the auxiliary predictions of the model's deep
    supervision with the task's standard weight (:class:`mtlfast.losses.MultiTaskLoss` ``aux_tasks``).
    ``self.tasks`` stays the main tasks: the validation set, metrics, Δm and prediction images are for
    them only; checkpoints hold the whole model (auxiliary heads included, so that training resumes) and a
    checkpoint only loads with the same aux_tasks.
    ``model.checkpoint_decoder`` / ``model.checkpoint_backbone``: activation checkpointing of the model's decoder
    stages / backbone blocks (same losses and gradients, less activation memory; :mod:`mtlfast.models.base`).
    A run refuses an ``output_dir`` that holds a checkpoint (``last.pt``) unless it resumes that very file: it would
    overwrite it and append to its logs; logs there without a checkpoint (a run stopped before its first save) are
    started afresh, and temporary files of killed saves are removed. Randomness: the initial weights are the same on
    every rank (one seed); the training forward's draws (dropout, stochastic depth) come from one stream per rank,
    and checkpoints hold every rank's RNG states (exact resume with the same number of processes). A step whose
    gradient norm is not finite raises before the optimiser step, so no checkpoint gets non-finite weights (in
    float16 the step is skipped instead, and the run stops when the loss scale falls below 2**-16). A
    resume whose config differs from the checkpoint's lists the changes on stderr and follows the config
    (optim.lr, weight_decay and momentum included; another optim.name is refused).
    Rank 0 reports on stdout: each evaluation's metrics when it ends, and with ``progress=False`` (no progress bar:
    job schedulers' logs) every ``train.log_every``-th training row as one line.
    Training rows: losses averaged over the ranks; ``grad_norm`` before clipping; ``lr`` after the step's
    schedule update (the rate of the next step); ``images_per_s`` end to end, split into ``data_s`` (waiting for
    the loader) and ``step_s`` on rank 0. ``logs=False`` (``mtlfast eval``): no run log, so that loading a checkpoint
    neither creates ``output_dir`` nor cuts its logs back to the checkpoint's iteration as a resume does.
    ``train_data=False`` (``mtlfast eval``): no training set, sampler or loader, so that a dataset folder without
    the training split evaluates, and nothing reads its files; :meth:`train` then refuses. ``checkpoint``: the
    payload of ``resume`` when the caller has read it already (``mtlfast eval`` reads its config first), so that a
    checkpoint of hundreds of MB is not read twice.
    """

    def __init__(self, config: dict[str, Any], *, resume: str | None = None, progress: bool = True,
                 logs: bool = True, train_data: bool = True, checkpoint: dict[str, Any] | None = None):
        from mtlfast.data import canonical_dataset, check_tasks
        from mtlfast.losses import MultiTaskLoss
        from mtlfast.models import create_model

        self.config, self.progress = check_config(config), progress
        self._bar = None  # the progress bar while train() runs (reports are written above it)
        data_cfg, train_cfg = config["data"], config["train"]
        try:
            with self._ops_backend():  # a misspelt train.backend fails now, not after the first evaluation
                pass
        except ValueError as exc:
            raise ValueError(f"train.backend: {exc}") from None
        device_type = _device_type(train_cfg["device"])
        self.dist = init_distributed(device_type)
        self.device = _device(self.dist, device_type)
        self.dataset = canonical_dataset(data_cfg["dataset"])
        self.tasks = list(check_tasks(data_cfg["tasks"], self.dataset))
        self.aux_tasks = _aux_tasks(config["model"], self.tasks, self.dataset)
        self.out_dir = config["output_dir"]
        if checkpoint is not None and not resume:
            raise ValueError("checkpoint: the payload of the file given as resume; give resume too")
        payload = (checkpoint if checkpoint is not None else ckpt.load_checkpoint(resume, training=train_data) if resume
                   else None)
        if payload is not None:
            ckpt.check_compatible(payload, config, resume)
        if logs:  # before the run log, which writes into output_dir
            self._check_output_dir(resume)
        try:
            self.log = RunLog(self.out_dir) if self.dist.is_main and logs else None
        except OSError as exc:
            raise OSError(f"output_dir: cannot write the run's logs into {self.out_dir!r} ({exc})") from exc

        self.num_workers = resolve_workers(data_cfg["num_workers"], self.dataset)
        self.edge_workers = resolve_workers(config["eval"]["edge_workers"], self.dataset, "eval.edge_workers",
                                            node_shared=config["eval"]["sharded"] is True)
        self.train_set = self.sampler = self.train_loader = None
        if train_data:
            self._build_train_data()
        self.val_set = build_split(config, "val", self.tasks)
        self.per_class_iou: dict[str, list[float | None]] = {}  # of the last evaluation

        self.baseline = run_baseline(config["eval"]["baseline"], self.dataset, self.tasks)  # a typo fails now
        torch.manual_seed(config["seed"])  # identical initial weights on every rank
        model_cfg = config["model"]
        self.model = create_model(model_cfg["name"], self.tasks, backbone=model_cfg["backbone"], dataset=self.dataset,
                                  pretrained=model_cfg["pretrained"], checkpoint_decoder=model_cfg["checkpoint_decoder"],
                                  checkpoint_backbone=model_cfg["checkpoint_backbone"],
                                  **model_cfg["kwargs"])
        if self.device.type == "cuda":  # process-wide, as in the papers' code bases; training crops have one size
            torch.backends.cudnn.benchmark = train_cfg["cudnn_benchmark"]
        if train_cfg["sync_bn"] and self.device.type != "cuda":
            raise ValueError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; set train.sync_bn=false on CPU")
        if train_cfg["sync_bn"]:  # also in one process: SyncBatchNorm then normalises like BatchNorm
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.train_forward: torch.nn.Module = _TrainForward(self.model)
        if self.dist.enabled:
            self.train_forward = DistributedDataParallel(
                self.train_forward, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        if train_cfg["compile"]:  # around DDP, whose graph splitting follows its buckets; evaluation stays eager
            self.train_forward = torch.compile(self.train_forward,
                                               mode="default" if train_cfg["compile"] is True else train_cfg["compile"])
        self.loss_fn = MultiTaskLoss.for_model(self.model)  # model.aux_tasks == self.aux_tasks
        self.optimizer = build_optimizer(self.model.parameters(), config["optim"])
        self.scheduler = poly_schedule(self.optimizer, train_cfg["iterations"], config["optim"]["poly_power"])
        self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.autocast_dtype = _autocast_dtype(train_cfg["amp"], self.device)
        # float16's range needs dynamic loss scaling (bfloat16 has float32's); disabled, the scaler is a no-op
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        # the weights are the same on every rank (one seed); what the forward draws is not: each rank its stream
        torch.manual_seed(_rank_seed(config["seed"], self.dist.rank))
        if self.log is not None:
            for path in ckpt.remove_stale_temporaries(self.out_dir):
                print(f"removed {path}: the temporary file of a save that was killed", file=sys.stderr)
        if payload is not None:
            self._load(payload, resume)
        elif self.log is not None and (self.log.read("train") or self.log.read("eval")):
            print(f"output_dir {self.out_dir!r} holds the logs of an earlier run that saved no checkpoint: this run "
                  "starts them afresh", file=sys.stderr)
            self.log.resume_at(-1)

    def _check_output_dir(self, resume: str | None) -> None:
        """Refuses an output_dir that holds another run's checkpoint: this run would overwrite it and append to
        its logs (a run resumes only from its own ``last.pt`` there)."""
        last = self.checkpoint_path()
        if not os.path.exists(last) or (resume and os.path.samefile(resume, last)):
            return
        if resume:
            raise FileExistsError(f"output_dir {self.out_dir!r} holds the checkpoint of another run ({last}): "
                                  f"resuming {resume} there would overwrite it and mix the two runs' logs; choose "
                                  f"another output_dir, or resume {last}")
        raise FileExistsError(f"output_dir {self.out_dir!r} holds the checkpoint of an earlier run ({last}): resume "
                              f"it (train --resume auto, baseline --resume) or choose another output_dir")

    def _build_train_data(self) -> None:
        """The training set (labels of the main and auxiliary tasks), its resumable sampler and loader."""
        from mtlfast.data import collate

        config, data_cfg = self.config, self.config["data"]
        self.train_set = build_split(config, "train", self.tasks + self.aux_tasks)
        self.sampler = ResumableSampler(len(self.train_set), batch_size=data_cfg["batch_size"], seed=config["seed"],
                                        rank=self.dist.rank, world_size=self.dist.world_size)
        if self.sampler.batches_per_epoch() < 1:
            raise ValueError(f"data.batch_size={data_cfg['batch_size']} exceeds the {self.sampler.per_rank} "
                             f"training samples per process")
        # a loader draws its workers' base seed from its generator, by default the global RNG: its own keeps the
        # training forward's randomness (dropout, stochastic depth) in the same place after a resume
        self.train_loader = DataLoader(SeededDataset(self.train_set, config["seed"]), batch_size=data_cfg["batch_size"],
                                       sampler=self.sampler, drop_last=True, collate_fn=collate,
                                       num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                       pin_memory=self.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(config["seed"]))

    # --- state ---------------------------------------------------------------------------------------

    def checkpoint_path(self, name: str = "last.pt") -> str:
        return os.path.join(self.out_dir, name)

    def save(self, name: str = "last.pt") -> None:
        """Every rank calls it (the RNG states of all ranks go into the checkpoint); rank 0 writes."""
        rng = gather_objects(ckpt.rng_state(), self.dist)
        if not self.dist.is_main:
            return
        ckpt.save_checkpoint(self.checkpoint_path(name), {
            "config": self.config, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "rng_per_rank": rng, "scaler": self.scaler.state_dict()})

    def _load(self, payload: dict[str, Any], path: str) -> None:
        """Restores the state of the checkpoint ``payload`` (read from ``path``, checked compatible)."""
        ckpt.load_weights(self.model, payload, self.config, path)
        if self.train_loader is None:  # to evaluate only: a checkpoint of config and weights will do
            self.iteration = payload.get("iteration", 0)
            return
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler.is_enabled() and payload.get("scaler"):  # else (saved without float16): a fresh scale
            self.scaler.load_state_dict(payload["scaler"])
        self.iteration, self.epoch, self.batch_in_epoch = payload["iteration"], payload["epoch"], payload["batch_in_epoch"]
        per_rank = payload.get("rng_per_rank") or [payload["rng"]]  # "rng": rank 0's, in earlier checkpoints
        if len(per_rank) == self.dist.world_size:
            ckpt.set_rng_state(per_rank[self.dist.rank])
        else:  # saved by another number of processes: not an exact continuation, but one stream per rank
            ckpt.set_rng_state(per_rank[0])
            if self.dist.rank > 0:
                torch.manual_seed(_rank_seed(self.config["seed"] + self.iteration, self.dist.rank))
        self._apply_optim_config()
        if self.log is not None:
            changes = ckpt.config_changes(payload.get("config", {}), self.config)
            if changes:
                print("resume: the config differs from the checkpoint's; the run goes on with the config's values:\n  "
                      + "\n  ".join(changes), file=sys.stderr)
            self.log.resume_at(self.iteration)

    def _apply_optim_config(self) -> None:
        """A resumed run takes optim.lr, weight_decay and momentum from its config, not from the loaded optimiser
        and schedule state (torch restores the checkpoint's base lr, which would silently override optim.lr);
        the schedule's position is kept. With the checkpoint's own config this sets the values already there."""
        cfg = self.config["optim"]
        self.scheduler.base_lrs = [cfg["lr"]] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=cfg["lr"], lr=cfg["lr"] * factor, weight_decay=cfg["weight_decay"])
            if "momentum" in group:  # sgd
                group["momentum"] = cfg["momentum"]

    # --- training ------------------------------------------------------------------------------------

    def _ops_backend(self):
        """``train.backend`` in force (training and evaluation alike), or the default."""
        backend = self.config["train"]["backend"]
        return use_backend(backend) if backend else contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batches: dict | Iterable[dict]) -> dict[str, float]:
        """One optimiser step on ``batches``: one batch, or the micro-batches whose gradients accumulate into the
        step (a list, or an iterator of ``train.accumulate`` of them). With ``train.accumulate_norm=step`` every
        loss of every micro-batch on every rank is divided by the normalisers of the step's whole batch (valid
        pixels, saliency's class balance: losses.normaliser, summed over the micro-batches and all-reduced over
        the ranks), so that the losses add up to that batch's and the gradient is its gradient (BatchNorm
        statistics aside); the micro-batches are then drawn before the first forward, and each rank's loss is
        multiplied by the number of ranks, whose mean DDP takes. With ``micro`` each micro-batch is normalised
        within itself and divided by their number (the mean of their losses, drawn as needed), and DDP averages
        the ranks'. DDP all-reduces only after the last backward. Returns the losses (total and per task: the
        whole batch's, or in ``micro`` mode the mean of the micro-batches' and ranks'), the gradient norm before
        clipping and, in float16, the loss scale the step used. A float16 step whose gradients overflow is skipped
        (GradScaler) and its norm is inf or NaN; the schedule advances either way."""
        self.model.train()
        if isinstance(batches, dict):
            batches = [batches]
        count = len(batches) if isinstance(batches, Sequence) else self.config["train"]["accumulate"]
        ranks = self.dist.world_size if self.dist.enabled else 1
        normalised_by = None
        if self.config["train"]["accumulate_norm"] == "step" and count * ranks > 1:
            batches = list(itertools.islice(batches, count + 1))  # the normalisers need every label first
            _check_micro_batches(len(batches), count)
            normalised_by = sum_over_ranks({task: {key: value.to(self.device) for key, value in norm.items()}
                                            for task, norm in self.loss_fn.normalisers(batches).items()}, self.dist)

        def share(loss):  # a micro-batch's part: its share of the batch's loss (DDP averages the ranks'), or 1 / count
            return loss * ranks if normalised_by is not None else loss / count

        # before the forward: the last step's gradients are not kept alive beside this step's activations
        self.optimizer.zero_grad(set_to_none=True)
        values: dict[str, torch.Tensor] = {}
        index = -1
        for index, batch in enumerate(batches):
            _check_micro_batches(index + 1, count, drawing=True)
            batch = _to_device(batch, self.device)
            labels = {t: batch[t] for t in self.tasks + self.aux_tasks}
            last = index == count - 1
            with self.train_forward.no_sync() if self.dist.enabled and not last else contextlib.nullcontext():
                with self._autocast():
                    preds, aux = self.train_forward(batch["image"])
                    total, per_task = self.loss_fn(preds, labels, aux, normalised_by)
                self.scaler.scale(share(total)).backward()
            for key, value in {"loss": total, **{f"loss_{t}": v for t, v in per_task.items()}}.items():
                values[key] = values.get(key, 0) + share(value.detach())
            del preds, aux, total, per_task  # not alive through the next micro-batch's forward
        _check_micro_batches(index + 1, count)
        self.scaler.unscale_(self.optimizer)  # clipping and the logged norm see the true gradients
        clip = self.config["optim"]["grad_clip"]
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip
                     else torch.nn.utils.get_total_norm([p.grad for p in params]))
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):  # all-reduced: every rank raises alike
            raise FloatingPointError(f"gradient norm is {grad_norm.item()} at iteration {self.iteration + 1} (loss "
                                     f"{values['loss'].item()}): the step is not taken, the last checkpoint stays "
                                     "finite")
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # float16: skipped when a gradient overflowed, and the scale halves
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale
        if skipped and scale < _MIN_LOSS_SCALE:
            raise FloatingPointError(f"float16 gradients are not finite at iteration {self.iteration + 1} even at "
                                     f"loss scale {scale:g} (loss {values['loss'].item()}): train.amp=bf16 or off")
        # The schedule follows the iteration, skipped or not. Only around a skipped step (torch warns when its
        # first one is): a catch_warnings block resets the once-per-location memory of every warning inside it.
        with warnings.catch_warnings() if skipped else contextlib.nullcontext():
            if skipped:
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        values["grad_norm"] = grad_norm
        if self.scaler.is_enabled():  # the scale this step's backward used (a skipped step: grad_norm inf/NaN)
            values["amp_scale"] = torch.tensor(scale, device=grad_norm.device)
        return mean_over_ranks(values, self.dist)

    def _batches(self) -> Iterator[dict]:
        """The training batches from the run's position on, epoch after epoch; the position (epoch, batch in the
        epoch: what a checkpoint saves) advances as each batch is drawn."""
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.sampler.batches_per_epoch():
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                yield batch
            if self.batch_in_epoch != 0:  # sampler exhausted mid-count
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train(self) -> list[dict[str, float]]:
        """Runs to ``train.iterations``; returns the logged training rows of this call."""
        if self.train_loader is None:
            raise RuntimeError("this Trainer was built with train_data=False, to evaluate only; build it with "
                               "train_data=True to train")
        cfg = self.config["train"]
        total_its = cfg["iterations"]
        history = []
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm
            bar = self._bar = tqdm(total=total_its, initial=self.iteration, desc="train", dynamic_ncols=True)
        if self.log is not None:
            self._record_run()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        accumulate = cfg["accumulate"]
        batches = self._batches()
        waits: list[float] = []

        def drawn():  # one step's micro-batches, each drawn from the loader when the step needs it (timed)
            for _ in range(accumulate):
                start = time.perf_counter()
                batch = next(batches)
                waits.append(time.perf_counter() - start)
                yield batch

        with self._ops_backend():
            while self.iteration < total_its:
                waits.clear()
                fetch = time.perf_counter()
                row = self.train_step(drawn())
                end = time.perf_counter()
                self.iteration += 1
                images, data_s = self.config["data"]["batch_size"] * self.dist.world_size * accumulate, sum(waits)
                row = {"iteration": self.iteration, **row, "lr": self.scheduler.get_last_lr()[0],
                       "images_per_s": images / (end - fetch), "data_s": data_s, "step_s": end - fetch - data_s}
                row.update(_peak_memory_mib(self.device))
                history.append(row)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training loss is {row['loss']} at iteration {self.iteration}")
                if self.log is not None and (self.iteration % cfg["log_every"] == 0 or self.iteration == total_its):
                    self.log.write("train", row, self.iteration)
                    if bar is None:
                        self._say(f"iteration {self.iteration}/{total_its}: loss {row['loss']:.4f}, lr "
                                  f"{row['lr']:.3g}, {row['images_per_s']:.1f} images/s")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                eval_due = cfg["eval_every"] and (self.iteration % cfg["eval_every"] == 0
                                                  or self.iteration == total_its)
                if self.iteration % cfg["checkpoint_every"] == 0 or self.iteration == total_its:
                    self.save()
                    barrier(self.dist)
                    if self.log is not None and not eval_due:  # an evaluation plots them (a run may have none)
                        self._plot_curves()
                if eval_due:
                    self.evaluate_and_log()
        batches.close()  # the loader's iterator, mid-epoch
        if bar is not None:
            bar.close()
            self._bar = None
        return history

    def _record_run(self) -> None:
        """The run's provenance in output_dir, written by rank 0 whenever :meth:`train` starts: ``config.yaml``,
        the config in force (``--config`` takes it back), and one entry per start (fresh or resumed) appended to
        ``environment.json``: the iteration it starts from, the processes, device, versions, extension build,
        commit and source fingerprint (:func:`mtlfast.bench.harness.environment`, as the benchmarks record). A
        run from iteration 0 starts the list afresh (an earlier run there saved no checkpoint, as its logs)."""
        import yaml

        from mtlfast._files import read_json, write_json_atomically, write_text_atomically
        from mtlfast.bench.harness import environment

        path = os.path.join(self.out_dir, "environment.json")  # provenance only: a problem is reported, not fatal
        try:
            starts = read_json(path) if os.path.exists(path) and self.iteration > 0 else []
            if not isinstance(starts, list):
                raise ValueError(f"{path}: not a list of the run's starts")
        except (OSError, ValueError) as exc:
            print(f"{exc}: written afresh", file=sys.stderr)
            starts = []
        starts.append({"iteration": self.iteration, "processes": self.dist.world_size,
                       **environment(self.device.type)})
        config_text = yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)
        for write, target, content in ((write_text_atomically, os.path.join(self.out_dir, "config.yaml"), config_text),
                                       (write_json_atomically, path, starts)):
            try:
                write(target, content)
            except OSError as exc:
                print(f"{target}: not written ({exc})", file=sys.stderr)

    def _say(self, text: str) -> None:
        """One line on rank 0's stdout, above the progress bar while there is one."""
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    # --- evaluation ----------------------------------------------------------------------------------

    @property
    def sharded_evaluation(self) -> bool:
        """``eval.sharded`` in a multi-process run: every rank evaluates every world_size-th validation image."""
        return self.config["eval"]["sharded"] and self.dist.enabled

    def evaluate(self, sample_path: str | None = None, prediction_dir: str | None = None,
                 shard: bool = False) -> dict[str, float]:
        """Metrics on the validation set at original resolution (padding cropped back), flattened as
        ``"task/metric"`` (+ ``delta_m`` against ``eval.baseline``). ``shard=False``: this process evaluates
        every image (the main rank, in a run); ``shard=True`` (every rank must call it, :attr:`sharded_evaluation`):
        each rank evaluates the images rank, rank + world_size, ... and the meters' additive states are summed
        over the ranks, so every rank returns the metrics of the whole set (the numbers of one process up to
        float64 sums in another order, and the last bits that a batch of other images changes in the outputs, as
        ``eval.batch_size`` does). ``sample_path``: a PNG of the first images'
        predictions; ``prediction_dir``: every image's prediction per task, in the files of
        :mod:`mtlfast.engine.predictions` (for the MATLAB SEISM edge evaluation, etc.). cuDNN's algorithm search
        (``train.cudnn_benchmark``) is off meanwhile: validation images come in many sizes (PASCAL), and each new
        size would start a new search. With ``shard``, the sample PNG shows rank 0's first images (0, world_size,
        ...). Afterwards ``self.per_class_iou`` holds the IoU of every class per segmentation task (percent,
        None for a class absent from labels and predictions)."""
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            with self._ops_backend():
                return self._evaluate(sample_path, prediction_dir, shard and self.dist.enabled)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    @torch.no_grad()
    def _evaluate(self, sample_path: str | None, prediction_dir: str | None, shard: bool) -> dict[str, float]:
        from tqdm import tqdm

        from mtlfast.data import collate
        from mtlfast.engine.predictions import save_predictions
        from mtlfast.metrics import build_metrics

        model = self.model.eval()
        eval_cfg = self.config["eval"]
        metrics = build_metrics(self.tasks, self.dataset, edge_thresholds=eval_cfg["edge_thresholds"],
                                edge_workers=self.edge_workers)
        images = self.val_set
        if shard:
            # DDP broadcasts rank 0's buffers at each training forward, then every rank updates its own BatchNorm
            # statistics with its batch: evaluate with rank 0's (the checkpoint's), as the next step would
            broadcast_from_main(list(self.model.buffers()), self.dist)
            images = Subset(images, range(self.dist.rank, len(images), self.dist.world_size))
        loader = DataLoader(images, batch_size=self.config["eval"]["batch_size"], shuffle=False,
                            collate_fn=collate, num_workers=self.num_workers,
                            generator=torch.Generator())  # not the global RNG: training goes on after this
        bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, disable=not (self.progress and
                                                                                       self.dist.is_main))
        with contextlib.closing(metrics), contextlib.closing(bar):  # the edge meter's processes end, also on failure
            wanted = self.config["train"]["sample_images"] if sample_path is not None else 0
            shown: tuple[list, dict, dict] = ([], {t: [] for t in self.tasks}, {t: [] for t in self.tasks})
            for batch in bar:
                batch = _to_device(batch, self.device)
                with self._autocast():
                    preds = model(batch["image"])
                preds = {t: p.float() for t, p in preds.items()}
                for i, meta in enumerate(batch["meta"]):
                    h, w = meta["size"]
                    metrics.update({t: preds[t][i:i + 1, :, :h, :w] for t in self.tasks},
                                   {t: batch[t][i:i + 1, ..., :h, :w] for t in self.tasks})
                    if len(shown[0]) < wanted:  # the first images, from as many batches as it takes, unpadded
                        shown[0].append(batch["image"][i, :, :h, :w].cpu())
                        for t in self.tasks:
                            shown[1][t].append(preds[t][i, :, :h, :w].cpu())
                            shown[2][t].append(batch[t][i, ..., :h, :w].cpu())
                if prediction_dir is not None:
                    save_predictions({t: preds[t] for t in self.tasks}, batch["meta"], prediction_dir, self.dataset)
            if shown[0]:
                plot_predictions(*shown, path=sample_path)
            if shard:
                metrics.all_reduce()
            self.per_class_iou = metrics.per_class_iou()
            return metrics.compute_flat(self.baseline)

    def evaluate_and_log(self) -> dict[str, float] | None:
        """Every rank calls it: the main rank evaluates (all ranks, each its shard, with ``eval.sharded``), logs
        and plots; the others wait."""
        result = None
        if self.dist.is_main or self.sharded_evaluation:
            sample_path = os.path.join(self.out_dir, f"predictions_{self.iteration:06d}.png")
            result = self.evaluate(sample_path if self.dist.is_main else None, shard=self.sharded_evaluation)
        if self.dist.is_main:
            flat = {"iteration": self.iteration, **{k: float(v) for k, v in result.items()}}
            self.log.write("eval", flat, self.iteration)
            self._plot_curves()
            self._say(f"evaluation at iteration {self.iteration}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        barrier(self.dist)
        return result

    def _plot_curves(self) -> None:
        plot_curves(self.log, os.path.join(self.out_dir, "curves.png"))

    def evaluate_if_due(self) -> dict[str, float] | None:
        """Every rank calls it before :meth:`train`: evaluates (:meth:`evaluate_and_log`) when an evaluation is
        due at the current iteration and the run log has no row for it: iteration 0 with ``train.eval_at_start``,
        or a resumed run whose checkpoint came from an evaluation iteration (checkpoints are saved before the
        evaluation, so a run stopped during it would otherwise never evaluate that iteration, the last one
        included). Rank 0 decides (it keeps the log)."""
        cfg, it = self.config["train"], self.iteration
        due = (cfg["eval_at_start"] if it == 0
               else bool(cfg["eval_every"]) and (it % cfg["eval_every"] == 0 or it == cfg["iterations"]))
        missing = self.log is not None and all(int(r["iteration"]) != it for r in self.log.read("eval"))
        return self.evaluate_and_log() if gather_objects(due and missing, self.dist)[0] else None

    def close(self) -> None:
        """Ends the run's process group. DDP's wrapper (its reducer) goes first, while torch's registry still
        holds the group: a reducer that holds the last reference destroys a gloo group with the GIL held, joining
        worker threads of which one may still need the GIL to free the tensors of a finished collective. That
        deadlocked or aborted 2-process CPU runs at exit now and then (torch 2.11: 4 in 30 of a DDP step, an
        all-reduce and a barrier followed by destroy_process_group; torch 2.13: 1 in 30; none in 60 in this order)."""
        if self.dist.enabled:
            self.train_forward = _without_ddp(self.train_forward)
            gc.collect()  # in case a hook's reference cycle keeps the wrapper alive
        cleanup(self.dist)
