"""Evaluation metrics for multi-task dense prediction (DESIGN.md §5), as dataset-level accumulators.

Each meter has ``update(pred, label)`` (a batch: raw model output (B, C, H, W) and the label in the
:mod:`mtlfast.data` format, padded pixels carrying the invalid label value), ``compute() -> {name: float}``,
``reset()``, and additive state (``state_dict``/``merge``/``all_reduce`` for DDP). Percentages are in
[0, 100].

- :class:`SegmentationMeter` (semseg, parts): confusion matrix pooled over the dataset, label 255
  ignored; ``mIoU`` = mean over classes that occur in the labels or the predictions of TP/(TP+FP+FN),
  ``pixel_acc``; per-class IoU in ``IoU_per_class`` via :meth:`SegmentationMeter.per_class`.
- :class:`DepthMeter`: ``rmse`` = sqrt of the mean squared error over all valid pixels of the dataset
  (pixel-pooled, labels finite and > 0), ``abs_rel`` = mean |p − y| / y.
- :class:`NormalsMeter`: angle between the l2-normalised prediction and the (non-zero) label, in degrees,
  over all valid pixels: ``mean``, ``median`` (from a 0.01-degree histogram: exact to ±0.005 degrees; for an
  even count the mean of the two middle angles, as numpy.median),
  ``rmse``, and the percentages within 11.25, 22.5 and 30 degrees.
- :class:`SaliencyMeter`: probabilities σ(logit) thresholded at 0.05, 0.10, ..., 0.95 (pixel counted
  positive when p >= t, as the InvPT code); TP/FP/FN pooled over the dataset per threshold; ``maxF`` = max over
  thresholds of (1+β²)PR/(β²P+R) with β² = 0.3; ``maxIoU`` = max over thresholds of TP/(TP+FP+FN). Also
  ``mIoU``, ASTMT's saliency evaluation (the "Sal mIoU" of ASTMT, MTI-Net and the TPIM paper): per image the
  Jaccard index of ``p > t`` (strict) at the 15 thresholds 0.20, 0.25, ..., 0.90, 1 where both the image's
  foreground and prediction are empty; the mean over images, then the max over thresholds.
- :class:`EdgeMeter`: ``odsF``, the optimal-dataset-scale F-measure with the conventions of the SEISM
  / BSDS tools: per image, σ(logit) goes through edge non-maximum suppression (as P. Dollár's edgesNms:
  orientation from second derivatives of the triangle-smoothed map, suppression against the two
  interpolated neighbours across the edge at radius 1 with a 1.01 margin, values within 5 pixels of the
  border tapered linearly); for each threshold the map ``>= t`` is thinned (:func:`thin`, identical to
  ``skimage.morphology.thin``, as ``bwmorph(..,'thin',Inf)``) and its pixels are matched one-to-one to
  ground-truth edge pixels at Euclidean distance <= maxDist x image diagonal (dy² + dx² <= r²; a maximum
  one-to-one matching, by max-flow and augmenting paths; the MATLAB tool solves a min-cost assignment with
  outlier costs, which yields the same number of matches in all but contrived cases); matched/total counts
  of predictions (precision) and ground truth (recall) are summed over the dataset per threshold, and
  odsF is the best F (β = 1) over thresholds (default 99, 0.01 ... 0.99). :func:`edge_counts` does all
  thresholds of an image at once, sharing the per-image work (on 480x640 maps 99 thresholds took
  0.2-0.5 s of one CPU core, 1.3-3x the time of 9).
  THIS IS A PYTHON APPROXIMATION OF THE MATLAB SEISM TOOL: numbers are close to, not identical with,
  published ones. Pixels labelled 255 (padding) are removed from both maps; the diagonal is that of
  the bounding box of the non-ignored pixels (the original image when padding is at the bottom/right).

:func:`delta_m` computes Δm against a single-task baseline file (:func:`load_baseline`): a path, or the
short name of one stored with the package (:func:`list_baselines`: the single-task numbers printed in the
papers, each file naming its source; ``mtlfast baseline`` measures one for any config);
:func:`build_metrics` returns a :class:`MultiTaskMetrics` for a task list and dataset.
"""
from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtlfast.data.tasks import (IGNORE_INDEX, TASK_INFO, canonical_dataset, check_tasks, edge_max_dist,
                                num_outputs)

__all__ = ["Meter", "SegmentationMeter", "DepthMeter", "NormalsMeter", "SaliencyMeter", "EdgeMeter",
           "MultiTaskMetrics", "build_metrics", "delta_m", "load_baseline", "list_baselines", "edge_nms",
           "match_edges", "edge_counts", "thin", "LOWER_IS_BETTER"]

#: Metric names where a lower value is better (for Δm).
LOWER_IS_BETTER = frozenset({"rmse", "abs_rel", "mean", "median"})


def _check_pair(name: str, pred: torch.Tensor, label: torch.Tensor, channels: int | None, class_label: bool):
    if pred.dim() != 4 or (channels is not None and pred.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{name}: expected a prediction of shape {want}, got {tuple(pred.shape)}")
    expected = (pred.shape[0], *pred.shape[2:]) if class_label else (pred.shape[0], pred.shape[1], *pred.shape[2:])
    if tuple(label.shape) != expected:
        raise ValueError(f"{name}: label of shape {tuple(label.shape)} does not fit prediction {tuple(pred.shape)} "
                         f"(expected {expected}); crop or pad both alike")
    non_finite = (~torch.isfinite(pred)).sum().item()  # argmax, thresholds and edge NMS would not say a word
    if non_finite:
        raise ValueError(f"{name}: the prediction holds NaN or infinite values ({non_finite} of them; a diverged "
                         "model?): its metrics would mean nothing")


class Meter:
    """Base class: the state is a dict of tensors that add up across batches and processes."""

    def __init__(self):
        self.reset()

    def _zero_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.state = self._zero_state()

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def _add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.state[key] += value.detach().to("cpu", self.state[key].dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: state[k].clone().to(v.dtype) for k, v in self._zero_state().items()}

    def merge(self, other: "Meter") -> None:
        for key in self.state:
            self.state[key] += other.state[key]

    def close(self) -> None:
        """Releases what the meter holds besides its state (:class:`EdgeMeter`'s worker processes)."""

    def all_reduce(self) -> None:
        """Sums the state over the processes of the default torch.distributed group (no-op outside DDP)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for key, value in self.state.items():
            buf = value.to(device)
            dist.all_reduce(buf)
            self.state[key] = buf.cpu()


class SegmentationMeter(Meter):
    """Dataset-pooled confusion matrix of ``num_classes`` classes; pred logits (B,C,H,W) or ids (B,H,W)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        super().__init__()

    def _zero_state(self):
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    def update(self, pred, label):
        if pred.dim() == 4:
            _check_pair("segmentation", pred, label, self.num_classes, True)
            pred = pred.argmax(1)
        elif tuple(pred.shape) != tuple(label.shape):
            raise ValueError(f"segmentation: class-id prediction {tuple(pred.shape)} and label {tuple(label.shape)} "
                             "differ in shape")
        valid = label != self.ignore_index
        truth, guess = label[valid].long(), pred[valid].long()
        if truth.numel() and (truth.min() < 0 or truth.max() >= self.num_classes):
            raise ValueError(f"segmentation: label values outside 0..{self.num_classes - 1} and {self.ignore_index}")
        if guess.numel() and (guess.min() < 0 or guess.max() >= self.num_classes):  # would land in another cell
            raise ValueError(f"segmentation: predicted class ids outside 0..{self.num_classes - 1} "
                             f"(got {guess.min().item()}..{guess.max().item()} where the label is valid)")
        counts = torch.bincount(truth * self.num_classes + guess, minlength=self.num_classes ** 2)
        self._add(confusion=counts.view(self.num_classes, self.num_classes))

    def per_class(self) -> torch.Tensor:
        """IoU of each class in [0, 1] (NaN for a class absent from labels and predictions).

        mIoU averages the classes that occur (in labels or predictions). The public MTI-Net / InvPT evaluation
        counts a class absent from both as IoU 0; the two agree whenever every class occurs in the evaluated
        set (NYUD-v2 and PASCAL-Context val) and differ on subsets (quick evaluations, small synthetic sets),
        where a class nobody saw or predicted says nothing about the model."""
        conf = self.state["confusion"].double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self):
        iou = self.per_class()
        conf = self.state["confusion"]
        total = conf.sum().item()
        miou = iou.nanmean().item() if not torch.isnan(iou).all() else float("nan")
        return {"mIoU": 100.0 * miou, "pixel_acc": 100.0 * conf.diag().sum().item() / total if total else float("nan")}


class DepthMeter(Meter):
    """Pixel-pooled depth errors over labels that are finite and > 0; pred, label (B,1,H,W) metres; negative
    predictions count as 0 (the public MTI-Net / InvPT meters clamp them too)."""

    def _zero_state(self):
        return {"sq_err": torch.zeros((), dtype=torch.float64), "rel_err": torch.zeros((), dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.int64)}

    def update(self, pred, label):
        _check_pair("depth", pred, label, 1, False)
        valid = torch.isfinite(label) & (label > 0)
        p, y = pred[valid].double().clamp(min=0), label[valid].double()  # depth >= 0, as the MTI-Net/InvPT meters
        self._add(sq_err=((p - y) ** 2).sum(), rel_err=((p - y).abs() / y).sum(), count=valid.sum())

    def compute(self):
        n = self.state["count"].item()
        if n == 0:
            return {"rmse": float("nan"), "abs_rel": float("nan")}
        return {"rmse": math.sqrt(self.state["sq_err"].item() / n), "abs_rel": self.state["rel_err"].item() / n}


class NormalsMeter(Meter):
    """Angular error (degrees) of l2-normalised predictions against non-zero labels; (B,3,H,W) both."""

    BIN = 0.01  # degrees per histogram bin (median resolution)
    THRESHOLDS = (11.25, 22.5, 30.0)

    def _zero_state(self):
        return {"hist": torch.zeros(int(round(180 / self.BIN)) + 1, dtype=torch.int64),
                "sum": torch.zeros((), dtype=torch.float64), "sq_sum": torch.zeros((), dtype=torch.float64),
                "within": torch.zeros(len(self.THRESHOLDS), dtype=torch.int64)}

    def update(self, pred, label):
        _check_pair("normals", pred, label, 3, False)
        valid = (label != 0).any(1)
        p = F.normalize(pred.double(), dim=1).movedim(1, -1)[valid]
        y = F.normalize(label.double(), dim=1).movedim(1, -1)[valid]
        angle = torch.rad2deg(torch.acos((p * y).sum(-1).clamp(-1.0, 1.0)))
        bins = torch.bincount((angle / self.BIN).round().long(), minlength=self.state["hist"].numel())
        within = torch.stack([(angle <= t).sum() for t in self.THRESHOLDS])
        self._add(hist=bins, sum=angle.sum(), sq_sum=(angle ** 2).sum(), within=within)

    def compute(self):
        hist = self.state["hist"]
        n = hist.sum().item()
        if n == 0:
            return {k: float("nan") for k in ("mean", "median", "rmse", "11.25", "22.5", "30")}
        # numpy.median's convention (the MTI-Net / InvPT meters): the mean of the two middle angles for even n
        middle = torch.searchsorted(hist.cumsum(0), torch.tensor([(n + 1) // 2, n // 2 + 1]))
        out = {"mean": self.state["sum"].item() / n, "median": middle.double().mean().item() * self.BIN,
               "rmse": math.sqrt(self.state["sq_sum"].item() / n)}
        for t, count in zip(("11.25", "22.5", "30"), self.state["within"].tolist()):
            out[t] = 100.0 * count / n
        return out


def _f_measure(precision: torch.Tensor, recall: torch.Tensor, beta2: float) -> torch.Tensor:
    denom = beta2 * precision + recall
    return torch.where(denom > 0, (1 + beta2) * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(denom))


class SaliencyMeter(Meter):
    """Saliency from pred (B,1,H,W) logits (``from_logits=False``: probabilities), label (B,1,H,W) {0,1}, 255
    ignored. ``maxF`` (β² = 0.3) and ``maxIoU``: dataset-pooled counts of ``p >= t`` over ``thresholds``
    (default 0.05:0.05:0.95; InvPT's evaluation, DESIGN.md §5). ``mIoU``: ASTMT's per-image evaluation
    (:data:`ASTMT_THRESHOLDS`, ``p > t``, Jaccard per image with empty-vs-empty = 1, mean over images, max over
    thresholds), the number ASTMT / MTI-Net / the TPIM paper print as "Sal mIoU". Ignored pixels (PASCAL's
    validation padding) are left out of both, as ASTMT evaluates the unpadded image. The probabilities are
    not quantised to 8 bits first (ASTMT thresholds the saved PNGs: a difference only for p within 1/510 of
    a threshold)."""

    #: ASTMT's thresholds for the per-image mIoU: numpy.linspace(0.2, 0.9, 15).
    ASTMT_THRESHOLDS = tuple(np.linspace(0.2, 0.9, 15).tolist())

    def __init__(self, thresholds: Sequence[float] | None = None, beta2: float = 0.3, from_logits: bool = True):
        self.thresholds = torch.tensor(thresholds if thresholds is not None else
                                       [round(0.05 * k, 2) for k in range(1, 20)], dtype=torch.float64)
        self.beta2, self.from_logits = beta2, from_logits
        super().__init__()

    def _zero_state(self):
        n = len(self.thresholds)
        state = {k: torch.zeros(n, dtype=torch.int64) for k in ("tp", "fp", "fn")}
        state["jaccard_sum"] = torch.zeros(len(self.ASTMT_THRESHOLDS), dtype=torch.float64)
        state["images"] = torch.zeros((), dtype=torch.int64)
        return state

    def update(self, pred, label):
        _check_pair("saliency", pred, label, 1, False)
        prob = (torch.sigmoid(pred.double()) if self.from_logits else pred.double())
        valid = label != IGNORE_INDEX
        truth = valid & (label == 1)
        positive = prob[valid][None, :] >= self.thresholds.to(prob.device)[:, None]
        tp = (positive & truth[valid]).sum(1)
        scored = valid.flatten(1).any(1)  # an image without a valid pixel is left out (as EdgeMeter does)
        jaccard = self._astmt_jaccard(prob.flatten(1), truth.flatten(1), valid.flatten(1))
        self._add(tp=tp, fp=positive.sum(1) - tp, fn=truth.sum() - tp,
                  jaccard_sum=jaccard[scored].sum(0), images=scored.sum())

    @classmethod
    def _astmt_jaccard(cls, prob: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, len(ASTMT_THRESHOLDS)) Jaccard index of each image's ``prob > t`` against ``truth`` over its
        valid pixels; prob, truth, valid (B, P)."""
        thresholds = torch.tensor(cls.ASTMT_THRESHOLDS, dtype=torch.float64, device=prob.device)
        n_t, batch = len(thresholds), prob.shape[0]
        # level = number of thresholds strictly below p: the pixel is positive at thresholds 0 .. level-1
        level = torch.searchsorted(thresholds, prob.contiguous(), side="left")
        slot = (torch.arange(batch, device=prob.device)[:, None] * (n_t + 1) + level)[valid]
        size = batch * (n_t + 1)
        counts = torch.stack([torch.bincount(slot, minlength=size), torch.bincount(slot[truth[valid]], minlength=size)])
        above = counts.view(2, batch, n_t + 1).flip(-1).cumsum(-1).flip(-1)[..., 1:]  # positives at each threshold
        predicted, tp = above.double()
        union = predicted + truth.sum(1, keepdim=True).double() - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(union))

    def compute(self):
        tp, fp, fn = (self.state[k].double() for k in ("tp", "fp", "fn"))
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        f = _f_measure(precision, recall, self.beta2)
        iou = tp / (tp + fp + fn).clamp(min=1)
        images = self.state["images"].item()
        miou = 100.0 * (self.state["jaccard_sum"] / images).max().item() if images else float("nan")
        return {"maxF": 100.0 * f.max().item(), "maxIoU": 100.0 * iou.max().item(), "mIoU": miou}


def _conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable triangle filter of radius ``radius`` with symmetric padding (Dollár's convTri)."""
    from scipy.ndimage import convolve1d

    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float64)
    kernel /= kernel.sum()
    return convolve1d(convolve1d(image, kernel, axis=0, mode="reflect"), kernel, axis=1, mode="reflect")


def edge_nms(edges: np.ndarray, radius: int = 1, border: int = 5, margin: float = 1.01) -> np.ndarray:
    """Non-maximum suppression of an edge-strength map (H, W) in [0, 1], following Dollár's edgesNms:
    orientation O = atan(Oyy·sign(−Oxy) / (Oxx + 1e-5)) mod π from gradients of the map smoothed by a
    radius-4 triangle filter; a pixel is zeroed when ``margin`` x its value is below the bilinearly
    interpolated value at distance 1..radius along ±(cos O, sin O); values within ``border`` pixels of the
    image border are scaled by distance / border (row and column factors multiplied; border at most half
    the image)."""
    from scipy.ndimage import map_coordinates

    e = np.asarray(edges, dtype=np.float64)
    oy, ox = np.gradient(_conv_tri(e, 4))
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    orient = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)
    rows, cols = np.nonzero(e > 0)
    value = e[rows, cols] * margin
    cos, sin = np.cos(orient[rows, cols]), np.sin(orient[rows, cols])
    keep = np.ones(len(rows), dtype=bool)
    h, w = e.shape
    for d in [k for r in range(1, radius + 1) for k in (r, -r)]:
        y = np.clip(rows + d * sin, 0, h - 1.001)
        x = np.clip(cols + d * cos, 0, w - 1.001)
        keep &= value >= map_coordinates(e, [y, x], order=1, mode="nearest")
    out = np.zeros_like(e)
    out[rows[keep], cols[keep]] = e[rows[keep], cols[keep]]
    border = min(border, h // 2, w // 2)
    if border > 0:
        ramp_r = np.minimum(np.minimum(np.arange(h), np.arange(h)[::-1]) / border, 1.0)
        ramp_c = np.minimum(np.minimum(np.arange(w), np.arange(w)[::-1]) / border, 1.0)
        out *= ramp_r[:, None] * ramp_c[None, :]
    return out


def _disk_offsets(radius: float) -> np.ndarray:
    """(dy, dx) of the integer offsets with dy² + dx² <= radius² (the matching tolerance, in pixels)."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy ** 2 + dx ** 2 <= radius ** 2
    return np.stack([dy[inside], dx[inside]], 1)


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo-Hall thinning as ``skimage.morphology.thin`` builds
    them (its ``_generate_thin_luts``): index = 8-neighbour code with bits E, NE, N, NW, W, SW, S, SE."""
    b = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool)
    g1 = sum((~b[:, i] & (b[:, i + 1] | b[:, (i + 2) % 8])).astype(int) for i in (0, 2, 4, 6)) == 1
    n1 = sum((b[:, k] | b[:, k - 1]).astype(int) for k in (1, 3, 5, 7))
    n2 = sum((b[:, k] | b[:, (k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
    g2 = np.isin(np.minimum(n1, n2), (2, 3))
    g3 = ~((b[:, 1] | b[:, 2] | ~b[:, 7]) & b[:, 0])
    g3p = ~((b[:, 5] | b[:, 6] | ~b[:, 3]) & b[:, 4])
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_LUTS = _thin_luts()
_NEIGHBOUR_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=np.uint8)  # E NE N NW W SW S SE
_NEIGHBOUR_DIRS = np.array([(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)])
_EMPTY = np.empty(0, dtype=np.int64)


class _Thinner:
    """Exact sparse re-implementation of ``skimage.morphology.thin`` (``bwmorph(.., 'thin', Inf)``) on an
    image padded by 2 and flattened. It keeps the 8-neighbour code of every pixel up to date and, after the
    first pass, re-examines only pixels whose neighbourhood changed since the sub-iteration last looked at
    them: a pixel whose code did not change gets the same answer from the same table. The sequence of
    parallel deletions, hence the result, is the one of skimage's full-image passes."""

    def __init__(self, shape: tuple[int, int]):
        self.h, self.w = shape
        self.width = self.w + 4
        self.offsets = _NEIGHBOUR_DIRS[:, 0] * self.width + _NEIGHBOUR_DIRS[:, 1]
        self._stamp: np.ndarray | None = None
        # pixel d contributes to its neighbour q = d + o the bit of the direction of d seen from q, i.e. -o
        self.back_weights = np.array([_NEIGHBOUR_WEIGHTS[list(map(tuple, _NEIGHBOUR_DIRS)).index((-y, -x))]
                                      for y, x in _NEIGHBOUR_DIRS], dtype=np.uint8)

    def _distinct(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` without repeats (order kept up to which copy survives), without sorting."""
        if pixels.size < 2:
            return pixels
        if self._stamp is None:
            self._stamp = np.zeros((self.h + 4) * self.width, dtype=np.int64)
        order = np.arange(pixels.size)
        self._stamp[pixels] = order
        return pixels[self._stamp[pixels] == order]

    def flat_index(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return (ys + 2) * self.width + (xs + 2)

    def codes(self, skel: np.ndarray) -> np.ndarray:
        """Neighbour codes of every pixel (padding ring included) of a padded flat uint8 {0,1} image."""
        img = skel.reshape(self.h + 4, self.width)
        code = np.zeros_like(img)
        inner = code[1:-1, 1:-1]
        for (dy, dx), weight in zip(_NEIGHBOUR_DIRS, _NEIGHBOUR_WEIGHTS):
            inner |= img[1 + dy:img.shape[0] - 1 + dy, 1 + dx:img.shape[1] - 1 + dx] * weight
        return code.ravel()

    def remove(self, skel: np.ndarray, code: np.ndarray, pixels: np.ndarray) -> None:
        """Sets distinct foreground ``pixels`` to 0, updating the codes of their neighbours."""
        skel[pixels] = 0
        for offset, weight in zip(self.offsets, self.back_weights):
            code[pixels + offset] -= weight  # distinct targets within one direction

    def thin(self, skel: np.ndarray, code: np.ndarray, foreground: np.ndarray) -> int:
        """Thins ``skel`` in place (``code`` kept in step); ``foreground``: its pixels. Returns how many
        pixels were deleted."""
        pending = [foreground, foreground]  # pixels each sub-iteration still has to (re)examine
        deleted, sub = 0, 0
        while True:
            candidates, pending[sub] = pending[sub], _EMPTY
            if candidates.size:
                candidates = candidates[skel[candidates] != 0]
            gone = candidates[_THIN_LUTS[sub][code[candidates]]] if candidates.size else _EMPTY
            if gone.size:
                self.remove(skel, code, gone)
                deleted += gone.size
                touched = (gone[:, None] + self.offsets[None, :]).ravel()
                touched = touched[skel[touched] != 0]
                for k in (0, 1):
                    pending[k] = self._distinct(np.concatenate([pending[k], touched]))
            elif not pending[1 - sub].size:  # neither sub-iteration has a pixel left to look at
                return deleted
            sub ^= 1


def thin(image: np.ndarray) -> np.ndarray:
    """Morphological thinning of a boolean (H, W) image, identical to ``skimage.morphology.thin(image)``
    (Guo-Hall two-sub-iteration thinning until nothing changes, as MATLAB's ``bwmorph(.., 'thin', Inf)``),
    faster on sparse images."""
    image = np.asarray(image).astype(bool)
    if image.ndim != 2:
        raise ValueError(f"thin: expected a 2-D image, got shape {image.shape}")
    thinner = _Thinner(image.shape)
    skel = np.zeros((image.shape[0] + 4, image.shape[1] + 4), dtype=np.uint8)
    skel[2:-2, 2:-2] = image
    skel = skel.ravel()
    ys, xs = np.nonzero(image)
    thinner.thin(skel, thinner.codes(skel), thinner.flat_index(ys, xs))
    return skel.reshape(image.shape[0] + 4, -1)[2:-2, 2:-2].astype(bool)


def _max_matching(gt_of_edge: np.ndarray, pred_of_edge: np.ndarray, n_gt: int, n_pred: int,
                  pairs: bool = False):
    """Size of a maximum matching of the bipartite graph with edges (gt_of_edge[i], pred_of_edge[i]),
    ``gt_of_edge`` sorted ascending, every pred node 0..n_pred-1 on at least one edge. ``pairs=True``:
    (size, gt nodes, pred nodes) of the matched pairs."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    if gt_of_edge.size == 0:
        return (0, _EMPTY, _EMPTY) if pairs else 0
    # Unit-capacity flow source -> gt pixel -> pred pixel -> sink solved by Dinic's algorithm (O(E sqrt V), as
    # Hopcroft-Karp). Not scipy's maximum_bipartite_matching: its DFS takes exponential time on layered
    # graphs (scipy issue 26147), which chains of edge pixels are; it did not finish on a 375x500 map.
    # Nodes: 0 source, 1..n_gt ground truth, n_gt+1..n_gt+n_pred predictions, n_gt+n_pred+1 sink; the CSR
    # arrays are written directly (rows in node order, edge i of the input at position n_gt + i).
    sink = n_gt + n_pred + 1
    n_edges = gt_of_edge.size
    indptr = np.empty(sink + 2, dtype=np.int32)
    indptr[0], indptr[1] = 0, n_gt
    indptr[2:n_gt + 2] = n_gt + np.cumsum(np.bincount(gt_of_edge, minlength=n_gt))
    indptr[n_gt + 2:sink + 1] = n_gt + n_edges + np.arange(1, n_pred + 1)
    indptr[sink + 1] = n_gt + n_edges + n_pred
    indices = np.concatenate([np.arange(1, n_gt + 1), n_gt + 1 + pred_of_edge, np.full(n_pred, sink)])
    graph = csr_matrix((np.ones(indices.size, dtype=np.int32), indices.astype(np.int32), indptr),
                       shape=(sink + 1, sink + 1))
    result = maximum_flow(graph, 0, sink, method="dinic")
    size = int(result.flow_value)
    if not pairs:
        return size
    # the matched edges: unit flow on a ground-truth -> prediction arc
    flow = result.flow.tocsr()
    rows = np.repeat(np.arange(flow.shape[0]), np.diff(flow.indptr))
    hit = (flow.data == 1) & (rows >= 1) & (rows <= n_gt) & (flow.indices > n_gt) & (flow.indices < sink)
    return size, rows[hit].astype(np.int64) - 1, flow.indices[hit].astype(np.int64) - n_gt - 1


class _EdgeGraph:
    """Admissible pairs (ground-truth pixel, candidate prediction pixel) at distance <= ``radius`` of one
    image, built once for all thresholds. Candidates: the pixels of ``support`` within ``radius`` of some
    ground-truth pixel. The pairs are kept in both orders (by ground-truth pixel and by candidate) for the
    augmenting-path searches of :meth:`count`."""

    def __init__(self, support: np.ndarray, gt: np.ndarray, radius: float):
        h, w = gt.shape
        gy, gx = np.nonzero(gt)
        self.n_gt, self.n_cand = len(gy), 0
        self.pixels = (_EMPTY, _EMPTY)
        self.gt_of_edge = self.cand_of_edge = _EMPTY
        if self.n_gt == 0 or not support.any():
            return
        from scipy.ndimage import distance_transform_edt

        # the distance transform only prunes: the tolerance is the integer rule of _disk_offsets, so pixels up
        # to a rounding error beyond the radius are kept and left to it
        near = support & (distance_transform_edt(~gt) <= radius * (1 + 1e-9) + 1e-9)
        cy, cx = np.nonzero(near)
        if len(cy) == 0:
            return
        r = int(math.floor(radius))
        width = w + 2 * r
        index = np.full((h + 2 * r) * width, -1, dtype=np.int64)
        index[(cy + r) * width + (cx + r)] = np.arange(len(cy))
        offsets = _disk_offsets(radius)
        flat_offsets = offsets[:, 0] * width + offsets[:, 1]
        base = (gy + r) * width + (gx + r)
        gt_parts, cand_parts = [], []
        block = max(1, (1 << 22) // len(flat_offsets))  # ground-truth pixels per block: bounded memory
        for lo in range(0, self.n_gt, block):
            cand = index[base[lo:lo + block, None] + flat_offsets[None, :]]  # -1: no candidate at that offset
            g, k = np.nonzero(cand >= 0)                                      # row-major: sorted by ground truth
            gt_parts.append(g + lo)
            cand_parts.append(cand[g, k])
        gt_of_edge = np.concatenate(gt_parts)
        self.gt_of_edge, self.cand_of_edge = gt_of_edge, np.concatenate(cand_parts)
        self.pixels, self.n_cand = (cy, cx), len(cy)
        self.gt_ptr = np.concatenate([[0], np.cumsum(np.bincount(gt_of_edge, minlength=self.n_gt))])
        by_cand = np.argsort(self.cand_of_edge, kind="stable")
        self.gt_by_cand = gt_of_edge[by_cand]
        self.cand_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.cand_of_edge, minlength=self.n_cand))])

    def count(self, selected: np.ndarray, warm: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """Maximum matching between the ground truth and the candidates with ``selected[i]`` true:
        (size, (ground-truth ids, candidate ids) of its pairs).

        ``warm``: the pairs of a matching for another selection (the neighbouring threshold). Its pairs
        whose candidate is still selected form a matching here, which is grown by augmenting paths
        (:func:`_augment`) until a search finds none: then it is maximum (Berge's theorem). Without
        ``warm``, or when the augmentation takes too many phases, the max-flow solver runs."""
        if self.gt_of_edge.size == 0 or not selected.any():
            return 0, (_EMPTY, _EMPTY)
        if warm is not None:
            wg, wc = warm
            still = selected[wc]
            wg, wc = wg[still], wc[still]
            mate_gt = np.full(self.n_gt, -1, dtype=np.int64)
            mate_cand = np.full(self.n_cand, -1, dtype=np.int64)
            mate_gt[wg], mate_cand[wc] = wc, wg
            all_gt = np.ones(self.n_gt, dtype=bool)
            # search from the side with fewer unmatched nodes
            if self.n_gt <= int(np.count_nonzero(selected)):
                done = _augment(self.gt_ptr, self.cand_of_edge, mate_gt, mate_cand, all_gt, selected)
            else:
                done = _augment(self.cand_ptr, self.gt_by_cand, mate_cand, mate_gt, selected, all_gt)
            if done:
                g = np.flatnonzero(mate_gt >= 0)
                return len(g), (g, mate_gt[g])
        keep = selected[self.cand_of_edge]
        gt_of_edge, cand_of_edge = self.gt_of_edge[keep], self.cand_of_edge[keep]
        if gt_of_edge.size == 0:
            return 0, (_EMPTY, _EMPTY)
        used = np.zeros(self.n_cand, dtype=bool)
        used[cand_of_edge] = True
        renumber = np.cumsum(used) - 1
        size, g, p = _max_matching(gt_of_edge, renumber[cand_of_edge], self.n_gt, int(renumber[-1]) + 1,
                                   pairs=True)
        return size, (g, np.flatnonzero(used)[p])


def _augment(ptr: np.ndarray, neighbours: np.ndarray, mate_a: np.ndarray, mate_b: np.ndarray,
             valid_a: np.ndarray, valid_b: np.ndarray, max_phases: int = 64) -> bool:
    """Grows a matching of a bipartite graph A-B to maximum by shortest augmenting paths, in phases as
    Hopcroft-Karp: a breadth-first search from every unmatched node of A (``valid_a``) along alternating
    paths, one layer at a time in numpy, then vertex-disjoint paths of its search forest are flipped.
    Node a of A has the neighbours ``neighbours[ptr[a]:ptr[a + 1]]`` in B, of which those with ``valid_b``
    count; ``mate_a``/``mate_b``: partner or -1, updated in place. Returns True once a search finds no
    augmenting path (the matching is then maximum, Berge's theorem), False after ``max_phases`` phases."""
    for _ in range(max_phases):
        parent = np.full(len(mate_b), -1, dtype=np.int64)  # the A node a B node was first reached from
        seen_a = np.zeros(len(mate_a), dtype=bool)
        frontier = np.flatnonzero(valid_a & (mate_a < 0))
        seen_a[frontier] = True
        free = _EMPTY
        while frontier.size:
            starts = ptr[frontier]
            lens = ptr[frontier + 1] - starts
            total = int(lens.sum())
            if total == 0:
                break
            pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
            a, b = np.repeat(frontier, lens), neighbours[pos]
            new = valid_b[b] & (parent[b] < 0)
            a, b = a[new], b[new]
            parent[b] = a
            first = parent[b] == a  # one entry per B node (the pairs (a, b) are distinct)
            a, b = a[first], b[first]
            unmatched = mate_b[b] < 0
            if unmatched.any():
                free = b[unmatched]
                break
            frontier = mate_b[b]
            frontier = frontier[~seen_a[frontier]]
            seen_a[frontier] = True
        if free.size == 0:
            return True
        taken = np.zeros(len(mate_a), dtype=bool)
        for b in free.tolist():  # flip vertex-disjoint paths b <- a (<- mate b' <- a' ...) of the forest
            path = []
            while True:
                a = int(parent[b])
                if taken[a]:
                    path = None
                    break
                path.append((a, b))
                if mate_a[a] < 0:
                    break
                b = int(mate_a[a])
            for a, b in path or ():
                taken[a] = True
                mate_a[a], mate_b[b] = b, a
    return False


def match_edges(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Number of matched pairs between the pixels of two boolean (H, W) edge maps: a maximum one-to-one
    matching of predicted to ground-truth pixels at Euclidean distance <= ``max_dist`` pixels
    (dy² + dx² <= max_dist²)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    graph = _EdgeGraph(pred, gt, max_dist)
    return graph.count(np.ones(graph.n_cand, dtype=bool))[0]


def edge_counts(prob: np.ndarray, gt: np.ndarray, max_dist: float, thresholds: Sequence[float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold t of one image: (matched, n_pred) where n_pred counts the pixels of
    ``thin(prob >= t)`` and matched is the size of their maximum matching to ``gt`` at distance <=
    ``max_dist`` pixels (:func:`match_edges`). The same numbers as that per-threshold loop, with the
    per-image work shared: the set ``prob >= t`` and its neighbour codes are updated only where pixels leave
    it as t increases, thinning is sparse (:class:`_Thinner`), the candidate pairs are listed once, and each
    threshold's maximum matching starts from its neighbour's (one max-flow solve per image)."""
    prob = np.asarray(prob, dtype=np.float64)
    gt = np.asarray(gt, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    matched = np.zeros(len(thresholds), dtype=np.int64)
    n_pred = np.zeros(len(thresholds), dtype=np.int64)
    if len(thresholds) == 0:
        return matched, n_pred
    order_t = np.argsort(thresholds, kind="stable")
    lowest = thresholds[order_t[0]]
    ys, xs = np.nonzero(prob >= lowest)
    if len(ys) == 0:
        return matched, n_pred
    thinner = _Thinner(prob.shape)
    values = prob[ys, xs]
    by_value = np.argsort(values, kind="stable")
    sorted_values = values[by_value]
    flat = thinner.flat_index(ys, xs)[by_value]        # pixels of prob >= lowest, by increasing value
    base = np.zeros((prob.shape[0] + 4) * thinner.width, dtype=np.uint8)
    base[flat] = 1
    base_code = thinner.codes(base)
    graph = _EdgeGraph(prob >= lowest, gt, max_dist)
    cand_flat = thinner.flat_index(*graph.pixels)
    # pass 1, increasing thresholds: thin each distinct set prob >= t; keep its candidates and pixel count
    selections: list[tuple[np.ndarray | None, int]] = []   # per visited threshold, in increasing order
    start, current = 0, None
    for k in order_t:
        first = int(np.searchsorted(sorted_values, thresholds[k], side="left"))  # flat[first:]: prob >= t
        if first > start:
            thinner.remove(base, base_code, flat[start:first])
            start, current = first, None
        if current is None:  # the set changed (or first visit)
            skel, code = base.copy(), base_code.copy()
            deleted = thinner.thin(skel, code, flat[start:])
            current = (skel[cand_flat] != 0 if graph.gt_of_edge.size else None, len(flat) - start - deleted)
        selections.append(current)
        n_pred[k] = current[1]
    # pass 2, matching: solved once by max-flow about where the F-measure peaks (the selected candidates
    # about as many as the reachable ground truth), then warm-started towards both ends: upwards the sets
    # shrink and the matched predictions that remain stay matched, downwards they grow and the matching stays
    # valid; a few augmenting paths restore a maximum matching (_EdgeGraph.count).
    if graph.gt_of_edge.size:
        reachable_gt = len(np.unique(graph.gt_of_edge))
        sizes = [int(sel.sum()) for sel, _ in selections]
        pivot = next((i for i, size in enumerate(sizes) if size <= reachable_gt), len(sizes) - 1)
        counts: dict[int, tuple[int, tuple]] = {}
        counts[pivot] = graph.count(selections[pivot][0])
        for step in (1, -1):
            i = pivot + step
            while 0 <= i < len(selections):
                if selections[i] is selections[i - step]:
                    counts[i] = counts[i - step]
                else:
                    counts[i] = graph.count(selections[i][0], counts[i - step][1])
                i += step
        for i, k in enumerate(order_t):
            matched[k] = counts[i][0]
    return matched, n_pred


def _exit_with_parent(parent: int) -> None:
    """Edge worker initializer: the worker ends itself once the process that started it is gone (killed by
    SIGKILL or the OOM killer, the pool's own shutdown never comes; the worker would wait for jobs forever)."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _edge_image_counts(prob: np.ndarray, lab: np.ndarray, max_dist: float, thresholds: np.ndarray,
                       nms: bool) -> np.ndarray:
    """(3, len(thresholds)) int64 counts of one image (matched, predicted, ground-truth edge pixels): the work of
    :class:`EdgeMeter` per image (module level, so that worker processes can run it); prob, lab (H, W)."""
    counts = np.zeros((3, len(thresholds)), dtype=np.int64)
    valid = lab != IGNORE_INDEX
    if not valid.any():
        return counts
    ys, xs = np.nonzero(valid)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    prob, valid, gt = prob[box], valid[box], lab[box] == 1
    prob = np.where(valid, prob, 0.0)
    if nms:
        prob = edge_nms(prob)
    counts[0], counts[1] = edge_counts(prob, gt, max_dist * math.hypot(*prob.shape), thresholds)
    counts[2] = int(gt.sum())
    return counts


class EdgeMeter(Meter):
    """odsF (SEISM / BSDS conventions, Python approximation; see the module docstring); pred (B,1,H,W)
    logits (``from_logits=False``: probabilities in [0,1]), label (B,1,H,W) {0,1}, 255 ignored.
    ``max_dist``: matching tolerance as a fraction of the image diagonal (0.011 NYUD, 0.0075 PASCAL).

    ``workers`` > 0 runs the per-image work (~0.5 s of one core for a 480x640 image at 99 thresholds: 45 min
    for PASCAL-Context's 5105 validation images) in that many spawned processes: :meth:`update` returns
    once the batch's images are queued (at most 4 per worker wait), so the model's next batches run meanwhile;
    the state, :meth:`compute` included, first collects every queued image, and :meth:`compute` (or
    :meth:`close`) ends the processes; a worker ends itself when its parent dies. Each worker imports torch with
    the package (~350 MB, ~2 s to start, once per evaluation). The counts are integers summed per image:
    identical for any ``workers``."""

    def __init__(self, max_dist: float, thresholds: int | Sequence[float] = 99, nms: bool = True,
                 from_logits: bool = True, workers: int = 0):
        if isinstance(thresholds, int):
            thresholds = np.linspace(1.0 / (thresholds + 1), 1.0 - 1.0 / (thresholds + 1), thresholds)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {workers!r}")
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.max_dist, self.nms, self.from_logits, self.workers = float(max_dist), nms, from_logits, workers
        self._pool, self._queued = None, collections.deque()
        super().__init__()

    def _zero_state(self):
        n = len(self.thresholds)
        return {k: torch.zeros(n, dtype=torch.int64) for k in ("matched", "n_pred", "n_gt")}

    def _drop_queued(self) -> None:
        for future in self._queued:
            future.cancel()  # a running one finishes; its counts are dropped with the queue
        self._queued = collections.deque()

    def reset(self) -> None:
        self._drop_queued()
        super().reset()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._drop_queued()
        super().load_state_dict(state)

    def update(self, pred, label):
        _check_pair("edge", pred, label, 1, False)
        probs = (torch.sigmoid(pred.double()) if self.from_logits else pred.double()).cpu().numpy()[:, 0]
        labels = label.cpu().numpy()[:, 0]
        for prob, lab in zip(probs, labels):
            job = (prob, lab, self.max_dist, self.thresholds, self.nms)
            if not self.workers:
                self._add_counts(_edge_image_counts(*job))
                continue
            if self._pool is None:
                import concurrent.futures
                import multiprocessing

                # spawned, not forked: the parent may hold CUDA, NCCL and loader threads
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                    initargs=(os.getpid(),))
            self._queued.append(self._pool.submit(_edge_image_counts, *job))
            while len(self._queued) > 4 * self.workers:
                self._add_counts(self._queued.popleft().result())

    def _add_counts(self, counts: np.ndarray) -> None:
        self._add(matched=torch.from_numpy(counts[0]), n_pred=torch.from_numpy(counts[1]),
                  n_gt=torch.from_numpy(counts[2]))

    def _collect(self) -> None:
        while self._queued:
            self._add_counts(self._queued.popleft().result())

    def close(self) -> None:
        """Ends the worker processes, dropping the images not collected yet (a later update starts new ones).
        :meth:`compute` collects first; a failed evaluation calls this alone."""
        self._drop_queued()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(cancel_futures=True)

    def state_dict(self):
        self._collect()
        return super().state_dict()

    def merge(self, other: "Meter") -> None:
        self._collect()
        other._collect()
        super().merge(other)

    def all_reduce(self) -> None:
        self._collect()
        super().all_reduce()

    def compute(self):
        self._collect()
        self.close()
        s = {k: v.double() for k, v in self.state.items()}
        precision = s["matched"] / s["n_pred"].clamp(min=1)
        recall = s["matched"] / s["n_gt"].clamp(min=1)
        f = _f_measure(precision, recall, 1.0)
        best = int(f.argmax())
        return {"odsF": 100.0 * f[best].item(), "threshold": float(self.thresholds[best])}


class MultiTaskMetrics:
    """One meter per task: ``update(preds, batch)`` with {task: output} and a batch holding the labels,
    ``compute() -> {task: {metric: value}}``."""

    def __init__(self, meters: Mapping[str, Meter]):
        self.meters = dict(meters)

    def update(self, preds: Mapping[str, torch.Tensor], labels: Mapping) -> None:
        for task, meter in self.meters.items():
            if task not in preds:
                raise KeyError(f"preds: no prediction for task {task!r} (got {sorted(preds)})")
            if task not in labels:
                raise KeyError(f"labels: no {task!r} label in the batch")
            meter.update(preds[task].detach(), labels[task])

    def compute(self) -> dict[str, dict[str, float]]:
        return {task: meter.compute() for task, meter in self.meters.items()}

    def per_class_iou(self) -> dict[str, list[float | None]]:
        """IoU of every class in percent per segmentation task (semseg, parts), None where a class occurs in
        neither labels nor predictions (:meth:`SegmentationMeter.per_class`)."""
        return {task: [None if math.isnan(v) else 100.0 * v for v in meter.per_class().tolist()]
                for task, meter in self.meters.items() if isinstance(meter, SegmentationMeter)}

    def compute_flat(self, baseline: Mapping | str | Path | None = None) -> dict[str, float]:
        """:meth:`compute` as ``{"task/metric": value}``, plus ``delta_m`` against ``baseline`` when given."""
        results = self.compute()
        flat = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
        if baseline is not None:
            flat["delta_m"] = delta_m(results, baseline)
        return flat

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()

    def close(self) -> None:
        """Every meter's :meth:`Meter.close` (call it in a ``finally``: ends the edge meter's processes)."""
        for meter in self.meters.values():
            meter.close()

    def all_reduce(self) -> None:
        for meter in self.meters.values():
            meter.all_reduce()


def build_metrics(tasks: Sequence[str] | None, dataset: str, edge_thresholds: int | Sequence[float] = 99,
                  from_logits: bool = True, edge_workers: int = 0) -> MultiTaskMetrics:
    """Meters for ``tasks`` (None = all of the dataset's) on ``dataset`` (class counts, edge maxDist);
    ``from_logits=False``: edge and saliency predictions are probabilities; ``edge_workers``: processes for
    the edge meter's per-image work (:class:`EdgeMeter`)."""
    tasks = check_tasks(tasks, dataset)
    meters: dict[str, Meter] = {}
    for task in tasks:
        if task in ("semseg", "parts"):
            meters[task] = SegmentationMeter(num_outputs(task, dataset))
        elif task == "depth":
            meters[task] = DepthMeter()
        elif task == "normals":
            meters[task] = NormalsMeter()
        elif task == "sal":
            meters[task] = SaliencyMeter(from_logits=from_logits)
        else:
            meters[task] = EdgeMeter(edge_max_dist(dataset), thresholds=edge_thresholds, from_logits=from_logits,
                                     workers=edge_workers)
    return MultiTaskMetrics(meters)


#: Folder of the stored single-task baselines (package data), one ``<name>.yaml`` per setting.
BASELINE_DIR = Path(__file__).resolve().parent / "baselines"

#: The metrics each meter reports, per task (what a baseline file may name).
METRIC_NAMES = {"semseg": ("mIoU", "pixel_acc"), "parts": ("mIoU", "pixel_acc"), "depth": ("rmse", "abs_rel"),
                "normals": ("mean", "median", "rmse", "11.25", "22.5", "30"), "sal": ("maxF", "maxIoU", "mIoU"),
                "edge": ("odsF",)}


def list_baselines() -> list[str]:
    """Short names of the stored single-task baselines (:data:`BASELINE_DIR`), e.g.
    ``"nyud_hrnet_w18_single_task"``: ``<dataset>_<backbone>_single_task``, with ``_<paper>`` appended when the
    numbers come from another paper than MTI-Net. Each file names its source (paper, table, row)."""
    return sorted(p.stem for p in BASELINE_DIR.glob("*.yaml"))


def _baseline_path(name: str | Path) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    text = str(name)
    if "/" not in text and "\\" not in text:  # a short name: a stored baseline
        stored = BASELINE_DIR / (text if text.endswith((".yaml", ".json")) else text + ".yaml")
        if stored.is_file():
            return stored
        raise FileNotFoundError(f"baseline file not found: {text!r} is neither a file nor a stored baseline; "
                                f"stored: {', '.join(list_baselines())}")
    raise FileNotFoundError(f"baseline file not found: {path}")


def load_baseline(path: str | Path, dataset: str | None = None) -> dict[str, dict[str, float]]:
    """A single-task baseline: a file path, or the short name of a stored one (:func:`list_baselines`).
    JSON (``.json``) or YAML: ``{task: {metric: value}}``, optionally under a top-level ``"metrics"`` key
    (other top-level keys, e.g. a description or the source, are then ignored). Metric names are those the
    meters report (:data:`METRIC_NAMES`); values are non-zero numbers. With ``dataset``, a file that declares
    another ``dataset`` (every stored one does) is refused."""
    path = _baseline_path(path)
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"cannot parse baseline file {path}: {exc}") from exc
    if isinstance(data, dict) and "metrics" in data:
        declared, wanted = data.get("dataset"), None if dataset is None else canonical_dataset(dataset)
        if wanted is not None and declared is not None and canonical_dataset(declared) != wanted:
            raise ValueError(f"baseline {str(path)!r} holds {declared} results, not {dataset}; pick one of "
                             f"{', '.join(n for n in list_baselines() if n.startswith(wanted + '_'))} or a file")
        data = data["metrics"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"baseline file {path}: expected {{task: {{metric: value}}}}")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in data.items():
        if task not in TASK_INFO:
            raise ValueError(f"baseline file {path}: unknown task {task!r}")
        out[task] = {}
        for name, value in metrics.items():
            name = str(name)  # YAML reads a key 11.25 as a number
            if name not in METRIC_NAMES[task]:
                raise ValueError(f"baseline file {path}: {task} has no metric {name!r}; "
                                 f"its metrics: {', '.join(METRIC_NAMES[task])}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
                raise ValueError(f"baseline file {path}: {task}.{name} must be a non-zero number, got {value!r}")
            out[task][name] = float(value)
    return out


def delta_m(results: Mapping[str, Mapping[str, float]], baseline: Mapping | str | Path) -> float:
    """Δm in percent: ``100 · mean_t mean_{m ∈ baseline[t]} (−1)^{l_m} (M_m − B_m) / B_m`` over the
    tasks of the baseline, l_m = 1 for lower-is-better metrics (:data:`LOWER_IS_BETTER`). With one metric
    per task (the usual file) this is MTI-Net's Δm. ``baseline``: a mapping, a file or the short name of a
    stored baseline (:func:`load_baseline`). A task or metric of the baseline that ``results`` lacks is an
    error."""
    if not isinstance(baseline, Mapping):
        baseline = load_baseline(baseline)
    per_task = []
    for task, metrics in baseline.items():
        if task not in results:
            raise KeyError(f"delta_m: the results have no task {task!r} (baseline tasks: {sorted(baseline)})")
        terms = []
        for name, base in metrics.items():
            if name not in results[task]:
                raise KeyError(f"delta_m: the results have no {task}.{name} (have {sorted(results[task])})")
            sign = -1.0 if name in LOWER_IS_BETTER else 1.0
            terms.append(sign * (results[task][name] - base) / base)
        per_task.append(sum(terms) / len(terms))
    if not per_task:
        raise ValueError("delta_m: the baseline lists no task")
    return 100.0 * sum(per_task) / len(per_task)
