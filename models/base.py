"""The model interface shared by every method, and the helpers the model files use.

Interface (every model returned by :func:`mtlfast.models.create_model`):

- ``model(images)`` with images (B, 3, H, W) (floating point, of the model's dtype: anything else is an error
  naming ``images``, :meth:`MultiTaskModel.check_images`) returns ``{task: (B, C_task, H, W)}`` for every task in
  ``model.tasks``, at input resolution (bilinear, align_corners=False), raw logits / regressions:
  C_task = semseg 40 (NYUD) / 21 (PASCAL) / 6 (synthetic), parts 7, depth 1, normals 3, edge 1, sal 1
  (:func:`mtlfast.data.tasks.num_outputs`).
- ``model.forward_train(images)`` returns ``(preds, aux)``: ``preds`` as above, ``aux`` the deep-supervision
  outputs ``{stage_name: {task: (B, C_task, h, w)}}`` at the stage's own resolution (the loss,
  :class:`mtlfast.losses.MultiTaskLoss`, resizes them to the label size), ``{}`` for methods without deep
  supervision. Auxiliary tasks (MTI-Net / PAD-Net / TPIM ``aux_tasks``, ``model.aux_tasks``) appear only
  in ``aux``; ``MultiTaskLoss.for_model(model)`` scores them there, as the trainer does.
- ``model.normals_loss_reduction``: how the method's public code averages the normals L1 loss
  (:func:`mtlfast.losses.normals_loss`: "element" for the MTI-Net code base, the default; "pixel" for the
  InvPT / ATRC code bases, which BridgeNet, SEM and TIF train with); ``model.tasks``, ``model.dataset``,
  ``model.num_outputs`` ({task: C_task}), ``model.backbone``.
- Every attention-like computation runs through :mod:`mtlfast.ops`, so ``mtlfast.use_backend(...)`` (or
  ``MTLFAST_BACKEND``) switches the whole model between the kernel and the reference path.
- ``model.checkpoint_decoder`` (every method's option ``checkpoint_decoder=False``; the trainer's config key
  ``model.checkpoint_decoder``; may be switched on a built model): activation checkpointing of everything
  after the backbone, stage by stage. Every method runs its stages through :meth:`MultiTaskModel.stage`,
  which in training mode with gradients enabled runs the stage under
  :func:`mtlfast.nn.common.checkpoint_stage` (``torch.utils.checkpoint``, ``use_reentrant=False``): the
  stage's intermediate activations are freed after the forward and recomputed in the backward, at the cost
  of a second forward of the decoder. Outputs, losses, gradients and buffers (BatchNorm statistics, SEM's
  EM bases: updated once, as without checkpointing) are those of the plain model; in eval mode or under
  ``torch.no_grad`` nothing changes. Which calls are stages is listed in each model's docstring.
- ``model.checkpoint_backbone`` (option ``checkpoint_backbone=False``, config key ``model.checkpoint_backbone``;
  settable on a built model): the backbone's blocks checkpointed one by one
  (:meth:`mtlfast.models.backbones.Backbone.set_grad_checkpointing`: ViT, Swin, convnet_tiny; HRNet and ResNet
  refuse), what ViT models need beside ``checkpoint_decoder``, whose activations are mostly the backbone's.

Constructors are registered with :func:`method`, which also checks the keyword arguments: an unknown
option, task, dataset or backbone is a ``ValueError`` that lists the valid choices.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from torch import nn

from mtlfast.data.tasks import canonical_dataset, check_tasks, num_outputs
from mtlfast.models.backbones import Backbone
from mtlfast.models.registry import register_model
from mtlfast.nn.common import checkpoint_stage
from mtlfast.ops._checks import autocast_dtype, check_shapes, dtype_name

__all__ = ["MultiTaskModel", "method", "build_backbone", "default_img_size", "check_aux_tasks"]

#: ``forward_train``'s result: (predictions {task: map}, deep-supervision outputs {stage: {task: map}}).
TrainOutputs = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]

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


class MultiTaskModel(nn.Module):
    """Base class: task bookkeeping, the input check, ``forward = forward_train()[0]`` and the decoder-stage
    runner :meth:`stage` (see the module docstring). A method implements :meth:`_forward_train`."""

    normals_loss_reduction = "element"
    #: Whether the method runs on levels that share one stride (a ViT with ``vit_pyramid=False``).
    accepts_single_scale = False

    def __init__(self, tasks: Sequence[str], dataset: str, backbone: Backbone) -> None:
        super().__init__()
        if getattr(backbone, "single_scale", False) and not self.accepts_single_scale:
            raise ValueError(f"backbone_kwargs: vit_pyramid=False (every level at stride {backbone.strides[0]}) "
                             f"is for bridgenet only; {type(self).__name__} decodes a multi-scale pyramid")
        self.dataset = canonical_dataset(dataset)
        self.tasks = tuple(check_tasks(tasks, self.dataset))
        self.num_outputs = {t: num_outputs(t, self.dataset) for t in self.tasks}
        self.backbone = backbone
        self.checkpoint_decoder = False

    @property
    def checkpoint_backbone(self) -> bool:
        """Activation checkpointing of the backbone's blocks (:meth:`Backbone.set_grad_checkpointing`; ViT, Swin
        and convnet_tiny), on top of or without ``checkpoint_decoder``."""
        return self.backbone.grad_checkpointing

    @checkpoint_backbone.setter
    def checkpoint_backbone(self, enable: bool) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def set_checkpointing(self, enable: bool) -> None:
        """Every activation checkpoint the model has on or off: the decoder stages (``checkpoint_decoder``) and,
        where the backbone supports it, its blocks (``checkpoint_backbone``). The least-memory training
        configuration that ``mtlfast bench --models`` and ``mtlfast info --models --activations`` compare."""
        self.checkpoint_decoder = enable
        if self.backbone.supports_grad_checkpointing:
            self.checkpoint_backbone = enable

    def stage(self, fn: Callable, *args):
        """``fn(*args)``, one stage after the backbone; with ``checkpoint_decoder`` on, in training mode with
        gradients enabled, under activation checkpointing (:func:`mtlfast.nn.common.checkpoint_stage`)."""
        if self.checkpoint_decoder and self.training and torch.is_grad_enabled():
            return checkpoint_stage(fn, *args)
        return fn(*args)

    def check_images(self, images) -> None:
        """``images``: a (B, 3, H, W) floating tensor of the model's parameter dtype; under ``torch.autocast`` the
        autocast dtype too (the layers cast to it). Shape and dtype only, no device sync."""
        check_shapes(images=(images, "B 3 H W"))
        dtype = next(self.parameters()).dtype
        autocast = autocast_dtype(images.device.type) or dtype
        if images.dtype not in (dtype, autocast):
            also = f" (or {dtype_name(autocast)}, the autocast dtype)" if autocast != dtype else ""
            raise TypeError(f"images: expected a (B, 3, H, W) floating-point tensor of the model's dtype "
                            f"{dtype_name(dtype)}{also}, got {dtype_name(images.dtype)}")

    def forward_train(self, images: torch.Tensor) -> TrainOutputs:
        """``(preds, aux)`` (module docstring): :meth:`check_images`, then the method's :meth:`_forward_train`."""
        self.check_images(images)
        return self._forward_train(images)

    def _forward_train(self, images: torch.Tensor) -> TrainOutputs:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_train(images)[0]


def method(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a model constructor ``fn(tasks, *, backbone, dataset, ...)`` under ``name`` and wraps it so
    that an unknown keyword argument is a ValueError listing the valid ones. Every method also takes
    ``checkpoint_decoder=False`` and ``checkpoint_backbone=False`` (set on the built :class:`MultiTaskModel`, see
    the module docstring)."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        signature = inspect.signature(fn).parameters.values()
        params = [p.name for p in signature if p.kind is p.KEYWORD_ONLY] + ["checkpoint_decoder", "checkpoint_backbone"]
        default_dataset = next(p.default for p in signature if p.name == "dataset")

        @functools.wraps(fn)
        def build(tasks, *, checkpoint_decoder: bool = False, checkpoint_backbone: bool = False, **cfg):
            unknown = sorted(set(cfg) - set(params))
            if unknown:
                raise ValueError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
                                 f"valid options: {', '.join(params)}")
            for option, value in (("checkpoint_decoder", checkpoint_decoder),
                                  ("checkpoint_backbone", checkpoint_backbone)):
                if not isinstance(value, bool):
                    raise TypeError(f"{option}: expected true or false, got {value!r}")
            tasks = check_tasks(tasks, cfg.get("dataset", default_dataset))  # before the backbone is built
            model = fn(list(tasks), **cfg)
            model.checkpoint_decoder = checkpoint_decoder
            if checkpoint_backbone:
                model.checkpoint_backbone = True
            return model

        build.options = params
        register_model(name)(build)
        return build

    return decorator
