"""The training pipeline end to end on tiny synthetic runs: loss falls, exact resume, 2-process DDP, CLI."""
import copy
import os
import subprocess
import sys

import torch

from mtlfast.engine.config import load_config
from mtlfast.engine.trainer import Trainer

TINY = ["data.num_train=16", "data.num_val=4", "data.batch_size=4", "data.train_size=[32, 32]",
        "data.tasks=[semseg, depth, normals]", "train.log_every=1", "train.eval_every=0",
        "train.eval_at_start=false", "eval.edge_thresholds=5"]


def _losses(config, resume=None):
    trainer = Trainer(config, resume=resume, progress=False)
    rows = trainer.train()
    trainer.close()
    return [r["loss"] for r in rows], trainer


def test_resume_replays_the_same_losses(tmp_path):
    full_cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'full'}", "train.iterations=7",
                                         "train.checkpoint_every=3"])
    full, _ = _losses(full_cfg)
    # interrupted run: stops after 3 iterations (its checkpoint), then resumes to 7
    part_cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'part'}", "train.iterations=7",
                                         "train.checkpoint_every=3"])
    trainer = Trainer(copy.deepcopy(part_cfg), progress=False)
    trainer.config["train"]["iterations"] = 3  # the same (7-iteration) schedule, stopped after 3
    first = [r["loss"] for r in trainer.train()]
    trainer.close()
    resumed, trainer = _losses(part_cfg, resume=str(tmp_path / "part" / "last.pt"))
    assert len(full) == 7 and first + resumed == full, (full, first, resumed)
    logged = trainer.log.read("train")
    assert [int(r["iteration"]) for r in logged] == list(range(1, 8))


def test_loss_falls_and_eval_runs(tmp_path):
    config = load_config(None, TINY + [f"output_dir={tmp_path}", "train.iterations=40", "train.checkpoint_every=40",
                                       "optim.lr=3e-3"])
    losses, trainer = _losses(config)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    metrics = trainer.evaluate(str(tmp_path / "samples.png"))
    assert {"semseg/mIoU", "depth/rmse", "normals/mean"} <= set(metrics)
    assert os.path.getsize(tmp_path / "samples.png") > 0


_DDP_SCRIPT = """
import sys, torch
from mtlfast.engine.config import load_config
from mtlfast.engine.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]), progress=False)
trainer.train()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
torch.save(flat, trainer.out_dir + f"/weights_rank{trainer.dist.rank}.pt")
trainer.close()
"""


def test_two_process_ddp_ends_with_equal_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    args = TINY + [f"output_dir={tmp_path}", "train.iterations=3", "train.checkpoint_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *args], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
    assert os.path.exists(tmp_path / "last.pt")


def test_cli_train_then_eval(tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, "-m", "mtlfast"]
    train = subprocess.run(common + ["train", "--no-progress", f"output_dir={out}", "train.iterations=2",
                                     "train.checkpoint_every=2", "train.eval_every=2", *TINY[:-3]],
                           capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final evaluation (iteration 2)" in train.stdout
    assert (out / "curves.png").exists() and (out / "train.csv").exists()
    evaluate = subprocess.run(common + ["eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "m.json")],
                              capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert (tmp_path / "m.json").exists()
    bad = subprocess.run(common + ["eval", "--checkpoint", str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr
