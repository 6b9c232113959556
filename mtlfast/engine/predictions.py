"""Per-image predictions saved to disk, for the official evaluation tools and for inspection.

``mtlfast eval --save-predictions DIR`` (:meth:`mtlfast.engine.trainer.Trainer.evaluate`) writes one file per
validation image and task, ``DIR/<task>/<image id>.<ext>``, at the image's original size (padding cropped
back), in the encoding of the dataset layout's own label files (DESIGN.md §5), so that a prediction folder
reads like a label folder:

=========  ======  ==================================================================================
task       file    content
=========  ======  ==================================================================================
semseg     .png    uint8 class ids, argmax of the logits; NYUD-v2 as its segmentation files (class + 1,
                   0 being their "unlabelled"), PASCAL-Context and synthetic 0..C-1
parts      .png    uint8 part ids 0..6 (argmax)
depth      .npy    float32 (H, W) metres, as predicted
normals    .png    uint8 RGB round(255 (n + 1) / 2) of the l2-normalised prediction (the layouts' ``2 v / 255 - 1``)
edge       .png    uint8 round(255 σ(logit)): the input of the SEISM / BSDS MATLAB tools (``read_one_png``
                   divides by 255), whose odsF is the number papers print (``edge/odsF`` here is a Python
                   approximation of it)
sal        .png    uint8 round(255 σ(logit)), as ASTMT / MTI-Net save saliency for their evaluation
=========  ======  ==================================================================================
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["encode_prediction", "save_predictions", "PREDICTION_SUFFIX"]

#: File suffix per task.
PREDICTION_SUFFIX = {"semseg": ".png", "parts": ".png", "depth": ".npy", "normals": ".png", "edge": ".png",
                     "sal": ".png"}

# NYUD-v2's segmentation files store class c as c + 1 (0 = unlabelled; mtlfast.data.nyud)
_SEMSEG_FILE_OFFSET = {"nyud": 1}


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    return values.mul(255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def encode_prediction(task: str, pred: torch.Tensor, dataset: str) -> np.ndarray:
    """The array saved for one image: ``pred`` (C, H, W) raw model output (logits, metres or normals) ->
    uint8 (H, W), uint8 (H, W, 3) for normals, or float32 (H, W) for depth (see the module's table)."""
    if pred.dim() != 3:
        raise ValueError(f"{task}: expected one image's prediction (C, H, W), got shape {tuple(pred.shape)}")
    pred = pred.detach().float()
    if task in ("semseg", "parts"):
        ids = pred.argmax(0) + (_SEMSEG_FILE_OFFSET.get(dataset, 0) if task == "semseg" else 0)
        if ids.max().item() > 254:
            raise ValueError(f"{task}: class ids up to {ids.max().item()} do not fit a uint8 PNG beside 255 (ignore)")
        return ids.to(torch.uint8).cpu().numpy()
    if task == "depth":
        return pred[0].cpu().numpy().astype(np.float32)
    if task == "normals":
        return _to_uint8((F.normalize(pred, dim=0) + 1.0) / 2.0).transpose(1, 2, 0)
    if task in ("edge", "sal"):
        return _to_uint8(torch.sigmoid(pred[0]))
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(PREDICTION_SUFFIX)}")


def save_predictions(preds: Mapping[str, torch.Tensor], metas: Sequence[Mapping], folder: str | Path,
                     dataset: str) -> None:
    """Writes ``folder/<task>/<meta['name']>.<ext>`` for every image of a batch: ``preds`` {task: (B, C, H, W)},
    ``metas`` the batch's meta dicts (``name``, and ``size`` = the original (H, W) that is kept)."""
    from PIL import Image

    folder = Path(folder)
    for task, batch in preds.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        for pred, meta in zip(batch, metas):
            h, w = meta["size"]
            array = encode_prediction(task, pred[:, :h, :w], dataset)
            path = folder / task / f"{meta['name']}{PREDICTION_SUFFIX[task]}"
            if path.suffix == ".npy":
                np.save(path, array)
            else:
                Image.fromarray(array).save(path)
