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
_MODEL_KEYS = (("model", "name"), ("model", "backbone"), ("data", "tasks"), ("data", "dataset"))


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


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint: {path!r} is not a readable mtlfast checkpoint "
                           f"({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint: {path!r} is not an mtlfast checkpoint of format {FORMAT_VERSION}")
    return payload


def check_compatible(payload: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Raises if the checkpoint was trained for another model/backbone/task set/dataset than ``config``."""
    saved = payload.get("config", {})
    for section, key in _MODEL_KEYS:
        a, b = saved.get(section, {}).get(key), config[section][key]
        if a != b:
            raise RuntimeError(f"checkpoint: {path!r} has {section}.{key}={a!r} but the config asks for {b!r}")
    a, b = saved.get("optim", {}).get("name"), config["optim"]["name"]
    if a is not None and a.lower() != b.lower():  # torch loads any optimiser's state into any other, unused
        raise RuntimeError(f"checkpoint: {path!r} holds the state of optimiser optim.name={a!r}, which cannot go on "
                           f"as {b!r}; resume with optim.name={a} or start a new run")
    a = list(saved.get("model", {}).get("kwargs", {}).get("aux_tasks") or [])
    b = list(config["model"]["kwargs"].get("aux_tasks") or [])
    if a != b:  # auxiliary heads are part of the weights
        raise RuntimeError(f"checkpoint: {path!r} has model.kwargs.aux_tasks={a!r} but the config asks for {b!r}")


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
