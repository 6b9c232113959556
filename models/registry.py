"""Name -> model constructor registry, as in timm: ``register_model`` decorates a constructor
``fn(tasks, backbone=..., **cfg) -> nn.Module``; ``create_model`` looks it up with a clear error."""
from __future__ import annotations

from typing import Callable, Iterable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The keyword options of model ``name``'s constructor (ValueError if unknown)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return list(getattr(_MODELS[name], "options", []))


def create_model(name: str, tasks, **cfg) -> nn.Module:
    """Builds model ``name`` for ``tasks`` (a list of task names, or one name for a one-task model); ``cfg`` goes
    to its constructor."""
    if name not in _MODELS:
        valid = ", ".join(list_models()) or "none registered yet"
        raise ValueError(f"create_model: unknown model {name!r}; valid models: {valid}")
    if isinstance(tasks, str):
        tasks = [tasks]
    elif not isinstance(tasks, Iterable):
        raise TypeError(f"tasks: expected a list of task names or one task name, got {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks: expected at least one task name, got none")
    return _MODELS[name](tasks, **cfg)
