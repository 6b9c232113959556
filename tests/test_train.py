"""The training pipeline end to end on tiny synthetic runs: loss falls, exact resume, 2-process DDP, CLI."""
import copy
import functools
import json
import math
import os
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch

from mtlfast.engine.config import load_config
from mtlfast.engine.trainer import Trainer
from mtlfast.testing import rel_error

TINY = ["data.num_train=16", "data.num_val=4", "data.batch_size=4", "data.train_size=[32, 32]",
        "data.tasks=[semseg, depth, normals]", "train.log_every=1", "train.eval_every=0",
        "train.eval_at_start=false", "eval.edge_thresholds=5"]
#: Tests of bit-exact equalities (resume, checkpointed decoder, DDP ranks) and the multi-process runs (gloo) train
#: on the CPU on every machine: on a GPU, atomics in cuDNN/cuBLAS (and in some kernels) change the last bits from
#: run to run, resumed or not, and NCCL takes one GPU per process.
ON_CPU = ["train.device=cpu"]


@pytest.fixture(autouse=True)
def _restore_cudnn_benchmark(monkeypatch):
    """A trainer on CUDA sets torch.backends.cudnn.benchmark process-wide (train.cudnn_benchmark): restored after
    each test, so that later tests in the worker run as they would alone."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)


def _losses(config, resume=None, setup=None):
    trainer = Trainer(config, resume=resume, progress=False)
    if setup is not None:
        setup(trainer)
    rows = trainer.train()
    trainer.close()
    return [r["loss"] for r in rows], trainer


def _dropout(trainer):
    """Randomness in the training forward, as dropout or stochastic depth (BridgeNet's drop_path)."""
    first = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, args, out: torch.nn.functional.dropout(out, 0.2, m.training))


@pytest.mark.parametrize("stop, eval_every", [(3, 0), (4, 4)], ids=["mid-epoch", "evaluated-at-epoch-end"])
def test_resume_replays_the_same_losses(tmp_path, stop, eval_every):
    """Also with randomness in the training forward (4 batches per epoch): neither the resumed run's data loader
    started mid-epoch nor the evaluation after the checkpoint the run resumes from may draw from the global RNG."""
    args = TINY + ON_CPU + ["train.iterations=7", f"train.checkpoint_every={stop}", f"train.eval_every={eval_every}"]
    full, _ = _losses(load_config(None, args + [f"output_dir={tmp_path / 'full'}"]), setup=_dropout)
    # interrupted run: stops after `stop` iterations (its checkpoint), then resumes to 7
    part_cfg = load_config(None, args + [f"output_dir={tmp_path / 'part'}"])
    trainer = Trainer(copy.deepcopy(part_cfg), progress=False)
    _dropout(trainer)
    trainer.config["train"]["iterations"] = stop  # the same (7-iteration) schedule, stopped at the checkpoint
    first = [r["loss"] for r in trainer.train()]
    trainer.close()
    resumed, trainer = _losses(part_cfg, resume=str(tmp_path / "part" / "last.pt"), setup=_dropout)
    assert len(full) == 7 and first + resumed == full, (full, first, resumed)
    logged = trainer.log.read("train")
    assert [int(r["iteration"]) for r in logged] == list(range(1, 8))


@pytest.mark.parametrize("optimiser", ["adam", "adamw", "sgd"])
def test_resume_with_a_changed_config_lists_the_changes_and_takes_its_optimiser_values(tmp_path, capsys, optimiser):
    """torch restores the checkpoint's base lr with the schedule state: a resumed run given another optim.lr would
    silently keep the old one. The config's lr / weight decay (and SGD's momentum) apply from the checkpoint's
    iteration on, on the same poly schedule (here extended from 2 to 4 iterations), and every changed entry is
    listed; another optimiser cannot take the saved state. Each of optim.name's optimisers, with its settings."""
    args = TINY + ON_CPU + [f"output_dir={tmp_path}", "train.checkpoint_every=2", f"optim.name={optimiser}"]
    _losses(load_config(None, args + ["train.iterations=2"]))
    assert "resume:" not in capsys.readouterr().err
    changes = ["optim.lr=0.01", "optim.weight_decay=0.001", "optim.momentum=0.5"]
    trainer = Trainer(load_config(None, args + ["train.iterations=4"] + changes), resume=str(tmp_path / "last.pt"),
                      progress=False)
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.01" in err and "train.iterations: 2 -> 4" in err and "optim.poly_power" not in err
    assert type(trainer.optimizer) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                                       "sgd": torch.optim.SGD}[optimiser]
    (group,) = trainer.optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.01 * (1 - 2 / 4) ** 0.9, 0.001)
    assert group.get("momentum") == (0.5 if optimiser == "sgd" else None)
    rows = trainer.train()
    trainer.close()
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * (1 - 3 / 4) ** 0.9, 0.0])
    other = "adam" if optimiser == "sgd" else "sgd"
    with pytest.raises(RuntimeError, match=f"optim.name='{optimiser}', which cannot go on as '{other}'"):
        Trainer(load_config(None, args + [f"optim.name={other}"]), resume=str(tmp_path / "last.pt"), progress=False)


def test_a_stopped_evaluation_is_made_up_on_resume(tmp_path, monkeypatch):
    """Checkpoints are saved before the evaluation of their iteration: a run stopped during that evaluation (here
    the last one) gets it from evaluate_if_due after the resume, and only then (no second row for an iteration
    that was evaluated, none where no evaluation is due)."""
    from mtlfast.engine.logs import RunLog

    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=4",
                                                "train.checkpoint_every=2", "train.eval_every=2"])
    evaluate = Trainer._evaluate

    def stopped_at_4(self, *args):
        if self.iteration == 4:
            raise KeyboardInterrupt("stopped during the evaluation")
        return evaluate(self, *args)

    monkeypatch.setattr(Trainer, "_evaluate", stopped_at_4)
    trainer = Trainer(copy.deepcopy(config), progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    assert [int(r["iteration"]) for r in RunLog(str(tmp_path)).read("eval")] == [2]
    resumed = Trainer(copy.deepcopy(config), resume=str(tmp_path / "last.pt"), progress=False)
    assert resumed.iteration == 4 and resumed.evaluate_if_due() is not None
    assert resumed.evaluate_if_due() is None and resumed.train() == []
    resumed.close()
    assert [int(r["iteration"]) for r in RunLog(str(tmp_path)).read("eval")] == [2, 4]
    config["train"]["iterations"] = 5  # resumed at 4 again, now a checkpoint but no evaluation iteration... 
    config["train"]["eval_every"] = 3  # ...and one that is neither: nothing to make up
    again = Trainer(config, resume=str(tmp_path / "last.pt"), progress=False)
    assert again.evaluate_if_due() is None
    again.close()


def test_logs_without_a_checkpoint_start_afresh_and_killed_saves_are_removed(tmp_path, capsys):
    """A run stopped before its first checkpoint leaves logs and no last.pt (and a save killed by SIGTERM leaves
    its temporary file): the next run in that folder does not append to those logs, and removes the file."""
    from mtlfast.engine.logs import RunLog

    log = RunLog(str(tmp_path))
    log.write("train", {"iteration": 1, "loss": 9.0}, 1)
    log.write("eval", {"iteration": 0, "semseg/mIoU": 1.0}, 0)
    (tmp_path / ".tmp_ckpt_killed").write_bytes(b"x" * 100)
    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=2"])
    _, _ = _losses(config)
    assert "starts them afresh" in capsys.readouterr().err
    assert [int(r["iteration"]) for r in RunLog(str(tmp_path)).read("train")] == [1, 2]
    assert RunLog(str(tmp_path)).read("eval") == [] and not (tmp_path / ".tmp_ckpt_killed").exists()


@pytest.mark.parametrize("grad_clip", [10.0, None], ids=["clipped", "unclipped"])
def test_a_non_finite_gradient_raises_before_the_step(tmp_path, grad_clip):
    """An infinite gradient with a finite loss (clipping would make every weight NaN: inf x 0) stops the run before
    the optimiser step: the checkpoint of the iteration before stays the last one, with finite weights."""
    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=3",
                                                "train.checkpoint_every=1",
                                                f"optim.grad_clip={'null' if grad_clip is None else grad_clip}"])
    trainer = Trainer(config, progress=False)
    weight = next(p for p in trainer.model.parameters() if p.dim() > 1)
    weight.register_hook(lambda g: g * math.inf if trainer.iteration == 1 else g)
    with pytest.raises(FloatingPointError, match="gradient norm is (inf|nan) at iteration 2"):
        trainer.train()
    trainer.close()
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    assert saved["iteration"] == 1 and all(v.isfinite().all() for v in saved["model"].values() if v.is_floating_point())


def test_interval_and_backend_options_are_checked_first(tmp_path, monkeypatch):
    """train.checkpoint_every / log_every / iterations >= 1, eval_every >= 0 or null, optim.grad_clip and
    train.backend are refused with the key's name when the trainer is built (0 for checkpoint_every crashed after the first step; a
    misspelt backend only failed after the first evaluation). Evaluations run with train.backend too."""
    from mtlfast.backends import current_backend

    base = TINY + ON_CPU + [f"output_dir={tmp_path}"]
    for override, message in (("train.checkpoint_every=0", "train.checkpoint_every: expected an integer >= 1"),
                              ("train.log_every=null", "train.log_every: expected an integer >= 1"),
                              ("train.eval_every=-1", "train.eval_every: expected an integer >= 0 or null"),
                              ("train.iterations=2.5", "train.iterations: expected an integer >= 1"),
                              ("train.backend=trition", "train.backend: use_backend: unknown backend 'trition'"),
                              ("optim.grad_clip=None", "optim.grad_clip: expected a number > 0 or null, got 'None'")):
        with pytest.raises(ValueError, match=message):
            Trainer(load_config(None, base + [override]), progress=False)
    trainer = Trainer(load_config(None, base + ["train.eval_every=null", "train.backend=reference"]), progress=False)
    seen = []
    monkeypatch.setattr(Trainer, "_evaluate", lambda self, *args: seen.append(current_backend()) or {})
    trainer.evaluate()
    trainer.close()
    assert seen == ["reference"]


def test_throughput_counts_the_wait_for_data_but_not_evaluations(tmp_path):
    """images_per_s is end to end (data_s waiting for the loader + step_s); an evaluation between two steps
    counts in neither."""
    trainer = Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "train.iterations=3",
                                                "train.checkpoint_every=3", "train.eval_every=1"]), progress=False)

    class SlowLoader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                time.sleep(0.1)
                yield batch

    trainer.train_loader = SlowLoader(trainer.train_loader)
    trainer.evaluate_and_log = lambda: time.sleep(2.0)
    rows = trainer.train()
    trainer.close()
    assert all(r["data_s"] >= 0.1 and r["step_s"] > 0 for r in rows), rows
    # the batches after an evaluation (a fresh process's first batch can take 0.5 s: not compared)
    assert all(r["data_s"] < 1.5 for r in rows[1:]), rows
    assert [r["images_per_s"] for r in rows] == pytest.approx([4 / (r["data_s"] + r["step_s"]) for r in rows])


def test_loader_workers_change_nothing_but_speed(tmp_path, monkeypatch):
    """data.num_workers=2 (persistent worker processes, across an epoch boundary and a mid-epoch resume) gives the
    losses of the in-process loader; `auto` is 0 for synthetic data and the cores per process (<= 8) otherwise."""
    from mtlfast.engine.trainer import resolve_workers

    args = TINY + ON_CPU + ["train.iterations=6", "train.checkpoint_every=3"]
    plain, _ = _losses(load_config(None, args + [f"output_dir={tmp_path / 'plain'}", "data.num_workers=0"]))
    workers = load_config(None, args + [f"output_dir={tmp_path / 'workers'}", "data.num_workers=2"])
    trainer = Trainer(copy.deepcopy(workers), progress=False)
    assert trainer.num_workers == 2 and trainer.train_loader.persistent_workers
    trainer.config["train"]["iterations"] = 3
    first = [r["loss"] for r in trainer.train()]
    trainer.close()
    resumed, _ = _losses(workers, resume=str(tmp_path / "workers" / "last.pt"))
    assert len(plain) == 6 and first + resumed == plain, (plain, first, resumed)
    assert resolve_workers("auto", "synthetic") == 0 and resolve_workers(3, "nyud") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers("auto", "nyud") == 6
    assert resolve_workers("auto", "nyud", "eval.edge_workers", node_shared=False) == 8  # rank 0 evaluates alone
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers("auto", "pascal") == 8
    for bad in ("two", -1, True, 1.5):
        with pytest.raises(ValueError, match="data.num_workers: expected auto or an integer >= 0"):
            resolve_workers(bad, "nyud")
    assert trainer.edge_workers == 0  # eval.edge_workers=auto on synthetic data
    with pytest.raises(ValueError, match="eval.edge_workers: expected auto or an integer >= 0"):
        resolve_workers(-2, "pascal", "eval.edge_workers")


def test_loss_falls_and_eval_runs(tmp_path):
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "train.iterations=40", "train.checkpoint_every=40",
                                       "optim.lr=3e-3"])
    losses, trainer = _losses(config)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    metrics = trainer.evaluate(str(tmp_path / "samples.png"))
    assert {"semseg/mIoU", "depth/rmse", "normals/mean"} <= set(metrics)
    assert os.path.getsize(tmp_path / "samples.png") > 0


def test_last_steps_gradients_are_freed_before_the_forward(tmp_path):
    """A training step drops the previous step's gradients before its forward (zero_grad(set_to_none=True) first),
    so they are not kept alive beside the new activations: a step's peak memory holds one set of gradients, the one
    its backward builds (they were freed only after the forward)."""
    trainer = Trainer(load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=3"]),
                      progress=False)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    alive_in_forward = []
    first = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))  # the forward's start
    first.register_forward_pre_hook(lambda module, args: alive_in_forward.append(
        sum(p.grad is not None for p in params)))
    trainer.train()
    trainer.close()
    assert len(alive_in_forward) == 3 and alive_in_forward == [0, 0, 0]
    assert all(p.grad is not None for p in params)  # the last step's gradients are still there after it


def test_bf16_autocast_trains_and_logs_throughput_and_memory(tmp_path):
    """train.amp=bf16 (the GPU default, forced here on the CPU, where torch's autocast also takes bfloat16): the
    convolutions run in bfloat16 in training and evaluation while the weights stay float32, the loss stays finite,
    and every log row has the throughput and this device's memory column."""
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "train.iterations=3", "train.checkpoint_every=3",
                                       "train.amp=bf16"])
    trainer = Trainer(config, progress=False)
    seen = set()
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.add((m.training, out.dtype)))
    rows = trainer.train()
    assert seen == {(True, torch.bfloat16)}
    metrics = trainer.evaluate()
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(list(metrics.values()))))
    assert torch.backends.cudnn.benchmark == (trainer.device.type == "cuda")  # train.cudnn_benchmark, CUDA only
    torch.backends.cudnn.benchmark = True  # evaluation switches the search off (validation sizes vary), then back
    during = []
    handle = trainer.model.register_forward_hook(lambda *args: during.append(torch.backends.cudnn.benchmark))
    trainer.evaluate()
    handle.remove()
    assert during and not any(during) and torch.backends.cudnn.benchmark
    memory = "peak_mem_mib" if trainer.device.type == "cuda" else "peak_rss_mib"
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and r[memory] > 0 for r in rows)
    logged = trainer.log.read("train")
    assert [float(r[memory]) for r in logged] == [r[memory] for r in rows]
    trainer.close()
    with pytest.raises(ValueError, match="train.amp: expected auto, bf16, fp16 or off, got 'fp8'"):
        Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "train.amp=fp8"]), progress=False)
    with pytest.raises(ValueError, match="train.cudnn_benchmark: expected true or false, got 'fast'"):
        Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "train.cudnn_benchmark=fast"]), progress=False)


def test_fp16_autocast_scales_the_loss_and_skips_overflowing_steps(tmp_path):
    """train.amp=fp16 (GPUs before compute capability 8.0; here on the default device): float16 convolutions, the
    loss scaled for the backward and the gradients unscaled before clipping; a step whose gradients overflow float16
    changes no weight and no optimiser state, halves the scale and still advances the schedule (without torch's
    warning about it); a non-finite gradient at a scale below 2**-16 stops the run."""
    trainer = Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "train.amp=fp16"]), progress=False)
    seen = set()
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    batch = next(iter(trainer.train_loader))
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 2.0 ** 40})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = trainer.train_step(batch)
    assert seen == {torch.float16}
    assert not any("lr_scheduler" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert row["amp_scale"] == 2.0 ** 40 and not math.isfinite(row["grad_norm"]) and math.isfinite(row["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not trainer.optimizer.state
    assert trainer.scaler.get_scale() == 2.0 ** 39 and trainer.scheduler.last_epoch == 1
    trainer.scaler.update(1024.0)
    row = trainer.train_step(batch)
    assert row["amp_scale"] == 1024.0 and trainer.scaler.get_scale() == 1024.0
    assert not all(torch.equal(a, b) for a, b in zip(before, params)) and trainer.optimizer.state
    # the clipped and logged norm is the true one (unscaled): that of the same first step in float32
    plain = Trainer(load_config(None, TINY + [f"output_dir={tmp_path / 'fp32'}", "train.amp=off"]), progress=False)
    assert row["grad_norm"] == pytest.approx(plain.train_step(batch)["grad_norm"], rel=0.02)
    plain.close()
    trainer.scaler.update(2.0 ** -17)
    params[0].register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(FloatingPointError, match=r"float16 gradients are not finite at iteration 1 even at loss "
                                                 r"scale 7.62939e-06 \(loss .*\): train.amp=bf16 or off"):
        trainer.train_step(batch)
    trainer.close()


def test_a_warning_raised_in_every_step_shows_once(tmp_path):
    """Python shows a warning once per place ("default" action); a training step must not reset that memory (a
    warnings.catch_warnings block does), or a library's warning floods the log at every iteration."""
    trainer = Trainer(load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=3"]),
                      progress=False)
    first = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda *args: warnings.warn("a library's warning", UserWarning))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        trainer.train()
    trainer.close()
    assert [str(w.message) for w in caught].count("a library's warning") == 1


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    """The loss scale and its growth count are part of the exact resume: with the scale doubling after every
    finite step (growth_interval=1, so that it moves within a short run), the resumed run replays the losses
    and scales of the uninterrupted one."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=1))
    args = TINY + ON_CPU + ["train.iterations=5", "train.checkpoint_every=2", "train.amp=fp16"]

    def run(folder, stop=None, resume=None):
        trainer = Trainer(load_config(None, args + [f"output_dir={tmp_path / folder}"]), resume=resume, progress=False)
        if stop:
            trainer.config["train"]["iterations"] = stop  # the same 5-iteration schedule, stopped at a checkpoint
        rows = trainer.train()
        trainer.close()
        return [(r["loss"], r["amp_scale"]) for r in rows]

    full = run("full")
    assert full[2][1] != 2.0 ** 16, full  # the first resumed step's scale: not a fresh scaler's
    resumed = run("part", stop=2) + run("part", resume=str(tmp_path / "part" / "last.pt"))
    assert resumed == full


def _without_batchnorm(trainer):
    """BatchNorm's statistics are per micro-batch: swapped for identities where a test compares batchings."""
    for module in list(trainer.model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())


@pytest.mark.parametrize("norm", ["step", "micro"])
def test_accumulated_micro_batches_step_as_their_whole_batch(tmp_path, norm):
    """Two micro-batches of 2 accumulate the gradient of their batch of 4 (BatchNorm, whose statistics are per
    micro-batch, swapped out). train.accumulate_norm=step: with the synthetic labels as they are, whose ignored
    pixels and invalid depth/normals differ between the halves (checked: else the test could not tell the modes
    apart), and the logged losses are the whole batch's. micro: each half normalised within itself, which is the
    whole batch's gradient only where the halves have equally many valid labels (every label made valid here), and
    the logged losses are the halves' mean. A step given another number of micro-batches than train.accumulate is
    refused before it changes anything."""
    args = TINY + ON_CPU + ["optim.grad_clip=null"]
    whole = Trainer(load_config(None, args + [f"output_dir={tmp_path / 'whole'}"]), progress=False)
    micro = Trainer(load_config(None, args + [f"output_dir={tmp_path / 'micro'}", "train.accumulate=2",
                                              f"train.accumulate_norm={norm}"]), progress=False)
    batch = next(iter(whole.train_loader))
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]  # tensors and the meta list
    counts = [whole.loss_fn.normalisers([half]) for half in halves]
    assert all(counts[0][t]["count"] != counts[1][t]["count"] for t in ("semseg", "depth", "normals")), counts
    if norm == "micro":
        batch["semseg"][batch["semseg"] == 255] = 0
        batch["depth"][batch["depth"] == 0] = 1.0
        batch["normals"][:, 2][batch["normals"].norm(dim=1) == 0] = 1.0
    for trainer in (whole, micro):
        _without_batchnorm(trainer)
    # a micro-batch's predictions are freed before the next one's forward (memory is the point of accumulating)
    loss_fn, predictions, alive = micro.loss_fn, [], []

    def recorded(preds, *rest):
        predictions.extend(weakref.ref(p) for p in preds.values())
        return loss_fn(preds, *rest)

    recorded.normalisers = loss_fn.normalisers
    micro.loss_fn = recorded
    first = next(m for m in micro.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_pre_hook(lambda *args: alive.append(sum(r() is not None for r in predictions)))
    a, b = whole.train_step(batch), micro.train_step(iter(halves))
    assert alive == [0, 0] and len(predictions) == 6
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5) for k in a), (a, b)
    for p, q in zip(whole.model.parameters(), micro.model.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert rel_error(q.grad, p.grad) < 1e-5
    state = [p.detach().clone() for p in micro.model.parameters()]
    with pytest.raises(ValueError, match="more than train.accumulate=2 micro-batches"):
        micro.train_step(iter(halves * 2))
    with pytest.raises(ValueError, match="1 micro-batches, expected 2"):
        micro.train_step(iter(halves[:1]))
    assert all(torch.equal(p, q) for p, q in zip(state, micro.model.parameters()))
    whole.close()
    micro.close()


@pytest.mark.parametrize("stop", [1, 2])
def test_accumulating_resume_replays_the_same_losses_across_epochs(tmp_path, stop):
    """train.accumulate=3 with 4 batches per epoch: steps straddle epochs, the checkpoint saves the position
    batch by batch (2 steps: epoch 1, batch 2), and the resumed run replays the uninterrupted one's losses."""
    args = TINY + ON_CPU + ["train.iterations=4", f"train.checkpoint_every={stop}", "train.accumulate=3"]
    full, _ = _losses(load_config(None, args + [f"output_dir={tmp_path / 'full'}"]), setup=_dropout)
    trainer = Trainer(load_config(None, args + [f"output_dir={tmp_path / 'part'}"]), progress=False)
    _dropout(trainer)
    trainer.config["train"]["iterations"] = stop
    first = [r["loss"] for r in trainer.train()]
    assert (trainer.epoch, trainer.batch_in_epoch) == divmod(3 * stop, 4)
    trainer.close()
    resumed, _ = _losses(load_config(None, args + [f"output_dir={tmp_path / 'part'}"]),
                         resume=str(tmp_path / "part" / "last.pt"), setup=_dropout)
    assert len(full) == 4 and first + resumed == full, (full, first, resumed)


def test_run_records_its_config_and_the_environment_of_each_start(tmp_path, capsys):
    """config.yaml holds the config in force, which --config takes back; environment.json one entry per start of
    training (fresh, then resumed at the checkpoint's iteration) with the processes, device, versions and source
    fingerprint; an unreadable environment.json is written afresh with a note, not a failure of the run."""
    args = TINY + ON_CPU + [f"output_dir={tmp_path}", "train.checkpoint_every=1"]
    _losses(load_config(None, args + ["train.iterations=2"]))
    assert load_config(str(tmp_path / "config.yaml")) == load_config(None, args + ["train.iterations=2"])
    _losses(load_config(None, args + ["train.iterations=3"]), resume=str(tmp_path / "last.pt"))
    assert load_config(str(tmp_path / "config.yaml"))["train"]["iterations"] == 3
    starts = json.loads((tmp_path / "environment.json").read_text())
    assert [s["iteration"] for s in starts] == [0, 2]
    from mtlfast.bench.harness import source_fingerprint

    assert all(s["processes"] == 1 and s["torch"] == torch.__version__ and s["source"] == source_fingerprint()
               and s["device"].startswith("CPU") for s in starts), starts
    (tmp_path / "environment.json").write_text('{"truncated')
    capsys.readouterr()
    _losses(load_config(None, args + ["train.iterations=4"]), resume=str(tmp_path / "last.pt"))
    assert "environment.json: not a readable JSON file" in capsys.readouterr().err
    assert [s["iteration"] for s in json.loads((tmp_path / "environment.json").read_text())] == [3]
    os.remove(tmp_path / "last.pt")  # a run that saved no checkpoint there: the next one starts the list afresh
    _losses(load_config(None, args + ["train.iterations=1"]))
    assert [s["iteration"] for s in json.loads((tmp_path / "environment.json").read_text())] == [0]
    os.remove(tmp_path / "config.yaml")
    os.mkdir(tmp_path / "config.yaml")  # cannot be replaced: reported, the run goes on
    capsys.readouterr()
    losses, _ = _losses(load_config(None, args + ["train.iterations=2"]), resume=str(tmp_path / "last.pt"))
    assert len(losses) == 1 and f"{tmp_path / 'config.yaml'}: not written (" in capsys.readouterr().err
    assert [s["iteration"] for s in json.loads((tmp_path / "environment.json").read_text())] == [0, 1]


def test_amp_auto_takes_bf16_where_the_gpu_computes_it_else_fp16(monkeypatch):
    from mtlfast.engine.trainer import _autocast_dtype

    assert _autocast_dtype("auto", torch.device("cpu")) is None
    for native, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert _autocast_dtype("auto", torch.device("cuda")) == dtype
        assert _autocast_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # as asked, whatever the GPU
    assert _autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    assert _autocast_dtype("off", torch.device("cuda")) is None


def test_baseline_checked_before_training_and_delta_m_logged(tmp_path):
    """eval.baseline (the default: the stored synthetic one) restricted to the run's tasks and Δm reported by
    every evaluation; an unknown name, a baseline of another dataset or one without numbers for a run task
    fails when the trainer is built."""
    base = TINY + [f"output_dir={tmp_path}", "data.tasks=[semseg, depth]"]
    trainer = Trainer(load_config(None, base), progress=False)
    assert sorted(trainer.baseline) == ["depth", "semseg"]
    metrics = trainer.evaluate()
    from mtlfast.metrics import delta_m

    results = {"semseg": {"mIoU": metrics["semseg/mIoU"]}, "depth": {"rmse": metrics["depth/rmse"]}}
    assert metrics["delta_m"] == delta_m(results, trainer.baseline)
    trainer.close()
    with pytest.raises(FileNotFoundError, match="synthetic_convnet_tiny_single_tsk"):
        Trainer(load_config(None, base + ["eval.baseline=synthetic_convnet_tiny_single_tsk"]), progress=False)
    with pytest.raises(ValueError, match="holds nyud results, not synthetic"):
        Trainer(load_config(None, base + ["eval.baseline=nyud_hrnet_w18_single_task"]), progress=False)
    partial = tmp_path / "partial.yaml"
    partial.write_text("metrics:\n  semseg:\n    mIoU: 50.0\n")
    with pytest.raises(ValueError, match=r"no single-task numbers for \['depth'\]"):
        Trainer(load_config(None, base + [f"eval.baseline={partial}"]), progress=False)
    trainer = Trainer(load_config(None, base + ["eval.baseline=null"]), progress=False)
    assert trainer.baseline is None and "delta_m" not in trainer.evaluate()
    trainer.close()


_DDP_SCRIPT = """
import sys, torch
from mtlfast.engine.config import load_config
from mtlfast.engine.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]), progress=False)
torch.save(torch.get_rng_state(), trainer.out_dir + f"/rng_rank{trainer.dist.rank}.pt")
def weights():
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
torch.save(weights(), trainer.out_dir + f"/initial_weights_rank{trainer.dist.rank}.pt")
local, seen, own, loss_fn = [], [], [], trainer.loss_fn
def ints(norms):
    return {task: {k: int(v) for k, v in norm.items()} for task, norm in norms.items()} if norms else None
def recorded(preds, labels, aux, normalised_by):
    total, per_task = loss_fn(preds, labels, aux, normalised_by)
    local.append(total.item())
    seen.append(ints(normalised_by))
    own.append(ints(loss_fn.normalisers([labels])))
    return total, per_task
recorded.normalisers = loss_fn.normalisers
trainer.loss_fn = recorded
from torch.nn.parallel import DistributedDataParallel
no_sync, unsynced = DistributedDataParallel.no_sync, []
def counted(self):  # on the class: the wrapper must not hold the module (it is freed in close, checked below)
    unsynced.append(1)
    return no_sync(self)
DistributedDataParallel.no_sync = counted
rows = trainer.train()
torch.save(weights(), trainer.out_dir + f"/weights_rank{trainer.dist.rank}.pt")
graphs = 0
if trainer.config["train"]["compile"]:  # (importing dynamo in an eager run kept DDP's wrapper alive past close)
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
torch.save({"local": local, "seen": seen, "own": own, "logged": [r["loss"] for r in rows], "no_sync": len(unsynced),
            "graphs": graphs}, trainer.out_dir + f"/losses_rank{trainer.dist.rank}.pt")
sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
torch.save(sync_bn, trainer.out_dir + f"/sync_bn_rank{trainer.dist.rank}.pt")
import weakref, mtlfast.engine.trainer as trainer_module
wrapper = weakref.ref(getattr(trainer.train_forward, "_orig_mod", trainer.train_forward))  # DDP's, also compiled
cleanup = trainer_module.cleanup
def recorded_cleanup(info):
    torch.save(wrapper() is None, trainer.out_dir + f"/ddp_freed_before_cleanup_rank{trainer.dist.rank}.pt")
    cleanup(info)
trainer_module.cleanup = recorded_cleanup
trainer.close()
"""


def _launch(processes, target, timeout=900):
    """``torchrun --standalone --nproc_per_node=processes TARGET...`` (a script or ``-m module`` and its
    arguments), one thread per process; fails the test with the end of the output unless it succeeds (a run
    past ``timeout`` seconds, e.g. ranks deadlocked in mismatched collectives, is killed with its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={processes}", *target], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its workers (each in a session of its own) on SIGTERM
        stdout, stderr = process.communicate(timeout=120)
        pytest.fail(f"torchrun still running after {timeout} s (deadlock?):\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]


def _torchrun(tmp_path, processes, args):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    _launch(processes, [str(script), *args])


_GLOBAL_BATCH_SCRIPT = """
import sys, torch
class NoBatchNorm(torch.nn.Identity):  # BatchNorm's statistics are per rank: the models are built without it
    def __init__(self, *args, **kwargs):
        super().__init__()
torch.nn.BatchNorm2d = NoBatchNorm
from mtlfast.engine.config import load_config
from mtlfast.engine.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]), progress=False)
def weights():
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
initial = weights()
trainer.train()
if trainer.dist.rank == 0:
    torch.save(weights() - initial, trainer.out_dir + "/update.pt")
trainer.close()
"""


def test_ranks_step_as_one_process_on_their_global_batch(tmp_path):
    """train.accumulate_norm=step across DDP ranks: 2 processes with batches of 2 take the same 2 SGD steps as one
    process with the batches of 4 they share (the sampler deals each global batch out to the ranks; augmentations
    are seeded per sample; BatchNorm left out, its statistics being per rank), whatever the ignored pixels per
    image; with micro (each rank normalised within itself, DDP's mean) they do not, so the test can tell."""
    script = tmp_path / "global_batch.py"
    script.write_text(_GLOBAL_BATCH_SCRIPT)
    args = TINY + ON_CPU + ["train.iterations=2", "train.checkpoint_every=2", "optim.name=sgd", "optim.momentum=0",
                            "optim.lr=0.05", "optim.grad_clip=null"]
    runs = {"one": (1, ["data.batch_size=4"]), "step": (2, ["data.batch_size=2"]),
            "micro": (2, ["data.batch_size=2", "train.accumulate_norm=micro"])}
    update = {}
    for name, (processes, extra) in runs.items():
        _launch(processes, [str(script), *args, *extra, f"output_dir={tmp_path / name}"])
        update[name] = torch.load(tmp_path / name / "update.pt")
    errors = rel_error(update["step"], update["one"]), rel_error(update["micro"], update["one"])
    assert errors[0] < 1e-5 and errors[1] > 1e-3, errors  # measured: 4e-8 and 1.2e-2


@pytest.mark.parametrize("amp, accumulate, norm, compiled", [
    ("off", 1, "step", False), ("fp16", 1, "step", False), ("off", 2, "step", False), ("off", 2, "micro", False),
    ("off", 2, "step", True)])
def test_two_process_ddp_ends_with_equal_weights(tmp_path, amp, accumulate, norm, compiled):
    """Both ranks end with the same weights, and these moved from the initial ones (the run stepped); the loss both
    ranks return and rank 0 logs is the whole step's, not rank 0's: with train.accumulate_norm=step every loss is
    normalised by the counts of all micro-batches of both ranks (all-reduced: each rank saw their sum), so the
    logged loss is the sum of every micro-batch's share; with micro, the mean over the ranks of each rank's mean
    over its micro-batches. In float16 every rank unscales the same all-reduced gradients, so all skip a step alike
    and keep one loss scale (the first steps overflow at the initial 2**16 here: 10 iterations, so that some step
    is taken). Accumulating, DDP's all-reduce waits for the last micro-batch (no_sync before). ``compiled``:
    train.compile=true, torch.compile around the DDP wrapper (Inductor)."""
    its = 10 if amp == "fp16" else 3
    _torchrun(tmp_path, 2, TINY + ON_CPU + [f"output_dir={tmp_path}", f"train.iterations={its}",
                                            f"train.checkpoint_every={its}", f"train.amp={amp}",
                                            f"train.accumulate={accumulate}", f"train.accumulate_norm={norm}",
                                            f"train.compile={str(compiled).lower()}"])
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
    assert not torch.equal(w0, torch.load(tmp_path / "initial_weights_rank0.pt"))
    assert os.path.exists(tmp_path / "last.pt")
    l0, l1 = (torch.load(tmp_path / f"losses_rank{r}.pt") for r in (0, 1))
    assert l0["local"] != l1["local"] and l0["logged"] == l1["logged"]
    assert l0["no_sync"] == l1["no_sync"] == its * (accumulate - 1)  # the micro-batches before each step's last
    assert (l0["graphs"] > 0) == (l1["graphs"] > 0) == compiled
    steps = [range(i, i + accumulate) for i in range(0, its * accumulate, accumulate)]
    if norm == "step":
        for step in steps:  # the step's normalisers: the sum of its micro-batches' own, over both ranks
            total = {task: {k: sum(r["own"][i][task][k] for r in (l0, l1) for i in step) for k in counts}
                     for task, counts in l0["own"][step[0]].items()}
            assert all(r["seen"][i] == total for r in (l0, l1) for i in step), (total, l0["seen"], l1["seen"])
        mean = [sum(r["local"][i] for r in (l0, l1) for i in step) for step in steps]
    else:
        assert l0["seen"] == l1["seen"] == [None] * its * accumulate
        mean = [sum(r["local"][i] for r in (l0, l1) for i in step) / (2 * accumulate) for step in steps]
    assert len(mean) == its
    assert l0["logged"] == pytest.approx(mean, rel=1e-6)
    from mtlfast.engine.logs import RunLog

    logged = RunLog(str(tmp_path)).read("train")
    assert [r["loss"] for r in logged] == pytest.approx(mean, rel=1e-6)
    scales = [r.get("amp_scale") for r in logged]
    assert all(math.log2(s).is_integer() for s in scales) if amp == "fp16" else scales == [None] * its, scales
    # one RNG stream per rank for the training forward (dropout masks differ), every rank's state in the checkpoint
    assert not torch.equal(*(torch.load(tmp_path / f"rng_rank{r}.pt") for r in (0, 1)))
    states = torch.load(tmp_path / "last.pt", weights_only=False)["rng_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    # Trainer.close: DDP's wrapper (and reducer) freed before the process group is destroyed (see its docstring)
    assert all(torch.load(tmp_path / f"ddp_freed_before_cleanup_rank{r}.pt") for r in (0, 1))


def test_cli_train_under_torchrun_evaluates_first_and_eval_loads_its_checkpoint(tmp_path):
    """`torchrun -m mtlfast train` with train.eval_at_start (the default): rank 0 evaluates the untrained model
    while the other ranks wait for it (instead of going on into the DDP step against rank 0's barrier: a
    deadlock); `mtlfast eval` loads the DDP run's checkpoint (the unwrapped model's weights, no 'module.')."""
    from mtlfast.engine.logs import RunLog

    out = tmp_path / "run"
    _launch(2, ["-m", "mtlfast", "train", "--no-progress", f"output_dir={out}", "train.iterations=2",
                "train.checkpoint_every=2", "train.eval_every=2", *ON_CPU, *TINY[:-3], "eval.edge_thresholds=5"],
            timeout=300)
    assert [int(r["iteration"]) for r in RunLog(str(out)).read("eval")] == [0, 2]
    assert not any(k.startswith("module.") for k in torch.load(out / "last.pt", weights_only=False)["model"])
    evaluate = subprocess.run([sys.executable, "-m", "mtlfast", "eval", "--checkpoint", str(out / "last.pt")],
                              capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0 and "(iteration 2)" in evaluate.stdout, evaluate.stderr[-3000:]


def test_sharded_evaluation_equals_the_single_process_one(tmp_path):
    """eval.sharded=true under torchrun (2 gloo processes, 5 validation images: 3 + 2): the evaluations in training
    and `mtlfast eval` sum the ranks' meters to the metrics one process computes on the same weights, every
    task's meter included (edge and saliency too)."""
    from mtlfast.engine.logs import RunLog

    out, common = tmp_path / "run", [*ON_CPU, *TINY[:-3], "eval.edge_thresholds=5", "data.num_val=5",
                                     "data.tasks=[semseg, depth, normals, edge, sal]", "eval.sharded=true",
                                     "eval.batch_size=1"]  # batches of other images change the outputs' last bits
    _launch(2, ["-m", "mtlfast", "train", "--no-progress", f"output_dir={out}", "train.iterations=2",
                "train.checkpoint_every=2", "train.eval_every=2", *common], timeout=300)
    _launch(2, ["-m", "mtlfast", "eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "sharded.json"),
                "eval.sharded=true"], timeout=300)
    single = subprocess.run([sys.executable, "-m", "mtlfast", "eval", "--checkpoint", str(out / "last.pt"), "--out",
                             str(tmp_path / "single.json")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # as _launch: other threads, other bits
    assert single.returncode == 0, single.stderr[-3000:]
    sharded, whole = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("sharded", "single"))
    logged = {k: float(v) for k, v in RunLog(str(out)).read("eval")[-1].items() if k != "iteration"}
    assert {"edge/odsF", "sal/mIoU", "depth/rmse"} <= set(whole) and set(sharded) == set(whole) == set(logged)
    assert sharded == pytest.approx(whole, rel=1e-9) and logged == pytest.approx(whole, rel=1e-6)


def test_sync_bn_refused_on_cpu(tmp_path):
    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.sync_bn=true"])
    with pytest.raises(ValueError, match="train.sync_bn: torch's SyncBatchNorm runs on CUDA only"):
        Trainer(config, progress=False)


def test_train_device_option(tmp_path):
    """train.device: auto, cuda or cpu; anything else, or cuda without a GPU, is refused naming the key."""
    from mtlfast.engine.trainer import _device_type

    assert _device_type("cpu") == "cpu"
    assert _device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="train.device: expected auto, cuda or cpu, got 'gpu'"):
        Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "train.device=gpu"]), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda: no CUDA device"):
            _device_type("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("checkpoint_decoder", [False, True])
def test_sync_bn_under_torchrun_gpu(tmp_path, checkpoint_decoder):
    """train.sync_bn=true on CUDA: every BatchNorm becomes a SyncBatchNorm and trains under torchrun, also with
    the decoder stages checkpointed. One process (the test machine has one GPU and NCCL takes one per process),
    so no statistics are exchanged: this checks the conversion and the training path, not the collectives; torch
    has no CPU SyncBatchNorm, so CPU runs refuse it."""
    args = TINY + [f"output_dir={tmp_path}", "train.iterations=3", "train.checkpoint_every=3", "train.sync_bn=true",
                   f"model.checkpoint_decoder={str(checkpoint_decoder).lower()}"]
    _torchrun(tmp_path, 1, args)
    assert torch.load(tmp_path / "sync_bn_rank0.pt") > 0
    assert torch.isfinite(torch.load(tmp_path / "weights_rank0.pt")).all()
    assert os.path.exists(tmp_path / "last.pt")


def test_cli_train_then_eval(tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, "-m", "mtlfast"]
    # on the CPU: `mtlfast score` sums depth errors on the CPU, which a GPU evaluation reduces in another order
    train = subprocess.run(common + ["train", "--no-progress", f"output_dir={out}", "train.iterations=2",
                                     "train.checkpoint_every=2", "train.eval_every=2", *TINY[:-3], *ON_CPU],
                           capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final evaluation (iteration 2)" in train.stdout
    # reported as they happen (no progress bar: a scheduler's log): training rows and each evaluation
    assert "\niteration 2/2: loss " in train.stdout and "\nevaluation at iteration 2: semseg/mIoU " in train.stdout
    assert (out / "curves.png").exists() and (out / "train.csv").exists()
    metrics_file = tmp_path / "new" / "m.json"  # its folder does not exist yet
    evaluate = subprocess.run(common + ["eval", "--checkpoint", str(out / "last.pt"), "--out", str(metrics_file),
                                        "--save-predictions", str(tmp_path / "pred")],
                              capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    per_class = json.loads(metrics_file.read_text())["per_class_iou"]
    assert list(per_class) == ["semseg"] and len(per_class["semseg"]) == 6  # the synthetic classes
    assert all(v is None or 0 <= v <= 100 for v in per_class["semseg"])
    assert {p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.*")} == {
        f"{task}/val_{i:06d}.{ext}" for task, ext in (("semseg", "png"), ("depth", "npy"), ("normals", "png"))
        for i in range(4)}
    score = subprocess.run(common + ["score", "--predictions", str(tmp_path / "pred"), "--checkpoint", str(out / "last.pt"),
                                     "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=900)
    assert score.returncode == 0, score.stderr[-3000:]
    evaluated, scored = (json.loads(path.read_text()) for path in (metrics_file, tmp_path / "s.json"))
    assert set(scored["metrics"]) == set(evaluated["metrics"])
    assert all(scored["metrics"][k] == evaluated["metrics"][k] for k in ("semseg/mIoU", "depth/rmse"))
    assert scored["per_class_iou"] == per_class  # class ids are stored exactly
    # evaluating an earlier checkpoint of the run leaves the run's logs whole (a resume cuts them back to it)
    from mtlfast.engine import checkpoint as ckpt

    logs = {name: (out / name).read_text() for name in ("train.csv", "eval.csv")}
    ckpt.save_checkpoint(str(tmp_path / "earlier.pt"), {**ckpt.load_checkpoint(str(out / "last.pt")), "iteration": 1})
    evaluate = subprocess.run(common + ["eval", "--checkpoint", str(tmp_path / "earlier.pt")], capture_output=True,
                              text=True, timeout=900)
    assert evaluate.returncode == 0 and "(iteration 1)" in evaluate.stdout, evaluate.stderr[-3000:]
    assert {name: (out / name).read_text() for name in logs} == logs
    # a new run in the folder of an earlier one would overwrite its checkpoint and append to its logs: refused
    checkpoint = (out / "last.pt").read_bytes()
    again = subprocess.run(common + ["train", "--no-progress", f"output_dir={out}", "train.iterations=1", *TINY],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 1 and "holds the checkpoint of an earlier run" in again.stderr, again.stderr[-3000:]
    assert (out / "last.pt").read_bytes() == checkpoint and {n: (out / n).read_text() for n in logs} == logs
    bad = subprocess.run(common + ["eval", "--checkpoint", str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"mtlfast eval: FileNotFoundError: checkpoint: no such file '{tmp_path / 'missing.pt'}'")
    debug = subprocess.run(common + ["eval", "--checkpoint", str(tmp_path / "missing.pt")], capture_output=True,
                           text=True, env={**os.environ, "MTLFAST_TRACEBACK": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "no such file" in debug.stderr


def test_cli_train_resume_auto_starts_or_resumes(tmp_path, capsys):
    """`mtlfast train --resume auto` starts a run where output_dir holds no last.pt and resumes it where it does
    (here extended from 2 to 4 iterations: the log goes on from iteration 3)."""
    from mtlfast import cli
    from mtlfast.engine.logs import RunLog

    args = ["train", "--no-progress", "--resume", "auto", f"output_dir={tmp_path / 'run'}",
            "train.checkpoint_every=2", *TINY, *ON_CPU]
    assert cli.main(args + ["train.iterations=2"]) == 0, capsys.readouterr().err
    assert "resume:" not in capsys.readouterr().err
    status, err = cli.main(args + ["train.iterations=4"]), capsys.readouterr().err
    assert status == 0 and "train.iterations: 2 -> 4" in err, err
    assert [int(r["iteration"]) for r in RunLog(str(tmp_path / "run")).read("train")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0  # plotted at each checkpoint: no evaluation here


def test_progress_bar_shows_the_loss_and_evaluations_print_above_it(tmp_path, capsys):
    """progress=True (the CLI's default): a tqdm bar on stderr with the loss, in place of the per-row lines; an
    evaluation's line is printed above it (tqdm.write), and the bar is closed at the end."""
    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path}", "train.iterations=2", "train.eval_every=2"])
    trainer = Trainer(config, progress=True)
    trainer.train()
    trainer.close()
    out, err = capsys.readouterr()
    assert "train: 100%" in err and "2/2" in err and "loss=" in err and trainer._bar is None
    assert "evaluation at iteration 2: semseg/mIoU " in out and "iteration 1/2" not in out + err


def _run(tmp_path, name, extra):
    config = load_config(None, TINY + ON_CPU + [f"output_dir={tmp_path / name}", "train.iterations=2",
                                                "train.checkpoint_every=2", "train.backend=reference", *extra])
    trainer = Trainer(config, progress=False)
    rows = trainer.train()
    trainer.close()
    return rows, trainer


def test_checkpoint_decoder_trains_like_the_plain_model(tmp_path):
    """model.checkpoint_decoder=true and model.checkpoint_backbone=true through the trainer: 2 iterations of SEM
    (EM bases + BatchNorm buffers in every checkpointed decoder stage, BatchNorm in every convnet_tiny stage) give
    the losses, weights and buffers of the plain run."""
    sem = ["model.name=sem", "model.kwargs={dim: 16, num_bases: 8, em_iters: 2}"]
    plain_rows, plain = _run(tmp_path, "plain", sem)
    rows, trainer = _run(tmp_path, "checkpointed", sem + ["model.checkpoint_decoder=true",
                                                          "model.checkpoint_backbone=true"])
    assert trainer.model.checkpoint_decoder and not plain.model.checkpoint_decoder
    assert trainer.model.checkpoint_backbone and not plain.model.checkpoint_backbone
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain_rows] and len(rows) == 2
    ours, theirs = trainer.model.state_dict(), plain.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_compiled_training_forward_trains_like_the_eager_one(tmp_path):
    """train.compile=true: the training forward under torch.compile (Inductor: its C++ code on a CPU, Triton on a
    GPU) with the Triton kernels inside (TPIM's iterative_fusion, an opaque op in the graph) compiles once for the
    whole run: one graph, also after an evaluation (which runs eagerly) between steps; the losses are the eager
    run's up to float32 rounding (CPU: the first step's within 1e-5, measured 3e-7; SGD compounds it after, 4e-5
    by the third; a GPU gets 10x, unmeasured: Inductor's fused reductions, cuDNN). (Bad values: test_engine.)"""
    from torch._dynamo.utils import counters

    args = TINY + ["model.name=tpim", "model.kwargs={channels: 16, dim: 8, n_iter: 3}", "optim.name=sgd",
                   "optim.lr=0.01", "train.eval_every=2", "train.iterations=3", "train.checkpoint_every=3",
                   "train.amp=off", "train.backend=triton"]
    eager, _ = _losses(load_config(None, args + [f"output_dir={tmp_path / 'eager'}"]))
    torch._dynamo.reset()  # no cache entry of an earlier test's _TrainForward
    counters.clear()
    compiled, trainer = _losses(load_config(None, args + [f"output_dir={tmp_path / 'compiled'}", "train.compile=true"]))
    assert isinstance(trainer.train_forward, torch._dynamo.eval_frame.OptimizedModule)
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (1, 1), dict(counters)
    first, later = (1e-5, 1e-3) if trainer.device.type == "cpu" else (1e-4, 1e-2)
    assert len(compiled) == 3 and abs(compiled[0] / eager[0] - 1) < first, (compiled, eager)
    assert all(abs(c / e - 1) < later for c, e in zip(compiled, eager)), (compiled, eager)


def test_auxiliary_tasks_train_end_to_end(tmp_path):
    """model.kwargs.aux_tasks: the training set loads their labels, the loss supervises the auxiliary
    (front-end) predictions, evaluation and the task list stay the main tasks', a checkpoint resumes only with
    the same aux_tasks; an auxiliary task without labels in the dataset, or on a method without auxiliary
    tasks, is a clear error before any data loads."""
    import pytest

    from mtlfast.losses import LOSS_WEIGHTS

    aux = ["model.name=mtinet", "model.kwargs={aux_tasks: [edge, sal], channels: [8, 8, 8, 8]}",
           "data.tasks=[semseg, depth]"]
    rows, trainer = _run(tmp_path, "aux", aux)
    assert trainer.tasks == ["semseg", "depth"] and trainer.aux_tasks == ["edge", "sal"]
    assert trainer.model.aux_tasks == ("edge", "sal") and trainer.loss_fn.aux_tasks == ("edge", "sal")
    assert {"edge", "sal"} <= set(trainer.train_set[0]) and not {"edge", "sal"} & set(trainer.val_set[0])
    for row in rows:
        for s in range(4):
            assert {f"loss_scale_{s}/edge", f"loss_scale_{s}/sal"} <= set(row)
        assert "loss_edge" not in row and "loss_sal" not in row
        main = row["loss_semseg"] + row["loss_depth"] + sum(
            LOSS_WEIGHTS[t] * row[f"loss_scale_{s}/{t}"] for s in range(4) for t in ("semseg", "depth", "edge", "sal"))
        assert abs(row["loss"] - main) < 1e-4 * row["loss"]
    metrics = trainer.evaluate()
    assert {k.split("/")[0] for k in metrics} == {"semseg", "depth", "delta_m"}  # Δm over the main tasks
    assert trainer.log.read("train")[-1]["loss_scale_0/sal"] != ""
    saved = torch.load(tmp_path / "aux" / "last.pt", weights_only=False)
    assert saved["config"]["data"]["tasks"] == ["semseg", "depth"]
    assert any(".edge." in k for k in saved["model"]), "the auxiliary heads are part of the checkpoint"
    other = load_config(None, TINY + aux[:1] + ["model.kwargs={aux_tasks: [edge], channels: [8, 8, 8, 8]}",
                                                 aux[2], f"output_dir={tmp_path / 'aux'}"])
    with pytest.raises(RuntimeError, match=r"model.kwargs.aux_tasks=\['edge', 'sal'\] but the config asks for \['edge'\]"):
        Trainer(other, resume=str(tmp_path / "aux" / "last.pt"), progress=False)
    nyud = TINY[:4] + ["data.dataset=nyud", "data.root=/nonexistent", "data.tasks=[semseg, depth]", "model.name=padnet"]
    with pytest.raises(ValueError, match=r"model.kwargs.aux_tasks: dataset nyud has no labels for \['sal'\] "
                                         r"\(it has semseg, depth, normals, edge\)"):
        Trainer(load_config(None, nyud + ["model.kwargs={aux_tasks: [normals, sal]}"]), progress=False)
    with pytest.raises(ValueError, match="model 'bridgenet' has no auxiliary tasks"):
        Trainer(load_config(None, nyud[:-1] + ["model.name=bridgenet", "model.kwargs={aux_tasks: [edge]}"]),
                progress=False)
    with pytest.raises(ValueError, match=r"model.kwargs.aux_tasks: \['depth'\] are already main tasks"):
        Trainer(load_config(None, nyud + ["model.kwargs={aux_tasks: [depth]}"]), progress=False)


def test_two_process_ddp_with_checkpoint_decoder_matches_the_plain_ddp_run(tmp_path):
    """model.checkpoint_decoder and model.checkpoint_backbone under DDP (2 processes, gloo): the recomputation in
    the backward does not disturb DDP's gradient reduction (every parameter reduced once per step, SEM's EM bases
    and BatchNorm statistics updated once): both ranks end with the weights of the same DDP run without
    checkpointing."""
    sem = ["model.name=sem", "model.kwargs={dim: 16, num_bases: 8, em_iters: 2}", "train.iterations=2",
           "train.checkpoint_every=2"]
    for name, extra in (("plain", []), ("checkpointed", ["model.checkpoint_decoder=true",
                                                         "model.checkpoint_backbone=true"])):
        (tmp_path / name).mkdir()
        _torchrun(tmp_path / name, 2, TINY + ON_CPU + sem + extra + [f"output_dir={tmp_path / name}"])
    weights = {name: [torch.load(tmp_path / name / f"weights_rank{r}.pt") for r in (0, 1)]
               for name in ("plain", "checkpointed")}
    assert torch.equal(weights["checkpointed"][0], weights["checkpointed"][1])
    assert torch.equal(weights["checkpointed"][0], weights["plain"][0])
    plain, ours = (torch.load(tmp_path / n / "last.pt", weights_only=False)["model"] for n in ("plain", "checkpointed"))
    assert plain.keys() == ours.keys() and all(torch.equal(ours[k], plain[k]) for k in ours), "buffers too"


def test_baseline_command_under_torchrun(tmp_path):
    """`mtlfast baseline` with 2 processes (gloo): one DDP run per task in the same process group, rank 0
    evaluates and writes the file; the numbers equal those of the checkpoints it leaves."""
    from mtlfast.engine import checkpoint as ckpt
    from mtlfast.metrics import load_baseline

    out = tmp_path / "measured.yaml"
    args = [f"output_dir={tmp_path / 'runs'}", "train.iterations=2", "train.checkpoint_every=2",
            "data.tasks=[semseg, depth]", *ON_CPU, *[a for a in TINY if not a.startswith("data.tasks")]]
    _launch(2, ["-m", "mtlfast", "baseline", "--no-progress", "--out", str(out), *args])
    measured = load_baseline(out)
    assert set(measured) == {"semseg", "depth"}
    for task in measured:
        last = tmp_path / "runs" / "single_task" / task / "last.pt"
        config = ckpt.load_checkpoint(str(last))["config"]
        trainer = Trainer(config, resume=str(last), progress=False)
        (name, value), = measured[task].items()
        # this process runs with other thread counts than the workers (float32 sums in another order)
        assert trainer.evaluate()[f"{task}/{name}"] == pytest.approx(value, rel=1e-6)
        trainer.close()


def test_output_dir_of_another_run_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A run refuses an output_dir holding a checkpoint before its run log is created (TensorBoard's writer would
    add an events file there), also when it resumes another run's checkpoint (it overwrote that folder's last.pt
    and mixed the logs); its own last.pt resumes under any spelling of the path. An output_dir that cannot be
    created, and an invalid value in a config edited after load_config, are refused naming the key."""
    import mtlfast.engine.trainer as trainer_module

    args = TINY + ON_CPU + ["train.iterations=2", "train.checkpoint_every=2"]
    for name in ("a", "b"):
        _losses(load_config(None, args + [f"output_dir={tmp_path / name}"]))
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    logs = []
    monkeypatch.setattr(trainer_module, "RunLog", lambda folder: logs.append(folder))
    config = load_config(None, args + [f"output_dir={tmp_path / 'b'}", "train.iterations=4"])
    with pytest.raises(FileExistsError, match=f"holds the checkpoint of another run .*resuming {tmp_path / 'a'}.* "
                                              f"choose another output_dir, or resume {tmp_path / 'b' / 'last.pt'}$"):
        Trainer(copy.deepcopy(config), resume=str(tmp_path / "a" / "last.pt"), progress=False)
    with pytest.raises(FileExistsError, match="holds the checkpoint of an earlier run"):
        Trainer(copy.deepcopy(config), progress=False)
    assert logs == [] and {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    Trainer(copy.deepcopy(config), resume="b/../b/last.pt", progress=False).close()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=f"output_dir: cannot write the run's logs into '{tmp_path / 'file' / 'x'}'"):
        Trainer(load_config(None, args + [f"output_dir={tmp_path / 'file' / 'x'}"]), progress=False)
    config = load_config(None, args + [f"output_dir={tmp_path / 'c'}"])
    config["eval"]["edge_thresholds"] = 0  # failed at the first evaluation (argmax of nothing)
    with pytest.raises(ValueError, match="eval.edge_thresholds: expected a number of thresholds >= 1"):
        Trainer(config, progress=False)
    assert not (tmp_path / "c").exists()


def test_cli_eval_checks_its_outputs_first_and_names_a_checkpoint_of_other_options(tmp_path, capsys, monkeypatch):
    """`mtlfast eval --samples` / `--save-predictions` into new folders work (--samples failed after the whole
    evaluation), reading the checkpoint once (its config, then the trainer's state); a place that cannot hold them
    fails before the evaluation, naming the option. A checkpoint of other model options fails in one line naming it
    and the options (torch's error listed every tensor)."""
    from mtlfast.cli import main
    from mtlfast.engine import checkpoint as ckpt
    from mtlfast.engine import trainer as trainer_module

    out = tmp_path / "run"
    _losses(load_config(None, TINY + ON_CPU + [f"output_dir={out}", "train.iterations=1"]))
    last = str(out / "last.pt")
    reads, load = [], ckpt.load_checkpoint
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path, **kw: reads.append(path) or load(path, **kw))
    assert main(["eval", "--no-progress", "--checkpoint", last, "--samples", str(tmp_path / "new" / "s.png")]) == 0
    assert (tmp_path / "new" / "s.png").stat().st_size > 0 and reads == [last]
    capsys.readouterr()
    # train.sample_images of the first images, from as many evaluation batches as it takes, each at its own size
    plotted = []
    monkeypatch.setattr(trainer_module, "plot_predictions", lambda images, *a, **k: plotted.append(images))
    assert main(["eval", "--checkpoint", last, "--samples", str(tmp_path / "s1.png"), "eval.batch_size=1",
                 "train.sample_images=3"]) == 0
    assert [tuple(image.shape) for image in plotted[0]] == [(3, 32, 32)] * 3  # TINY's synthetic images
    # a checkpoint stripped to config and weights (to share) evaluates
    stripped = str(tmp_path / "stripped.pt")
    ckpt.save_checkpoint(stripped, {key: load(last)[key] for key in ("config", "model")})
    assert main(["eval", "--checkpoint", stripped]) == 0
    assert f"evaluation of {stripped} (iteration not recorded):" in capsys.readouterr().out
    # an output file that is a checkpoint is refused: the evaluated one, or any .pt
    before = (out / "last.pt").read_bytes()
    for option in ("--out", "--samples"):
        for target in (last, stripped):
            assert main(["eval", "--checkpoint", last, option, target]) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"mtlfast eval: FileExistsError: {option}: {target!r} is a checkpoint"), err
    assert (out / "last.pt").read_bytes() == before
    evaluated = []
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *args, **kwargs: evaluated.append(1) or {})
    (tmp_path / "file").write_text("")
    for option in ("--samples", "--save-predictions", "--out"):
        assert main(["eval", "--checkpoint", last, option, str(tmp_path / "file" / "x")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"mtlfast eval: OSError: {option}: cannot create the folder"), err
    assert evaluated == []
    assert main(["eval", "--checkpoint", last, "model.kwargs.head_channels=8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mtlfast eval: RuntimeError: checkpoint: {last!r} holds the weights of another model")
    assert "model.kwargs.head_channels: '(unset)' -> 8" in err and len(err.splitlines()) == 2


def test_eval_needs_no_training_split(tmp_path, capsys):
    """`mtlfast eval` reads the validation split only: a dataset folder without the training split list (or
    files) evaluates (it failed, and on PASCAL parts-only read every training annotation first); such an
    evaluation-only trainer refuses to train."""
    from mtlfast.cli import main
    from test_data_nyud import make_nyud

    base, _ = make_nyud(tmp_path / "data")
    config = load_config(None, ON_CPU + [f"output_dir={tmp_path / 'run'}", "data.dataset=nyud",
                                         f"data.root={tmp_path / 'data'}", "data.tasks=[semseg, depth]",
                                         "data.batch_size=1", "data.train_size=[8, 8]", "eval.baseline=null"])
    trainer = Trainer(config, progress=False)
    trainer.save()
    trainer.close()
    (base / "gt_sets" / "train.txt").unlink()
    (base / "images" / "0001.png").unlink()
    assert main(["eval", "--no-progress", "--checkpoint", str(tmp_path / "run" / "last.pt")]) == 0, \
        capsys.readouterr().err
    assert "evaluation of" in capsys.readouterr().out
    trainer = Trainer(config, resume=str(tmp_path / "run" / "last.pt"), progress=False, logs=False, train_data=False)
    assert trainer.train_set is None and len(trainer.val_set) == 1
    with pytest.raises(RuntimeError, match="built with train_data=False, to evaluate only"):
        trainer.train()
    trainer.close()
