"""The model interface shared by every method, and the helpers the model files use.

Interface (every model returned by :func:`mtlfast.models.create_model`):

- ``model(images)`` with images (B, 3, H, W) returns ``{task: (B, C_task, H, W)}`` for every task in
  ``model.tasks``, at input resolution (bilinear, align_corners=False), raw logits / regressions:
  C_task = semseg 40 (NYUD) / 21 (PASCAL) / 6 (synthetic), parts 7, depth 1, normals 3, edge 1, sal 1
  (:func:`mtlfast.data.tasks.num_outputs`).
- ``model.forward_train(images)`` returns ``(preds, aux)``: ``preds`` as above, ``aux`` the deep-supervision
  outputs ``{stage_name: {task: (B, C_task, h, w)}}`` at the stage's own resolution (the loss,
  :class:`mtlfast.losses.MultiTaskLoss`, resizes them to the label size), ``{}`` for methods without deep
  supervision. Auxiliary tasks (MTI-Net / PAD-Net ``aux_tasks``) appear only in ``aux``.
- ``model.aux_loss_weights``: ``{stage_name: λ}`` when a stage is weighted differently from 1 (absent
  otherwise); ``model.tasks``, ``model.dataset``, ``model.num_outputs`` ({task: C_task}), ``model.backbone``.
- Every attention-like computation runs through :mod:`mtlfast.ops`, so ``mtlfast.use_backend(...)`` (or
  ``MTLFAST_BACKEND``) switches the whole model between the kernel and the reference path.

Constructors are registered with :func:`method`, which also checks the keyword arguments: an unknown
option, task, dataset or backbone is a ``ValueError`` that lists the valid choices.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mtlfast.data.tasks import canonical_dataset, check_tasks, num_outputs
from mtlfast.models.backbones import Backbone
from mtlfast.models.registry import register_model
from mtlfast.nn.common import resize

__all__ = ["MultiTaskModel", "method", "build_backbone", "default_img_size", "upsample_all", "check_aux_tasks"]

#: Training crop per dataset (DESIGN §5): Swin/ViT position tables are built for it.
_IMG_SIZE = {"nyud": (448, 576), "pascal": (512, 512), "synthetic": (64, 64)}


def default_img_size(dataset: str) -> tuple[int, int]:
    return _IMG_SIZE[canonical_dataset(dataset)]


def build_backbone(backbone: str, dataset: str, pretrained, img_size, backbone_kwargs) -> Backbone:
    return Backbone(backbone, pretrained=pretrained, img_size=img_size or default_img_size(dataset),
                    **dict(backbone_kwargs or {}))


def check_aux_tasks(aux_tasks, tasks: Sequence[str], dataset: str) -> tuple[str, ...]:
    """Auxiliary (front-end only) tasks: valid for the dataset, not among ``tasks``, no duplicates."""
    if not aux_tasks:
        return ()
    aux = check_tasks(aux_tasks, dataset)
    overlap = [t for t in aux if t in tasks]
    if overlap:
        raise ValueError(f"aux_tasks: {overlap} are already main tasks {list(tasks)}; auxiliary tasks are "
                         f"predicted in the front-end only")
    return aux


def upsample_all(outputs: Mapping[str, torch.Tensor], size) -> dict[str, torch.Tensor]:
    return {t: resize(x, size) for t, x in outputs.items()}


class MultiTaskModel(nn.Module):
    """Base class: task bookkeeping and ``forward = forward_train()[0]`` (see the module docstring)."""

    def __init__(self, tasks: Sequence[str], dataset: str, backbone: Backbone) -> None:
        super().__init__()
        self.dataset = canonical_dataset(dataset)
        self.tasks = tuple(check_tasks(tasks, self.dataset))
        self.num_outputs = {t: num_outputs(t, self.dataset) for t in self.tasks}
        self.backbone = backbone

    def forward_train(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_train(images)[0]


def method(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a model constructor ``fn(tasks, *, backbone, dataset, ...)`` under ``name`` and wraps it so
    that an unknown keyword argument is a ValueError listing the valid ones."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        signature = inspect.signature(fn).parameters.values()
        params = [p.name for p in signature if p.kind is p.KEYWORD_ONLY]
        default_dataset = next(p.default for p in signature if p.name == "dataset")

        @functools.wraps(fn)
        def build(tasks, **cfg):
            unknown = sorted(set(cfg) - set(params))
            if unknown:
                raise ValueError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
                                 f"valid options: {', '.join(params)}")
            if isinstance(tasks, str):
                tasks = [tasks]
            check_tasks(tasks, cfg.get("dataset", default_dataset))  # before the backbone is built
            return fn(list(tasks), **cfg)

        build.options = params
        register_model(name)(build)
        return build

    return decorator
