"""Training configuration: YAML files merged over defaults, then ``key=value`` command-line overrides.

A config is a nested dict with the sections below (``model.kwargs`` is passed to the method's constructor
as is: e.g. ``model.kwargs.aux_tasks=[edge, normals]`` for MTI-Net / PAD-Net / TPIM auxiliary tasks, see
:class:`mtlfast.engine.trainer.Trainer`). ``DEFAULTS`` is the embedded synthetic default (a small
model on the procedurally generated dataset, trains on a CPU in minutes); a YAML file under
``configs/<dataset>/<backbone>/<method>.yaml`` overrides any subset, and overrides like
``optim.lr=1e-4 data.batch_size=8 model.name=mtinet`` override that (values parsed as YAML scalars/lists).
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any, Iterable

import yaml

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/synthetic_baseline",
    "data": {
        "dataset": "synthetic",     # synthetic | nyud | pascal
        "root": None,               # folder holding NYUDv2/ or PASCALContext/ (or NYUD_MT/, PASCAL_MT/; real data only)
        "tasks": ["semseg", "depth", "normals", "edge", "sal"],
        "train_size": [64, 64],     # crop (synthetic: render size)
        "num_train": 512,           # synthetic only: number of generated scenes per split
        "num_val": 64,
        "batch_size": 8,
        "num_workers": "auto",      # loader processes; auto: 0 for synthetic, else the cores per process (<= 8)
    },
    "model": {
        "name": "baseline",
        "backbone": "convnet_tiny",  # timm-free; paper backbones via configs/
        "pretrained": None,         # local path only; nothing downloads
        "checkpoint_decoder": False,  # activation checkpointing of the stages after the backbone (less memory,
                                      # one more decoder forward per step; same numbers), see mtlfast.models.base
        "checkpoint_backbone": False,  # activation checkpointing of the backbone's blocks (ViT, Swin, convnet_tiny)
        "kwargs": {},               # method options, e.g. aux_tasks: [edge, normals] (mtinet, padnet, tpim)
    },
    "optim": {
        "name": "adam",             # adam | adamw | sgd
        "lr": 1e-3,
        "weight_decay": 1e-6,
        "momentum": 0.9,            # sgd only
        "poly_power": 0.9,
        "grad_clip": 10.0,          # max global grad norm; null disables
    },
    "train": {
        "iterations": 300,
        "eval_every": 150,
        "checkpoint_every": 100,
        "log_every": 10,
        "accumulate": 1,            # micro-batches per step: gradients of data.batch_size x processes x accumulate
        "accumulate_norm": "step",  # step: losses normalised over the step's whole batch (micro-batches, ranks)
                                    # | micro: within each micro-batch (and rank), averaged
        "device": "auto",           # auto (CUDA when available, else CPU) | cuda | cpu (e.g. gloo DDP on a GPU machine)
        "amp": "auto",              # auto (CUDA: bf16, fp16 below sm_80; CPU: off) | bf16 | fp16 | off
        "cudnn_benchmark": True,    # cuDNN picks the fastest convolution algorithms for the (fixed) crop size (CUDA)
        "sync_bn": False,           # BatchNorm -> SyncBatchNorm (CUDA only; statistics shared across processes)
        "backend": None,            # mtlfast backend for the ops (None: MTLFAST_BACKEND or auto)
        "compile": False,           # torch.compile the training forward: false | true (Inductor's default mode) | a
                                    # mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs (only
                                    # the default mode is tested)
        "sample_images": 4,         # prediction PNGs written after evaluation
        "eval_at_start": True,      # evaluate the untrained model first (the baseline of the curves)
    },
    "eval": {
        # single-task baseline for Δm: a file or a stored name (mtlfast.metrics.list_baselines), null for none;
        # the default was measured with `mtlfast baseline` on this synthetic default
        "baseline": "synthetic_convnet_tiny_single_task",
        "edge_thresholds": 99,      # odsF thresholds (SEISM's 99; ~0.5 s of a core per 480x640 image)
        "edge_workers": "auto",     # processes for the edge metric (auto: 0 on synthetic, else cores/process, <= 8)
        "batch_size": 4,
        "sharded": False,           # multi-process runs: every rank evaluates its share (else rank 0 all of it)
    },
}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.2 rules (PyYAML implements 1.1): ``2e-5`` (no dot) is a float, as in
    Python, not a string; and only true/false are booleans, so ``train.amp=off`` or ``model.backbone=no`` stay
    the strings they are (1.1 reads yes/no/on/off/y/n as booleans)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _merge_kwargs(base: dict, update: dict) -> None:
    """Method options: any key (the constructor checks them); nested mappings merge key by key."""
    for key, value in update.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge_kwargs(base[key], value)
        else:
            base[key] = value


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Merges ``update`` into ``base`` key by key (unknown keys raise). ``model.kwargs`` takes any key, and an
    update sets only the keys it names: ``model.kwargs.drop_path=0.1`` keeps the config file's other options."""
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise KeyError(f"config: unknown key {path!r}; valid keys here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"config: {path!r} must be a mapping, got {value!r}")
            if key == "kwargs":
                _merge_kwargs(base[key], value)
            else:
                merge(base[key], value, path + ".")
        elif isinstance(value, dict):  # optim.lr.x=1 would replace the number with a mapping
            inner = f"{path}.{next(iter(value))}" if value else path
            raise KeyError(f"config: unknown key {inner!r}; {path!r} takes a value, not a mapping")
        else:
            base[key] = value
    return base


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line (its message spans several, with a drawing of the position)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


#: Entries that name a file or folder: an override's plain scalar there is the text as written.
_PATH_KEYS = ("output_dir", "data.root", "model.pretrained", "eval.baseline")


def parse_override(text: str) -> dict:
    """``"optim.lr=1e-4"`` -> ``{"optim": {"lr": 0.0001}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw else None
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value is not valid YAML: {_yaml_problem(exc)}") from None
    if key.strip() in _PATH_KEYS:  # output_dir=2024 names a folder (YAML reads a number; 2024-01-01, a date)
        if not isinstance(value, (str, list, dict, type(None))):
            value = raw.strip()
    elif isinstance(value, str):  # what float() reads (inf, .5e3) is a number too
        try:
            value = float(value)
        except ValueError:
            pass
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> dict:
    """DEFAULTS, then ``base`` (e.g. a checkpoint's config), the YAML file at ``path``, each override."""
    config = copy.deepcopy(DEFAULTS)
    if base is not None:
        merge(config, base)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path) as f:
            try:
                loaded = yaml.load(f, Loader=_Loader) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"config: {path!r} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise TypeError(f"config: {path!r} must hold a mapping at top level")
        merge(config, loaded)
    for text in overrides:
        merge(config, parse_override(text))
    return check_config(config)


#: train.compile's torch.compile modes (true: "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Integer entries and their least value (train.eval_every also takes null: no evaluation during training).
_INTEGERS = {"seed": 0, "data.batch_size": 1, "data.num_train": 1, "data.num_val": 1, "train.iterations": 1,
             "train.eval_every": 0, "train.checkpoint_every": 1, "train.log_every": 1, "train.accumulate": 1,
             "train.sample_images": 0, "eval.batch_size": 1}
#: Entries that are true or false (YAML 1.2: ``train.eval_at_start=no`` is the string "no", which is truthy).
_BOOLEANS = ("train.cudnn_benchmark", "train.sync_bn", "train.eval_at_start", "eval.sharded")
#: Number entries (finite) and their least value, as torch's optimisers and the poly schedule take them.
_NUMBERS = {"optim.lr": 0, "optim.weight_decay": 0, "optim.momentum": 0, "optim.poly_power": 0}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(config: dict) -> dict:
    """Refuses an entry of the wrong type or range with the key's name, before anything is built or loaded
    (YAML lets anything through: ``optim.lr=abc`` is the string "abc", which torch would refuse without naming
    the key, and ``data.num_val=0`` would evaluate nothing). Returns ``config``. :func:`load_config` checks what
    it returns; :class:`~mtlfast.engine.trainer.Trainer` checks the config it is given."""
    def value(key: str) -> Any:
        node = config
        for part in key.split("."):
            node = node[part]
        return node

    for key, least in _INTEGERS.items():
        v, nullable = value(key), key == "train.eval_every"
        if (v is not None or not nullable) and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ValueError(f"{key}: expected an integer >= {least}{' or null' if nullable else ''}, got {v!r}")
    for key, least in _NUMBERS.items():
        v = value(key)
        if not (_is_number(v) and math.isfinite(v) and v >= least):
            raise ValueError(f"{key}: expected a number >= {least}, got {v!r}")
    for key in _BOOLEANS:
        if not isinstance(v := value(key), bool):
            raise ValueError(f"{key}: expected true or false, got {v!r}")
    if (amp := value("train.amp")) not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"train.amp: expected auto, bf16, fp16 or off, got {amp!r}")
    if (mode := value("train.compile")) is not False and mode is not True and mode not in COMPILE_MODES:
        raise ValueError(f"train.compile: expected true, false or a mode ({', '.join(COMPILE_MODES)}), got {mode!r}")
    if (norm := value("train.accumulate_norm")) not in ("step", "micro"):
        raise ValueError(f"train.accumulate_norm: expected step or micro, got {norm!r}")
    clip = value("optim.grad_clip")  # inf: no clipping, the norm still logged
    if clip is not None and not (_is_number(clip) and clip > 0):
        raise ValueError(f"optim.grad_clip: expected a number > 0 or null, got {clip!r}")
    size = value("data.train_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 2 for s in size)):
        raise ValueError(f"data.train_size: expected [height, width], integers >= 2, got {size!r}")
    if not isinstance(config["output_dir"], str) or not config["output_dir"]:
        raise ValueError(f"output_dir: expected a folder path, got {config['output_dir']!r}")
    from mtlfast.metrics import edge_thresholds

    edge_thresholds(value("eval.edge_thresholds"), "eval.edge_thresholds")
    return config
