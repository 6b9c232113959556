"""Checkpoints: atomic writes (a crash never leaves a truncated file or loses the previous checkpoint),
full training state for exact resume, and a compatibility check with a clear error."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from mtlfast._files import write_atomically

FORMAT_VERSION = 1
_TEMPORARY_PREFIX = ".tmp_ckpt_"  # of a save in progress (remove_stale_temporaries)
#: Config entries that must match for a checkpoint's weights to fit the model being built.
_MODEL_KEYS = ("model.name", "model.backbone", "data.dataset", "data.tasks", "model.kwargs.aux_tasks")
#: What a resume reads besides config and weights (and the RNG states, "rng_per_rank" or the older "rng").
_TRAINING_STATE = ("optimizer", "scheduler", "iteration", "epoch", "batch_in_epoch")


def rng_state() -> dict[str, Any]:
    """The RNG states; on CUDA the current device's only (each process trains on ``cuda:LOCAL_RANK``)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state`'s states, the CUDA one onto the current device: a checkpoint resumes (or is
    evaluated) on a machine with another number of GPUs (each rank of a DDP run restores its own state)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # checkpoints written before held every visible device's state (get_rng_state_all): rank 0's is the first
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically and durably (:func:`mtlfast._files.write_atomically`: a temporary
    ``.tmp_ckpt_*`` file in the same folder, fsynced, renamed over ``path``, the folder fsynced), with the
    permissions of any new file."""
    write_atomically(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f), binary=True,
                     prefix=_TEMPORARY_PREFIX, durable=True)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Removes the temporary files of saves that were killed before their rename (SIGTERM from torchrun or a
    job scheduler skips the cleanup of :func:`save_checkpoint`; each is checkpoint-sized); returns their paths.
    Only the run that owns ``folder`` calls it (one run per output_dir)."""
    stale = sorted(os.path.join(folder, name) for name in (os.listdir(folder) if os.path.isdir(folder) else ())
                   if name.startswith(_TEMPORARY_PREFIX))
    for path in stale:
        os.remove(path)
    return stale


def load_checkpoint(path: str, *, training: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to hold what is read from it: the config and the weights, and with
    ``training`` (a resume) the training state too. ``training=False`` (``mtlfast eval`` / ``score``) takes a
    checkpoint stripped to config and weights for sharing (its ``iteration`` may be missing too)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint: {path!r} is not a readable mtlfast checkpoint "
                           f"({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint: {path!r} is not an mtlfast checkpoint of format {FORMAT_VERSION}")
    missing = [key for key in ("config", "model") if not isinstance(payload.get(key), dict)]
    if missing:
        raise RuntimeError(f"checkpoint: {path!r} has no {' and no '.join(missing)} entry (a mapping), which every "
                           "use of a checkpoint reads")
    missing = [key for key in _TRAINING_STATE if key not in payload] + (
        [] if "rng_per_rank" in payload or "rng" in payload else ["rng_per_rank"])
    if training and missing:
        raise RuntimeError(f"checkpoint: {path!r} has no training state ({', '.join(missing)} missing): it can be "
                           "evaluated (mtlfast eval), not resumed")
    return payload


def checkpoint_config(payload: dict[str, Any], path: str, overrides=()) -> dict[str, Any]:
    """The config of a checkpoint (read from ``path``), then ``overrides``: a config this version of mtlfast
    cannot read (an entry it does not know, of a later version) names the checkpoint."""
    from mtlfast.engine.config import load_config

    try:
        load_config(None, base=payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"checkpoint: {path!r} holds a config this version of mtlfast cannot read: "
                           f"{exc.args[0] if exc.args else exc}") from None
    return load_config(None, overrides, base=payload["config"])


def _model_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`_MODEL_KEYS` of a config, each in one spelling: the dataset for an alias, the short name for a
    backbone's timm name, a list of one for one task (or aux task), the dataset's tasks for null."""
    from mtlfast.data import canonical_dataset, check_tasks
    from mtlfast.models.backbones import canonical_backbone

    model, data = config.get("model", {}), config.get("data", {})
    dataset = canonical_dataset(data.get("dataset"))
    aux = model.get("kwargs", {}).get("aux_tasks") or []
    return {"model.name": model.get("name"), "model.backbone": canonical_backbone(model.get("backbone")),
            "data.dataset": dataset, "data.tasks": list(check_tasks(data.get("tasks"), dataset)),
            "model.kwargs.aux_tasks": [aux] if isinstance(aux, str) else list(aux)}


def check_compatible(payload: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Raises if the checkpoint was trained for another model/backbone/task set/dataset/auxiliary tasks than
    ``config`` (compared as :func:`_model_identity` spells them), or with another optimiser."""
    saved, wanted = _model_identity(payload.get("config", {})), _model_identity(config)
    for key in _MODEL_KEYS:
        if saved[key] != wanted[key]:  # auxiliary heads are part of the weights too
            raise RuntimeError(f"checkpoint: {path!r} has {key}={saved[key]!r} but the config asks for {wanted[key]!r}")
    a, b = payload.get("config", {}).get("optim", {}).get("name"), config["optim"]["name"]
    if a is not None and a.lower() != b.lower():  # torch loads any optimiser's state into any other, unused
        raise RuntimeError(f"checkpoint: {path!r} holds the state of optimiser optim.name={a!r}, which cannot go on "
                           f"as {b!r}; resume with optim.name={a} or start a new run")


def load_weights(model: torch.nn.Module, payload: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Loads the checkpoint's weights into ``model``. Weights that do not fit (a model option the compatibility
    check does not compare, e.g. ``model.kwargs.head_channels``) raise one line naming the checkpoint, a tensor
    that differs and the model options that differ from the checkpoint's, instead of torch's list of every
    tensor."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        ours, saved = model.state_dict(), payload["model"]
        differ = ([k for k in ours if k not in saved] + [k for k in saved if k not in ours]
                  + [k for k in ours if k in saved and ours[k].shape != saved[k].shape])
        options = config_changes({"model": payload.get("config", {}).get("model", {})}, {"model": config["model"]})
        detail = (f"{len(differ)} tensors missing, unexpected or of another shape, e.g. {differ[0]!r}" if differ
                  else str(exc).strip().splitlines()[-1].strip())
        raise RuntimeError(f"checkpoint: {path!r} holds the weights of another model than this config builds "
                           f"({detail}); model options that differ from the checkpoint's: "
                           f"{'; '.join(options) or 'none'}") from None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):  # an empty one adds no entry: {} -> {x: 1} is the change of x alone
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """``"key: saved -> new"`` for every (dotted) config entry in which ``config`` differs from the checkpoint's."""
    old, new = _flatten(saved), _flatten(config)
    return [f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
