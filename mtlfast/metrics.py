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
import numbers
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtlfast.data.tasks import (IGNORE_INDEX, TASK_INFO, canonical_dataset, check_tasks, edge_max_dist,
                                num_outputs)
from mtlfast.edge_eval import edge_counts, edge_image_counts, edge_nms, exit_with_parent, match_edges, thin

__all__ = ["Meter", "SegmentationMeter", "DepthMeter", "NormalsMeter", "SaliencyMeter", "EdgeMeter",
           "MultiTaskMetrics", "build_metrics", "delta_m", "load_baseline", "list_baselines", "edge_nms",
           "match_edges", "edge_counts", "thin", "edge_thresholds", "LOWER_IS_BETTER"]

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


def edge_thresholds(value: int | Sequence[float], key: str = "thresholds") -> np.ndarray:
    """The odsF thresholds of ``value``: a count n >= 1 (n evenly spaced in (0, 1): 99 gives SEISM's 0.01 ...
    0.99) or a list of thresholds in (0, 1). Anything else (0 or an empty list left argmax nothing to pick; true
    counted as 1) raises naming ``key``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return np.linspace(1.0 / (value + 1), 1.0 - 1.0 / (value + 1), int(value))
    if (isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
            and all(isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 < t < 1 for t in value)):
        return np.asarray(value, dtype=np.float64)
    raise ValueError(f"{key}: expected a number of thresholds >= 1 or a list of thresholds in (0, 1), got {value!r}")


class EdgeMeter(Meter):
    """odsF (SEISM / BSDS conventions, Python approximation; see the module docstring); pred (B,1,H,W)
    logits (``from_logits=False``: probabilities in [0,1]), label (B,1,H,W) {0,1}, 255 ignored.
    ``max_dist``: matching tolerance as a fraction of the image diagonal (0.011 NYUD, 0.0075 PASCAL).

    ``workers`` > 0 runs the per-image work (~0.5 s of one core for a 480x640 image at 99 thresholds: 45 min
    for PASCAL-Context's 5105 validation images) in that many spawned processes: :meth:`update` returns
    once the batch's images are queued (at most 4 per worker wait), so the model's next batches run meanwhile;
    the state, :meth:`compute` included, first collects every queued image, and :meth:`compute` (or
    :meth:`close`) ends the processes; a worker ends itself when its parent dies. A worker imports
    :mod:`mtlfast.edge_eval` alone (numpy and scipy, no torch: ~70 MB resident, started in under a second)
    under the ``mtlfast`` command; spawning also re-runs a user's own main script in each worker, with whatever
    that imports at its top. The counts are integers summed per image: identical for any ``workers``."""

    def __init__(self, max_dist: float, thresholds: int | Sequence[float] = 99, nms: bool = True,
                 from_logits: bool = True, workers: int = 0):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {workers!r}")
        self.thresholds = edge_thresholds(thresholds)
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
            job = (prob, lab, self.max_dist, self.thresholds, self.nms, IGNORE_INDEX)
            if not self.workers:
                self._add_counts(edge_image_counts(*job))
                continue
            if self._pool is None:
                import concurrent.futures
                import multiprocessing

                # spawned, not forked: the parent may hold CUDA, NCCL and loader threads
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                    initargs=(os.getpid(),))
            self._queued.append(self._pool.submit(edge_image_counts, *job))
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
