"""Joint augmentations and padding for multi-task samples (DESIGN.md §5).

A transform maps a sample dict to a new sample dict (inputs are not modified). Samples hold ``"image"``
float32 (3,H,W) (in [0,255] before :class:`Normalize`, normalised after), ``"meta"`` and one label per task
(formats in :mod:`mtlfast.data.tasks`). Geometric transforms act on the image and every label together:

- resampling: image bilinear (antialiased), labels nearest ("nearest-exact", pixel-centre aligned) so that
  class ids, {0,1} masks, invalid depth 0 and unit / zero normals keep their meaning;
- :class:`RandomScale`: factor s ~ U(0.5, 2.0); depth is divided by s (an image enlarged s times shows the
  scene s times closer);
- :class:`RandomHorizontalFlip`: mirrors image and labels and negates the normals' x component;
- :class:`PhotometricDistortion`: image only;
- padding (:class:`RandomCrop` when the image is smaller than the crop, :class:`PadTo`, :func:`collate`):
  labels get their task's invalid value (255 for semseg/parts/edge/sal, 0 for depth, the zero vector for
  normals) and the normalised image 0 (the mean colour). Padding is added at the bottom and right only,
  so ``meta["size"]`` (the original (H, W)) crops a padded prediction back: ``pred[..., :H, :W]``.

Randomness comes from torch's generator (``generator=`` or the global one, which DataLoader seeds per
worker), so a seeded run is reproducible.

``train_transform(size)``: scale, flip, photometric distortion, normalise, random crop of ``size``
(padding first when needed). The order differs from the list in DESIGN.md §5 (crop after the photometric
step and normalisation) only so that the padded area is exactly the mean colour; the distribution of
crops is the same. ``val_transform(size)``: normalise, pad to ``size`` (or to a multiple of 32).

Known differences from the InvPT / mmsegmentation training pipeline (whose recipes the ViT methods use): a
scaled image smaller than the crop is padded at the bottom/right (InvPT centres it); the crop has no
``cat_max_ratio`` retry (InvPT: up to 10 draws until no class covers 75 % of the crop); the photometric
distortion works in RGB/YIQ (brightness, contrast, saturation blended with luma, hue rotated by up to
``hue`` = 18 degrees) where mmseg shifts OpenCV HSV (hue by up to 18 of 180 units = 36 degrees) and orders
contrast randomly first or last.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mtlfast.data.tasks import IGNORE_INDEX, TASK_INFO

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Normalize", "RandomScale", "RandomHorizontalFlip",
           "PhotometricDistortion", "RandomCrop", "PadTo", "train_transform", "val_transform",
           "resize_sample", "pad_sample", "crop_sample", "flip_sample", "collate"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size2(size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"{name}: expected (height, width) of positive integers, got {size!r}")
    return size


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def _labels(sample: dict):
    return [(k, v) for k, v in sample.items() if k in TASK_INFO]


def _with(sample: dict, **meta) -> dict:
    """A shallow copy of the sample with a copied meta dict (updated with ``meta``)."""
    out = dict(sample)
    out["meta"] = {**sample.get("meta", {}), **meta}
    return out


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-exact resize of a (C,H,W) or (H,W) label tensor of any dtype."""
    squeeze = x.dim() == 2
    y = x[None, None] if squeeze else x[None]
    y = F.interpolate(y.to(torch.float32), size=size, mode="nearest-exact")
    y = y[0, 0] if squeeze else y[0]
    return y.to(x.dtype)


def resize_sample(sample: dict, size: Sequence[int], depth_divisor: float = 1.0) -> dict:
    """Resizes image (bilinear, antialiased) and labels (nearest) to ``size``; depth is divided by
    ``depth_divisor`` (the scale factor of the image)."""
    size = _size2(size)
    out = _with(sample)
    out["image"] = F.interpolate(sample["image"][None], size=size, mode="bilinear", align_corners=False,
                                 antialias=True)[0]
    for task, label in _labels(sample):
        resized = _nearest(label, size)
        out[task] = resized / depth_divisor if task == "depth" else resized
    return out


def pad_sample(sample: dict, size: Sequence[int], image_value: float = 0.0) -> dict:
    """Pads image and labels at the bottom/right to ``size`` (>= the current size) with ``image_value`` and
    each task's invalid value."""
    height, width = _size2(size)
    h, w = sample["image"].shape[-2:]
    if height < h or width < w:
        raise ValueError(f"pad size {(height, width)} is smaller than the sample {(h, w)}")
    if (height, width) == (h, w):
        return _with(sample)
    pad = (0, width - w, 0, height - h)
    out = _with(sample)
    out["image"] = F.pad(sample["image"], pad, value=image_value)
    for task, label in _labels(sample):
        out[task] = F.pad(label, pad, value=TASK_INFO[task].pad)
    return out


def crop_sample(sample: dict, top: int, left: int, size: Sequence[int]) -> dict:
    height, width = _size2(size)
    out = _with(sample)
    for key, value in [("image", sample["image"])] + _labels(sample):
        out[key] = value[..., top:top + height, left:left + width]
    return out


def flip_sample(sample: dict) -> dict:
    """Horizontal mirror of image and labels; normals get their x component negated."""
    out = _with(sample)
    out["image"] = sample["image"].flip(-1)
    for task, label in _labels(sample):
        flipped = label.flip(-1)
        if task == "normals":
            flipped = flipped * torch.tensor([-1.0, 1.0, 1.0], dtype=flipped.dtype).view(3, 1, 1)
        out[task] = flipped
    return out


class Compose:
    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Normalize:
    """image / 255, then (x - mean) / std per channel (ImageNet statistics by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: dict) -> dict:
        out = _with(sample)
        out["image"] = (sample["image"] / 255.0 - self.mean) / self.std
        return out


class RandomScale:
    """Resize by s ~ U(low, high) (rounded to whole pixels); depth divided by s; ``meta["scale"] = s``."""

    def __init__(self, low: float = 0.5, high: float = 2.0, generator: torch.Generator | None = None):
        if not 0 < low <= high:
            raise ValueError(f"scale range: expected 0 < low <= high, got ({low}, {high})")
        self.low, self.high, self.generator = low, high, generator

    def __call__(self, sample: dict) -> dict:
        s = _uniform(self.low, self.high, self.generator)
        h, w = sample["image"].shape[-2:]
        out = resize_sample(sample, (max(1, round(h * s)), max(1, round(w * s))), depth_divisor=s)
        out["meta"]["scale"] = s
        return out


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, sample: dict) -> dict:
        if _chance(self.p, self.generator):
            out = flip_sample(sample)
            out["meta"]["flipped"] = True
            return out
        return sample


class PhotometricDistortion:
    """Image-only colour jitter on [0,255] values, each step with probability 1/2 (mmseg's recipe): brightness
    + U(-32, 32); contrast x U(0.5, 1.5); saturation (blend with the luma image) x U(0.5, 1.5); hue: the
    chroma plane of YIQ rotated by U(-18, 18) degrees (a linear stand-in for an HSV hue shift); clamped to
    [0, 255]."""

    _RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def __init__(self, brightness: float = 32.0, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: float = 18.0,
                 generator: torch.Generator | None = None):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        g = self.generator
        img = sample["image"]
        if _chance(0.5, g):
            img = img + _uniform(-self.brightness, self.brightness, g)
        if _chance(0.5, g):
            img = img * _uniform(*self.contrast, g)
        if _chance(0.5, g):
            luma = (self._RGB2YIQ[0].view(3, 1, 1) * img).sum(0, keepdim=True)
            img = luma + (img - luma) * _uniform(*self.saturation, g)
        if _chance(0.5, g):
            a = math.radians(_uniform(-self.hue, self.hue, g))
            rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])
            m = torch.linalg.inv(self._RGB2YIQ) @ rot @ self._RGB2YIQ
            img = torch.einsum("ij,jhw->ihw", m, img)
        out = _with(sample)
        out["image"] = img.clamp(0.0, 255.0)
        return out


class RandomCrop:
    """Random (H, W) crop; a smaller sample is first padded at the bottom/right (labels with their invalid
    value, the image with ``image_value``); ``meta["crop"] = (top, left)``. A human-parts crop with no part
    pixel (only background / ignored) becomes all ignored, as InvPT's training crops (the reader does the
    same for whole images, :mod:`mtlfast.data.pascal`)."""

    def __init__(self, size, image_value: float = 0.0, generator: torch.Generator | None = None):
        self.size, self.image_value, self.generator = _size2(size), image_value, generator

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[-2:]
        ch, cw = self.size
        sample = pad_sample(sample, (max(h, ch), max(w, cw)), self.image_value)
        h, w = sample["image"].shape[-2:]
        top = int(torch.randint(0, h - ch + 1, (), generator=self.generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=self.generator))
        out = crop_sample(sample, top, left, self.size)
        out["meta"]["crop"] = (top, left)
        parts = out.get("parts")
        if parts is not None and not ((parts > 0) & (parts != IGNORE_INDEX)).any():
            out["parts"] = torch.full_like(parts, IGNORE_INDEX)
        return out


class PadTo:
    """Pads at the bottom/right to ``size``, or, with size=None, to the next multiple of ``multiple``.
    A sample larger than ``size`` is an error (evaluation never crops)."""

    def __init__(self, size=None, multiple: int = 32, image_value: float = 0.0):
        self.size = None if size is None else _size2(size)
        self.multiple, self.image_value = multiple, image_value

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[-2:]
        if self.size is None:
            target = (-(-h // self.multiple) * self.multiple, -(-w // self.multiple) * self.multiple)
        else:
            target = self.size
            if h > target[0] or w > target[1]:
                name = sample.get("meta", {}).get("name", "sample")
                raise ValueError(f"{name}: image of size {(h, w)} does not fit the evaluation pad size {target}; "
                                 "pass a larger size (or size=None to pad each image to a multiple of 32)")
        return pad_sample(sample, target, self.image_value)


def train_transform(size, scale: tuple[float, float] = (0.5, 2.0), flip: bool = True, photometric: bool = True,
                    generator: torch.Generator | None = None) -> Compose:
    """Random scale, flip, photometric distortion, normalise, random crop/pad to ``size``."""
    steps: list = [RandomScale(*scale, generator=generator)]
    if flip:
        steps.append(RandomHorizontalFlip(generator=generator))
    if photometric:
        steps.append(PhotometricDistortion(generator=generator))
    steps += [Normalize(), RandomCrop(size, generator=generator)]
    return Compose(steps)


def val_transform(size=None, multiple: int = 32) -> Compose:
    """Normalise and pad (bottom/right) to ``size`` or to a multiple of ``multiple``; no resizing."""
    return Compose([Normalize(), PadTo(size, multiple)])


def collate(batch: Sequence[dict]) -> dict:
    """DataLoader collate: pads every sample to the largest (H, W) in the batch (bottom/right, invalid label
    values) and stacks; ``"meta"`` becomes a list of the samples' meta dicts."""
    if not batch:
        raise ValueError("collate: empty batch")
    height = max(s["image"].shape[-2] for s in batch)
    width = max(s["image"].shape[-1] for s in batch)
    batch = [pad_sample(s, (height, width)) for s in batch]
    keys = [k for k in batch[0] if k != "meta"]
    for s in batch[1:]:
        if [k for k in s if k != "meta"] != keys:
            raise ValueError(f"collate: samples have different keys: {keys} vs {[k for k in s if k != 'meta']}")
    out = {k: torch.stack([s[k] for s in batch]) for k in keys}
    out["meta"] = [s.get("meta", {}) for s in batch]
    return out
