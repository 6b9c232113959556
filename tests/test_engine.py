"""Engine pieces that need no model: config merging, deterministic data order, checkpoint safety."""
import os
import sys

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


def _payload(config, iteration):
    """A checkpoint's entries (training state as placeholders: these tests read none of it)."""
    return {"config": config, "model": {}, "optimizer": {}, "scheduler": {}, "iteration": iteration, "epoch": 0,
            "batch_in_epoch": 0, "rng_per_rank": []}


def test_checkpoint_atomic_and_checked(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    config = load_config()
    ckpt.save_checkpoint(path, _payload(config, 1))
    assert ckpt.load_checkpoint(path)["iteration"] == 1

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _payload(config, 2))
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


def test_checkpoint_entries_are_checked_for_their_use(tmp_path):
    """Evaluation reads a checkpoint's config and weights only: one stripped to them for sharing evaluates; a
    resume needs the training state too; each refusal names the file and what is missing (a bare KeyError
    before). A config this version cannot read names the checkpoint."""
    full, stripped, bare = (str(tmp_path / name) for name in ("full.pt", "stripped.pt", "bare.pt"))
    ckpt.save_checkpoint(full, _payload(load_config(), 3))
    ckpt.save_checkpoint(stripped, {"config": load_config(), "model": {}})
    ckpt.save_checkpoint(bare, {"model": {}})
    assert ckpt.load_checkpoint(full)["iteration"] == 3
    assert "iteration" not in ckpt.load_checkpoint(stripped, training=False)
    with pytest.raises(RuntimeError, match=rf"{stripped}' has no training state \(optimizer, scheduler, "
                                           r"iteration, epoch, batch_in_epoch, rng_per_rank missing\): it can be "
                                           r"evaluated \(mtlfast eval\), not resumed"):
        ckpt.load_checkpoint(stripped)
    for training in (True, False):
        with pytest.raises(RuntimeError, match=rf"{bare}' has no config entry"):
            ckpt.load_checkpoint(bare, training=training)
    payload = ckpt.load_checkpoint(full)
    assert ckpt.checkpoint_config(payload, full, ["optim.lr=0.5"])["optim"]["lr"] == 0.5
    payload["config"]["train"]["from_a_later_version"] = 1
    with pytest.raises(RuntimeError, match=rf"{full}' holds a config this version of mtlfast cannot read: config: "
                                           r"unknown key 'train.from_a_later_version'"):
        ckpt.checkpoint_config(payload, full)


@pytest.mark.parametrize("saved, given", [
    (["data.tasks=semseg"], ["data.tasks=[semseg]"]),
    (["data.tasks=null"], ["data.tasks=[semseg, depth, normals, edge, parts, sal]"]),  # the dataset's tasks
    (["data.dataset=nyud", "data.tasks=[semseg, depth]"], ["data.dataset=NYUDv2", "data.tasks=[semseg, depth]"]),
    (["model.backbone=swin_t"], ["model.backbone=swin_tiny_patch4_window7_224"]),
    (["model.name=mtinet", "model.kwargs.aux_tasks=edge"], ["model.name=mtinet", "model.kwargs.aux_tasks=[edge]"]),
])
def test_checkpoint_compatibility_compares_one_spelling(tmp_path, saved, given):
    """Spellings of the same model (a dataset alias, one task or a list of one, a backbone's timm name) resume;
    they were refused as different models."""
    path = str(tmp_path / "last.pt")
    ckpt.save_checkpoint(path, _payload(load_config(None, saved), 1))
    ckpt.check_compatible(ckpt.load_checkpoint(path), load_config(None, given), path)
    with pytest.raises(RuntimeError, match=r"has data.tasks=\[.*\] but the config asks for \['depth'\]"):
        ckpt.check_compatible(ckpt.load_checkpoint(path), load_config(None, given + ["data.tasks=depth"]), path)
    if "aux_tasks" in given[-1]:
        with pytest.raises(RuntimeError, match=r"has model.kwargs.aux_tasks=\['edge'\] but the config asks for "
                                               r"\['normals'\]"):
            ckpt.check_compatible(ckpt.load_checkpoint(path),
                                  load_config(None, given + ["model.kwargs.aux_tasks=normals"]), path)


def test_config_file_numbers_and_kwargs_overrides(tmp_path):
    """A YAML file's ``lr: 2e-5`` is a number as on the command line (PyYAML alone reads it as a string), and
    an override of one method option keeps the file's others (nested ones too)."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-5\n  weight_decay: 1E-6\nmodel:\n  name: bridgenet\n  kwargs:\n    tfr: huge\n"
                    "    backbone_kwargs: {vit_pyramid: false, drop_path_rate: 0.15}\n")
    config = load_config(str(path), ["model.kwargs.drop_path=0.1", "model.kwargs.backbone_kwargs.drop_path_rate=0"])
    assert config["optim"]["lr"] == 2e-5 and config["optim"]["weight_decay"] == 1e-6
    assert config["model"]["kwargs"] == {"tfr": "huge", "drop_path": 0.1,
                                         "backbone_kwargs": {"vit_pyramid": False, "drop_path_rate": 0}}
    with pytest.raises(TypeError, match="'model.kwargs' must be a mapping"):
        load_config(None, ["model.kwargs=3"])


def test_only_true_and_false_are_booleans():
    """YAML 1.2 booleans, on the command line and in files: ``train.amp=off`` (a documented value) stays "off"
    (PyYAML's 1.1 rules made it False, which train.amp then refused), as do yes/no/on/y/n; true/false are bools."""
    for text in ("off", "on", "yes", "no", "y", "n", "Off", "NO"):
        assert parse_override(f"train.amp={text}") == {"train": {"amp": text}}
    for text, value in (("true", True), ("False", False), ("TRUE", True), ("null", None), ("~", None), ("0x10", 16)):
        assert parse_override(f"a={text}") == {"a": value}, text
    assert load_config(None, ["train.amp=off"])["train"]["amp"] == "off"


def test_path_entries_take_an_override_as_written():
    """output_dir=2024 names a folder: YAML reads a number there (refused as no folder path), 0012 as 10, 2024-01-01
    as a date; the path entries take an override's plain scalar as written (null and quoted text as YAML reads)."""
    for text in ("2024", "0012", "2024-01-01", "1e3", "true"):
        assert parse_override(f"output_dir={text}") == {"output_dir": text}
        assert load_config(None, [f"output_dir={text}"])["output_dir"] == text
    assert parse_override("data.root=null") == {"data": {"root": None}}
    assert parse_override("model.pretrained='7'") == {"model": {"pretrained": "7"}}
    assert parse_override("optim.lr=0012") == {"optim": {"lr": 10}}  # other entries: YAML's reading


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    """mkstemp makes owner-only files; a checkpoint gets the permissions of any new file (shared run folders)."""
    umask = os.umask(0o022)
    try:
        ckpt.save_checkpoint(str(tmp_path / "last.pt"), {"iteration": 1})
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "last.pt").st_mode & 0o777 == 0o644


def test_cuda_rng_state_is_the_current_devices(monkeypatch):
    """The checkpoint holds the current device's CUDA RNG state and restores it there: a checkpoint of a machine
    with 8 visible GPUs resumes or evaluates on one with 1 (set_rng_state_all would index devices it lacks)."""
    states = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    restored = {}

    def set_rng_state(state, device="cuda"):
        restored[0] = state

    def set_rng_state_all(new_states):
        for i, state in enumerate(new_states):
            if i >= 1:
                raise IndexError("tuple index out of range")  # torch.cuda.default_generators of a 1-GPU machine
            set_rng_state(state)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[0], states[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    state = ckpt.rng_state()
    ckpt.set_rng_state(state)
    assert torch.equal(restored[0], states[0])
    ckpt.set_rng_state({**state, "cuda": [states[1], states[0]]})  # a checkpoint of the earlier format
    assert torch.equal(restored[0], states[1])


def test_process_group_outlasts_rank0_evaluation(monkeypatch):
    """The other ranks wait in a barrier while rank 0 evaluates (PASCAL-Context: 5105 images, odsF ~0.2 s each):
    the process group's timeout must outlast that, not NCCL's default 10 minutes."""
    import datetime

    import torch.distributed as dist

    from mtlfast.engine import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    info = distributed.init_distributed("cpu")
    assert info.rank == 1 and info.world_size == 2
    (backend, kwargs), = calls
    assert backend == "gloo" and kwargs.get("timeout", datetime.timedelta(0)) >= datetime.timedelta(hours=1)


def test_run_log_resume_drops_later_rows_and_purges_tensorboard(tmp_path, monkeypatch):
    """Resuming at iteration 2: CSV rows after it are dropped, and the TensorBoard writer is reopened with
    purge_step 3 so that the interrupted run's later events are hidden (a stand-in writer: tensorboard is
    optional)."""
    import types

    from mtlfast.engine.logs import RunLog

    writers = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            writers.append(kwargs)
            self.closed = False

        def add_scalar(self, *args):
            pass

        def flush(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = RunLog(str(tmp_path))
    for it in (1, 2, 3, 4):
        log.write("train", {"iteration": it, "loss": 1.0 / it}, it)
    first = log.tensorboard
    log.resume_at(2)
    assert [r["iteration"] for r in log.read("train")] == [1, 2]
    assert first.closed and writers == [{}, {"purge_step": 3}]


def test_run_log_widens_its_header_for_new_columns(tmp_path):
    """A row with a key the CSV header lacks (a run resumed with clipping switched on, or on a GPU: another memory
    column) widens the header instead of writing its values under the old columns; keys in another order land in
    their own columns; truncation keeps the widened header."""
    import csv

    from mtlfast.engine.logs import RunLog, plot_curves

    log = RunLog(str(tmp_path))
    log.write("train", {"iteration": 1, "loss": 0.5, "peak_rss_mib": 100.0}, 1)
    log.write("train", {"iteration": 2, "peak_rss_mib": 101.0, "loss": 0.4}, 2)
    log.write("train", {"iteration": 3, "loss": 0.3, "grad_norm": 2.0, "peak_mem_mib": 7.0}, 3)
    assert log.read("train") == [{"iteration": 1, "loss": 0.5, "peak_rss_mib": 100.0},
                                 {"iteration": 2, "loss": 0.4, "peak_rss_mib": 101.0},
                                 {"iteration": 3, "loss": 0.3, "grad_norm": 2.0, "peak_mem_mib": 7.0}]
    log.truncate("train", 2)
    with open(tmp_path / "train.csv", newline="") as f:
        assert next(csv.reader(f)) == ["iteration", "loss", "peak_rss_mib", "grad_norm", "peak_mem_mib"]
    assert [r["iteration"] for r in log.read("train")] == [1, 2]
    log.write("eval", {"iteration": 0, "semseg/miou": 0.1}, 0)
    log.write("eval", {"iteration": 2, "semseg/miou": 0.2, "delta_m": -5.0}, 2)
    plot_curves(log, str(tmp_path / "curves.png"))
    assert log.read("eval")[1] == {"iteration": 2, "semseg/miou": 0.2, "delta_m": -5.0}


def test_seeded_items_leave_the_cuda_generators_alone(monkeypatch):
    """SeededDataset seeds the host RNGs per item and restores them; torch.manual_seed would also reseed every
    CUDA generator (not restored), so a loader in the training process would reset the GPU's dropout stream per item."""
    class Augmented(torch.utils.data.Dataset):  # an item's random transform, drawn from the global generator
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.rand(2)

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    before = torch.get_rng_state()
    items = SeededDataset(Augmented(), seed=5)
    first = [items[(0, i)] for i in range(3)]
    assert calls == [] and torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, items[(0, i)]) for i, a in enumerate(first)) and not torch.equal(first[0], first[1])


@pytest.mark.parametrize("override, error, message", [
    ("data.batch_size=0", ValueError, "data.batch_size: expected an integer >= 1, got 0"),
    ("data.batch_size=abc", ValueError, "data.batch_size: expected an integer >= 1, got 'abc'"),
    ("data.num_val=0", ValueError, "data.num_val: expected an integer >= 1, got 0"),
    ("data.num_train=2.5", ValueError, "data.num_train: expected an integer >= 1, got 2.5"),
    ("seed=abc", ValueError, "seed: expected an integer >= 0, got 'abc'"),
    ("data.train_size=abc", ValueError, r"data.train_size: expected \[height, width\], integers >= 2, got 'abc'"),
    ("data.train_size=[64, true]", ValueError, r"data.train_size: expected \[height, width\]"),
    ("optim.lr=abc", ValueError, "optim.lr: expected a number >= 0, got 'abc'"),
    ("optim.lr=.nan", ValueError, "optim.lr: expected a number >= 0, got nan"),
    ("optim.weight_decay=-1", ValueError, "optim.weight_decay: expected a number >= 0, got -1"),
    ("optim.momentum=abc", ValueError, "optim.momentum: expected a number >= 0, got 'abc'"),
    ("optim.poly_power=abc", ValueError, "optim.poly_power: expected a number >= 0, got 'abc'"),
    ("optim.grad_clip=true", ValueError, "optim.grad_clip: expected a number > 0 or null, got True"),
    ("train.sample_images=-1", ValueError, "train.sample_images: expected an integer >= 0, got -1"),
    ("train.eval_at_start=no", ValueError, "train.eval_at_start: expected true or false, got 'no'"),
    ("train.amp=fp32", ValueError, "train.amp: expected auto, bf16, fp16 or off, got 'fp32'"),
    ("train.compile=fast", ValueError, r"train.compile: expected true, false or a mode \(default, reduce-overhead, "
                                       r"max-autotune, max-autotune-no-cudagraphs\), got 'fast'"),
    ("train.compile=no", ValueError, r"train.compile: expected true, false or a mode .*, got 'no'"),
    ("eval.batch_size=0", ValueError, "eval.batch_size: expected an integer >= 1, got 0"),
    ("eval.edge_thresholds=0", ValueError, "eval.edge_thresholds: expected a number of thresholds >= 1 or a list"),
    ("eval.edge_thresholds=true", ValueError, "eval.edge_thresholds: expected a number of thresholds >= 1"),
    ("eval.edge_thresholds=[0.5, 1]", ValueError, r"eval.edge_thresholds: .* got \[0.5, 1\]"),
    ("output_dir=[3]", ValueError, r"output_dir: expected a folder path, got \[3\]"),
    ("optim.lr.x=1", KeyError, "unknown key 'optim.lr.x'; 'optim.lr' takes a value, not a mapping"),
    ("output_dir.x=1", KeyError, "unknown key 'output_dir.x'; 'output_dir' takes a value, not a mapping"),
    ("data.tasks=[semseg", ValueError, r"override 'data.tasks=\[semseg': the value is not valid YAML: expected ','"),
])
def test_config_values_are_checked_naming_the_key(override, error, message):
    """What YAML lets through (``optim.lr=abc`` is a string) is refused by load_config naming the key, not later by
    torch or a dataset without it; a mapping under a key that takes a value is an unknown key (it replaced the
    value), and an override that is not YAML names the override (PyYAML's error spans several lines)."""
    with pytest.raises(error, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_config_checks_accept_the_documented_values(tmp_path):
    """null grad_clip and eval_every, threshold lists, sample_images=0, inf grad_clip (no clipping), train.compile
    true or a mode pass; a hand-edited config is checked by check_config (the Trainer calls it); a YAML file that is
    not YAML names the file in one line."""
    from mtlfast.engine.config import check_config

    config = load_config(None, ["optim.grad_clip=null", "train.eval_every=null", "eval.edge_thresholds=[0.25, 0.5]",
                                "train.sample_images=0", "optim.lr=0"])
    assert config["eval"]["edge_thresholds"] == [0.25, 0.5] and config["optim"]["grad_clip"] is None
    assert [load_config(None, [f"train.compile={v}"])["train"]["compile"] for v in ("true", "max-autotune")] == \
        [True, "max-autotune"]
    assert load_config(None, ["optim.grad_clip=inf"])["optim"]["grad_clip"] == float("inf")
    config["eval"]["batch_size"] = "4"
    with pytest.raises(ValueError, match="eval.batch_size: expected an integer >= 1, got '4'"):
        check_config(config)
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1e-4\n")
    with pytest.raises(ValueError, match=r"config: '.*bad.yaml' is not valid YAML: .*\(line 3, column 1\)") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


def test_weights_of_another_model_name_the_checkpoint_and_the_options(tmp_path):
    """Weights that do not fit (a model option changed: model.kwargs.head_channels) raise one line naming the
    checkpoint, a tensor and the options that differ, not torch's list of every tensor; an empty kwargs mapping adds
    no entry of its own to the changes."""
    path = str(tmp_path / "last.pt")
    saved = {"model": torch.nn.Linear(2, 4).state_dict(), "config": {"model": {"name": "x", "kwargs": {}}}}
    model, config = torch.nn.Linear(2, 3), {"model": {"name": "x", "kwargs": {"head_channels": 3}}}
    with pytest.raises(RuntimeError) as info:
        ckpt.load_weights(model, saved, config, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint: {path!r} holds the weights of another model")
    assert "2 tensors missing, unexpected or of another shape, e.g. 'weight'" in message
    assert message.endswith("model options that differ from the checkpoint's: model.kwargs.head_channels: "
                            "'(unset)' -> 3")
    ckpt.load_weights(model, {"model": torch.nn.Linear(2, 3).state_dict()}, config, path)


def test_text_files_are_written_atomically_with_new_file_permissions(tmp_path, monkeypatch):
    """write_text_atomically (the baseline YAML, JSON results): a failed rename keeps the previous file and leaves no
    temporary one; the file gets 0o666 less the umask, as any new file (mkstemp's is owner-only). read_json names
    a file that is not JSON."""
    from mtlfast import _files

    path = tmp_path / "b.yaml"
    umask = os.umask(0o022)
    try:
        _files.write_text_atomically(path, "a: 1\n")
    finally:
        os.umask(umask)
    assert path.read_text() == "a: 1\n" and os.stat(path).st_mode & 0o777 == 0o644

    def failed(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "replace", failed)
    with pytest.raises(OSError, match="disk full"):
        _files.write_text_atomically(path, "a: 2\n")
    monkeypatch.undo()
    assert path.read_text() == "a: 1\n" and sorted(os.listdir(tmp_path)) == ["b.yaml"]
    _files.write_json_atomically(tmp_path / "r.json", {"x": [1]})
    assert _files.read_json(tmp_path / "r.json") == {"x": [1]}
    for content in (b'{"x": [1', b"\xff\xfe{}"):
        (tmp_path / "r.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"{tmp_path / 'r.json'}: not a readable JSON file"):
            _files.read_json(tmp_path / "r.json")


def test_cli_overrides_may_follow_options(monkeypatch, capsys):
    """key=value overrides before and after an option all reach the command, in order; anything else unknown is
    argparse's usage error."""
    import mtlfast.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_train", lambda args: seen.append((args.overrides, args.no_progress)) or 0)
    assert cli.main(["train", "a.b=1", "--no-progress", "c=2", "a.b=3"]) == 0
    assert seen == [(["a.b=1", "c=2", "a.b=3"], True)]
    for argv in (["train", "a=1", "--bogus"], ["info", "x=1"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "unrecognized arguments" in capsys.readouterr().err
