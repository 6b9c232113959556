"""Engine pieces that need no model: config merging, deterministic data order, checkpoint safety."""
import os

import pytest
import torch

from mtlfast.engine import checkpoint as ckpt
from mtlfast.engine.config import DEFAULTS, load_config, parse_override
from mtlfast.engine.sampler import ResumableSampler, SeededDataset


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ndata:\n  batch_size: 3\n")
    config = load_config(str(path), ["optim.lr=1e-4", "data.tasks=[semseg, depth]", "train.backend=reference"])
    assert config["optim"]["lr"] == 1e-4 and config["data"]["batch_size"] == 3
    assert config["data"]["tasks"] == ["semseg", "depth"] and config["train"]["backend"] == "reference"
    assert DEFAULTS["optim"]["lr"] != 1e-4  # defaults untouched
    assert DEFAULTS["model"]["checkpoint_decoder"] is False
    options = load_config(None, ["model.checkpoint_decoder=true", "model.kwargs={aux_tasks: [edge, normals]}"])
    assert options["model"]["checkpoint_decoder"] is True
    assert options["model"]["kwargs"] == {"aux_tasks": ["edge", "normals"]}
    with pytest.raises(KeyError, match=r"unknown key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        parse_override("optim.lr")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_sampler_is_deterministic_resumable_and_sharded():
    s = ResumableSampler(10, batch_size=2, seed=3)
    s.set_position(1)
    full = list(s)
    s.set_position(1, start_batch=2)
    assert list(s) == full[4:]
    s.set_position(2)
    assert [i for _, i in list(s)] != [i for _, i in full]  # a new permutation each epoch
    shards = [ResumableSampler(10, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    seen = [i for sh in shards for _, i in sh]
    assert all(len(list(sh)) == 4 for sh in shards) and set(seen) == set(range(10))


def test_seeded_dataset_gives_reproducible_items_and_keeps_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededDataset(Noise(), seed=1)
    torch.manual_seed(0)
    a = ds[(0, 2)]
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(ds[(0, 2)], a) and not torch.equal(ds[(1, 2)], a)
    assert torch.equal(torch.rand(1), after), "fetching an item must not disturb the global RNG"


def test_checkpoint_atomic_and_checked(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    config = load_config()
    ckpt.save_checkpoint(path, {"config": config, "iteration": 1})
    assert ckpt.load_checkpoint(path)["iteration"] == 1

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"config": config, "iteration": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["iteration"] == 1, "a failed save must keep the previous checkpoint"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []

    aux = load_config(None, ["model.kwargs={aux_tasks: [edge]}"])
    with pytest.raises(RuntimeError, match=r"model.kwargs.aux_tasks=\[\] but the config asks for \['edge'\]"):
        ckpt.check_compatible(ckpt.load_checkpoint(path), aux, path)
    ckpt.check_compatible(ckpt.load_checkpoint(path), load_config(None, ["model.checkpoint_decoder=true"]), path)
    other = load_config(None, ["model.name=mtinet"])
    with pytest.raises(RuntimeError, match=r"model.name='baseline' but the config asks for 'mtinet'"):
        ckpt.check_compatible(ckpt.load_checkpoint(path), other, path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="not a readable mtlfast checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file .*none.pt"):
        ckpt.load_checkpoint(str(tmp_path / "none.pt"))
