"""Per-image predictions saved to disk, for the official evaluation tools, for inspection, and scored again.

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

``mtlfast score --predictions DIR`` (:func:`score_predictions`) computes the metrics of such a folder against
the validation labels, whoever wrote it (another code base's outputs in these encodings included): class
ids, depth and normals as stored, edge and saliency probabilities ``v / 255``. For predictions written by
``mtlfast eval`` the scores equal the evaluation's for semseg, parts and depth; normals differ by the 8-bit
rounding (< 0.5 degrees per pixel), edge and saliency where a probability's rounding crosses a threshold.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["encode_prediction", "save_predictions", "read_prediction", "score_predictions", "PredictionScores",
           "PREDICTION_SUFFIX"]

#: File suffix per task.
PREDICTION_SUFFIX = {"semseg": ".png", "parts": ".png", "depth": ".npy", "normals": ".png", "edge": ".png",
                     "sal": ".png"}

# NYUD-v2's segmentation files store class c as c + 1 (0 = unlabelled; mtlfast.data.nyud)
_SEMSEG_FILE_OFFSET = {"nyud": 1}


def _class_offset(task: str, dataset: str) -> int:
    """What a class id gains in the task's files of ``dataset``."""
    return _SEMSEG_FILE_OFFSET.get(dataset, 0) if task == "semseg" else 0


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    return values.mul(255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def encode_prediction(task: str, pred: torch.Tensor, dataset: str) -> np.ndarray:
    """The array saved for one image: ``pred`` (C, H, W) raw model output (logits, metres or normals) ->
    uint8 (H, W), uint8 (H, W, 3) for normals, or float32 (H, W) for depth (see the module's table)."""
    if pred.dim() != 3:
        raise ValueError(f"{task}: expected one image's prediction (C, H, W), got shape {tuple(pred.shape)}")
    pred = pred.detach().float()
    if task in ("semseg", "parts"):
        ids = pred.argmax(0) + _class_offset(task, dataset)
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
        for pred, meta in zip(batch, metas):
            h, w = meta["size"]
            array = encode_prediction(task, pred[:, :h, :w], dataset)
            path = folder / task / f"{meta['name']}{PREDICTION_SUFFIX[task]}"
            path.parent.mkdir(parents=True, exist_ok=True)  # image ids may hold folders
            if path.suffix == ".npy":
                np.save(path, array)
            else:
                Image.fromarray(array).save(path)


def read_prediction(task: str, path: str | Path, dataset: str) -> torch.Tensor:
    """One saved prediction (see the module's table) as the meters take it: semseg/parts (1, H, W) int64 class
    ids; depth (1, 1, H, W) metres; normals (1, 3, H, W); edge/sal (1, 1, H, W) probabilities in [0, 1]."""
    from mtlfast.data import num_outputs
    from mtlfast.data.base import DataError, decode_normals, read_depth_npy, read_label_png, require_file

    path = require_file(Path(path), f"{task} prediction")
    if task == "depth":
        depth = read_depth_npy(path, "depth prediction")
        if not np.isfinite(depth).all():
            raise DataError(f"depth prediction {path}: holds NaN or infinite values")
        return torch.from_numpy(depth)[None, None]
    if task not in PREDICTION_SUFFIX:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(PREDICTION_SUFFIX)}")
    values = read_label_png(path, "RGB" if task == "normals" else None)
    if task == "normals":
        return torch.from_numpy(decode_normals(values, path)).permute(2, 0, 1)[None]
    if values.ndim != 2 or values.dtype != np.uint8:
        raise DataError(f"{task} prediction {path}: expected a single-channel 8-bit PNG, got {values.dtype} "
                        f"of shape {values.shape}")
    values = torch.from_numpy(values.astype(np.int64))
    if task in ("semseg", "parts"):
        offset, classes = _class_offset(task, dataset), num_outputs(task, dataset)
        if values.min() < offset or values.max() >= classes + offset:
            raise DataError(f"{task} prediction {path}: values {values.min().item()}..{values.max().item()}, expected "
                            f"class ids {offset}..{classes - 1 + offset} (the encoding of the dataset's label files)")
        return (values - offset)[None]
    return (values.double() / 255.0)[None, None]


class PredictionScores(NamedTuple):
    """What :func:`score_predictions` measured: ``metrics`` as ``{"task/metric": value}`` (+ ``delta_m``), and
    ``per_class_iou`` per segmentation task (percent, None for a class absent from labels and predictions), as
    ``mtlfast eval --out`` writes them."""
    metrics: dict[str, float]
    per_class_iou: dict[str, list[float | None]]


def score_predictions(folder: str | Path, val_set, tasks: Sequence[str], edge_thresholds: int | Sequence[float] = 99,
                      baseline=None, edge_workers: int = 0, progress: bool = False) -> PredictionScores:
    """Metrics (+ ``delta_m`` against ``baseline``) and per-class IoU of the predictions saved in
    ``folder/<task>/<image id>.<ext>`` for every image of ``val_set`` (a :mod:`mtlfast.data` dataset; its labels
    are read at their original size, without its transform). A missing file or one of another size than its
    label is an error that names it. ``edge_workers``: processes for the edge metric
    (:class:`~mtlfast.metrics.EdgeMeter`); ``progress``: a progress bar."""
    from tqdm import tqdm

    from mtlfast.data import canonical_dataset
    from mtlfast.metrics import build_metrics

    folder, dataset = Path(folder), canonical_dataset(val_set.name)
    metrics = build_metrics(tasks, dataset, edge_thresholds=edge_thresholds, from_logits=False,
                            edge_workers=edge_workers)
    with contextlib.closing(metrics):  # the edge meter's processes end, also on a bad file
        for index in tqdm(range(len(val_set)), desc="score", leave=False, dynamic_ncols=True, disable=not progress):
            sample = val_set.load(index)
            name, preds = sample["meta"]["name"], {}
            for task in tasks:
                path = folder / task / f"{name}{PREDICTION_SUFFIX[task]}"
                preds[task] = read_prediction(task, path, dataset)
                if tuple(preds[task].shape[-2:]) != tuple(sample[task].shape[-2:]):
                    raise ValueError(f"{task} prediction {path} has size {tuple(preds[task].shape[-2:])}, its "
                                     f"label {tuple(sample[task].shape[-2:])}")
            metrics.update(preds, {task: sample[task][None] for task in tasks})
        return PredictionScores(metrics.compute_flat(baseline), metrics.per_class_iou())
