"""Shared encoders: timm models with ``features_only`` (and the timm-free ``convnet_tiny``), returning a 4-level
feature pyramid.

``Backbone(name)(images)`` -> ``[f0, f1, f2, f3]``, f_i (B, channels[i], ~H/strides[i], ~W/strides[i]),
strides (4, 8, 16, 32) for every supported backbone (a ViT with ``vit_pyramid=False``: 16, 16, 16, 16):

- HRNet (``hrnet_w18_small_v2``, ``hrnet_w18``, ``hrnet_w48``): the four branch outputs (timm
  ``feature_location=""``: the raw branches, 18/36/72/144 channels for W18, not the classification
  "incre" modules), as MTI-Net and its successors use them.
- ResNet (``resnet50d``; ``resnet18`` for small runs): the outputs of layer1..layer4 (256/512/1024/2048
  channels for resnet50d, 64/128/256/512 for resnet18).
- Swin (``swin_t``, ``swin_b``): the four stage outputs (timm gives NHWC; permuted to NCHW). Built for the
  model's ``img_size`` with ``strict_img_size=False`` so that other sizes still run (windows are padded).
- ViT (``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``): the token maps after blocks d/4, d/2, 3d/4 and d of a
  depth-d ViT (all at stride 16, width D), built into a pyramid as InvPT / BridgeNet / SEM do. The papers
  leave the pyramid layers open; here they follow ViTDet's simple feature pyramid: block d/4 -> two 2×2
  transposed convs (D -> D/2 -> D/4, BN + GELU between) at stride 4; block d/2 -> one 2×2 transposed conv
  (D -> D/2) at stride 8; block 3d/4 as it is (stride 16); block d -> 2×2 max-pool (stride 32, ceil mode).
  Channels (D/4, D/2, D, D). ``dynamic_img_size`` and ``dynamic_img_pad`` let any input size run (the
  position embedding is interpolated, the image padded to a multiple of 16). With ``vit_pyramid=False``
  the four maps are returned as they are (all at stride 16, width D; ``single_scale`` is True), as the
  official BridgeNet code uses them (only :mod:`mtlfast.models.bridgenet` accepts such a backbone).
- ``convnet_tiny``: a small CNN written here (32/64/128/256 channels), not a paper backbone, for CPU runs and
  the synthetic default; it needs no timm.

Weights: ``pretrained`` is None (random init) or a local file (a timm/ImageNet state dict, ``.pth``/
``.bin``/``.safetensors``), loaded through timm's own filter (position-embedding resampling, dropping the
classifier). Nothing is ever downloaded: ``pretrained=True`` is refused.

timm is imported when a timm backbone is built (``import mtlfast.models`` works without it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mtlfast.nn.common import checkpoint_stage

__all__ = ["BACKBONES", "Backbone", "backbone_names", "needs_timm", "timm_unusable"]


@dataclass(frozen=True)
class _Spec:
    timm_name: str
    family: str  # "hrnet" | "resnet" | "swin" | "vit"
    depth: int = 0  # number of blocks (ViT only)


#: Supported backbones: short name -> timm model. The timm names are accepted as well.
BACKBONES = {
    "hrnet_w18_small_v2": _Spec("hrnet_w18_small_v2", "hrnet"),
    "hrnet_w18": _Spec("hrnet_w18", "hrnet"),
    "hrnet_w48": _Spec("hrnet_w48", "hrnet"),
    "resnet18": _Spec("resnet18", "resnet"),
    "resnet50d": _Spec("resnet50d", "resnet"),
    "swin_t": _Spec("swin_tiny_patch4_window7_224", "swin"),
    "swin_b": _Spec("swin_base_patch4_window7_224", "swin"),
    "vit_t": _Spec("vit_tiny_patch16_224", "vit", 12),
    "vit_s": _Spec("vit_small_patch16_224", "vit", 12),
    "vit_b": _Spec("vit_base_patch16_224", "vit", 12),
    "vit_l": _Spec("vit_large_patch16_224", "vit", 24),
    "convnet_tiny": _Spec("convnet_tiny", "plain"),
}
_BY_TIMM_NAME = {spec.timm_name: name for name, spec in BACKBONES.items()}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def canonical_backbone(name: str) -> str:
    """The short name (a key of :data:`BACKBONES`) of a backbone given by it or by its timm name."""
    return _resolve(name)[0]


def _resolve(name: str) -> tuple[str, _Spec]:
    if not isinstance(name, str):
        raise TypeError(f"backbone: expected a name, got {type(name).__name__}")
    short = _BY_TIMM_NAME.get(name, name)
    if short not in BACKBONES:
        raise ValueError(f"backbone: unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)} "
                         f"(or their timm names: {', '.join(_BY_TIMM_NAME)})")
    return short, BACKBONES[short]


def _import_timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or timm's torchvision import failing
        raise ImportError(
            f"mtlfast.models needs timm (with an importable torchvision) for its backbones: "
            f"{exc.__class__.__name__}: {exc}. See README (Models) for the install command.") from exc
    return timm


def needs_timm(name: str) -> bool:
    """Whether backbone ``name`` (short or timm name) comes from timm: all but ``convnet_tiny``."""
    return _resolve(name)[1].family != "plain"


def timm_unusable() -> str | None:
    """Why timm backbones cannot be built here (e.g. a torchvision that does not match torch), or None."""
    try:
        _import_timm()
    except ImportError as exc:
        return str(exc)
    return None


class _PlainPyramid(nn.Module):
    """``convnet_tiny``: a small plain CNN written here, not a paper backbone. It needs no timm, so the
    synthetic default and the CPU tests run where timm cannot be imported (timm needs a torchvision built
    for the installed torch). Stem: two 3×3 stride-2 convs (stride 4), then three stages of one 3×3 stride-2
    conv + one 3×3 conv; BN + ReLU after every conv; channels 32/64/128/256 at strides 4/8/16/32."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stages = nn.ModuleList([nn.Sequential(*conv(3, widths[0] // 2, 2), *conv(widths[0] // 2, widths[0], 2))])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.stages.append(nn.Sequential(*conv(cin, cout, 2), *conv(cout, cout, 1)))
        self.channels = list(widths)
        # each stage under checkpoint_stage in training (Backbone.set_grad_checkpointing)
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = images
        for stage in self.stages:
            x = checkpoint_stage(stage, x) if self.grad_checkpointing and torch.is_grad_enabled() and self.training \
                else stage(x)
            feats.append(x)
        return feats


def _pretrained_kwargs(pretrained) -> dict:
    if pretrained is None or pretrained is False:
        return {"pretrained": False}
    if pretrained is True:
        raise ValueError("pretrained: give a local weight file path (nothing is downloaded), not True")
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: no such weight file {path!r}")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": path}}


def _size2(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


class _VitPyramid(nn.Module):
    """ViTDet-style simple pyramid on four stride-16 maps of width D (see the module docstring)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.to_stride4 = nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), nn.BatchNorm2d(half), nn.GELU(),
                                        nn.ConvTranspose2d(half, quarter, 2, stride=2))
        self.to_stride8 = nn.ConvTranspose2d(dim, half, 2, stride=2)
        self.to_stride32 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = [quarter, half, dim, dim]

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.to_stride4(maps[0]), self.to_stride8(maps[1]), maps[2], self.to_stride32(maps[3])]


class Backbone(nn.Module):
    """An encoder (timm, or ``convnet_tiny``) returning the 4-level pyramid described in the module docstring.

    ``name``: a key of :data:`BACKBONES` (or its timm name); ``pretrained``: None or a local weight file;
    ``img_size``: the training input size (Swin/ViT position tables are built for it);
    ``vit_pyramid``: a ViT's maps built into the 4-level pyramid (default) or left at stride 16;
    ``timm_kwargs``: extra keyword arguments for ``timm.create_model`` (e.g. ``depth=4`` for a small test ViT);
    timm's defaults apply otherwise, among them Swin's stochastic depth (``drop_path_rate=0.1``: training-mode
    outputs are random; ViT's default is 0), which ``drop_path_rate=...`` sets.
    Attributes ``channels`` and ``strides`` describe the output; ``single_scale``: every level at one stride.
    """

    def __init__(self, name: str, *, pretrained=None, img_size=224, vit_pyramid: bool = True,
                 **timm_kwargs) -> None:
        super().__init__()
        self.name, spec = _resolve(name)
        self.family = spec.family
        self.nhwc, self.pyramid = False, None
        if not vit_pyramid and spec.family != "vit":
            raise ValueError(f"vit_pyramid: only ViT backbones have maps to leave at one stride; backbone {name} "
                             f"is a {spec.family} pyramid")
        kwargs = dict(features_only=True, **_pretrained_kwargs(pretrained))
        if spec.family == "plain":
            if pretrained is not None or timm_kwargs:
                raise ValueError(f"backbone {name}: takes no pretrained weights or extra arguments")
            self.encoder = _PlainPyramid()
            self.channels, self.strides = self.encoder.channels, [4, 8, 16, 32]
            return
        timm = _import_timm()
        if spec.family == "hrnet":
            kwargs.update(feature_location="", out_indices=(1, 2, 3, 4))
        elif spec.family == "resnet":
            kwargs.update(out_indices=(1, 2, 3, 4))
        elif spec.family == "swin":
            kwargs.update(img_size=_size2(img_size), strict_img_size=False)
        else:  # vit; out_indices follow from the depth, below
            kwargs.update(img_size=_size2(img_size), dynamic_img_size=True, dynamic_img_pad=True)
        kwargs.update(timm_kwargs)
        if spec.family == "vit":  # blocks d/4, d/2, 3d/4, d (0-based indices)
            depth = int(kwargs.get("depth", spec.depth))
            if depth < 4:
                raise ValueError(f"backbone {name}: a ViT needs depth >= 4 for its 4-level pyramid, got {depth}")
            kwargs["out_indices"] = tuple(depth * i // 4 - 1 for i in range(1, 5))
        self.encoder = timm.create_model(spec.timm_name, **kwargs)
        info = self.encoder.feature_info
        self.nhwc = str(getattr(self.encoder, "output_fmt", "NCHW")).endswith("NHWC")
        if spec.family == "vit" and vit_pyramid:
            self.pyramid = _VitPyramid(info.channels()[-1])
            self.channels = self.pyramid.channels
            self.strides = [4, 8, 16, 32]
        else:
            self.pyramid = None
            self.channels = list(info.channels())
            self.strides = list(info.reduction())
        if len(self.channels) != 4:
            raise RuntimeError(f"backbone {name}: expected 4 feature levels, timm returned {len(self.channels)}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder block by block (each block's input is kept, the rest recomputed
        in the backward; same outputs and gradients). ViT and Swin: timm's own per-block checkpointing
        (non-reentrant ``torch.utils.checkpoint``; their blocks hold LayerNorms only). ``convnet_tiny``: per stage
        through :func:`mtlfast.nn.common.checkpoint_stage`, which keeps BatchNorm statistics to one update.
        Refused for HRNet (timm has none) and ResNet (timm's would update BatchNorm statistics twice)."""
        flags = self._checkpoint_flags()
        if not flags:
            why = {"hrnet": "timm's HRNet has no block checkpointing",
                   "resnet": "timm checkpoints its layers without guarding BatchNorm statistics (updated twice)"}
            raise ValueError(f"checkpoint_backbone: not supported for backbone {self.name} "
                             f"({why.get(self.family, 'this timm version has no per-block checkpointing')}); "
                             f"supported: ViT, Swin and convnet_tiny backbones (model.checkpoint_decoder works for "
                             f"every backbone)")
        for module in flags:
            module.grad_checkpointing = enable

    def _checkpoint_flags(self) -> list[nn.Module]:
        """The modules whose ``grad_checkpointing`` flag checkpoints blocks: convnet_tiny's pyramid, timm's ViT /
        Swin modules; [] for the backbones without block checkpointing."""
        if self.family == "plain":
            return [self.encoder]
        if self.family not in ("vit", "swin"):
            return []
        return [m for m in self.encoder.modules() if m is not self.encoder and hasattr(m, "grad_checkpointing")]

    @property
    def supports_grad_checkpointing(self) -> bool:
        return bool(self._checkpoint_flags())

    @property
    def grad_checkpointing(self) -> bool:
        return any(m.grad_checkpointing for m in self._checkpoint_flags())

    @property
    def single_scale(self) -> bool:
        return len(set(self.strides)) == 1

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.encoder(images)
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        if self.pyramid is not None:
            feats = self.pyramid(feats)
        return list(feats)

