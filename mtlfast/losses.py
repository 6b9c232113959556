"""Task losses with the standard weights, and :class:`MultiTaskLoss` with deep supervision (DESIGN.md §5).

Predictions are raw model outputs (B, C, H, W): logits for semseg/parts/edge/sal, values for depth and
normals. Labels follow :mod:`mtlfast.data` (semseg/parts int64 (B,H,W); the others (B,C,H,W)).
Every loss is a mean over the valid (not ignored) label entries of the whole batch and is 0 (with a
gradient of 0) when there is none; float16/bfloat16 predictions are scored in float32.

Normalisers: what a loss divides by (its valid entries, and saliency's negatives, which set its class balance)
is a function of the labels alone, :func:`normaliser`. Each loss takes them from its own batch unless given
(``count=`` / ``negatives=``, :class:`MultiTaskLoss`'s ``normalised_by=``): the losses of micro-batches normalised
by the sum of their normalisers (:meth:`MultiTaskLoss.normalisers`) add up to the loss of their whole batch,
which is how gradient accumulation and DDP (normalisers all-reduced) reproduce the gradient of one large batch.

=========  ===========================================================================  ======
task       loss                                                                         weight
=========  ===========================================================================  ======
semseg     cross-entropy, ignore 255                                                    1
parts      cross-entropy, ignore 255                                                    2
sal        balanced BCE: w = (#negatives / #valid) of the batch's labels                 5
normals    L1 between the l2-normalised prediction and the label, zero-vector labels     10
           masked, mean over the valid entries (3 per valid pixel)
depth      L1, labels that are not finite and > 0 masked                                1
edge       balanced BCE with fixed positive weight w = 0.95                              50
=========  ===========================================================================  ======

Balanced BCE (edge, sal), with x the logit, y in {0,1}, 255 ignored:
``L = [w Σ_{y=1} -log σ(x) + (1 - w) Σ_{y=0} -log(1 - σ(x))] / #valid``. The public MTI-Net code divides
by all label entries, ignored ones included; dividing by the valid ones keeps the loss scale independent
of crop padding (the two agree when nothing is padded).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlfast.data.tasks import IGNORE_INDEX, LOSS_WEIGHTS, TASKS

__all__ = ["cross_entropy_loss", "balanced_bce_loss", "normals_loss", "depth_loss", "task_loss", "MultiTaskLoss",
           "LOSS_WEIGHTS", "EDGE_POS_WEIGHT", "BINARY_TASKS", "check_binary_labels", "normaliser"]

EDGE_POS_WEIGHT = 0.95


def _wide(pred: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 predictions (autocast) are scored in float32: sums over a batch need the bits."""
    return pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1).to(total.dtype)


# What each loss divides by, in one place: the losses' own batch and normaliser() count alike.

def _class_count(label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return (label != ignore_index).sum()


def _binary_counts(label: torch.Tensor) -> dict[str, torch.Tensor]:
    negatives = (label == 0).sum()
    return {"count": (label == 1).sum() + negatives, "negatives": negatives}


def _valid_normals(label: torch.Tensor) -> torch.Tensor:
    return (label != 0).any(dim=1, keepdim=True)  # a zero vector marks an invalid pixel


def _normals_count(valid: torch.Tensor, reduction: str) -> torch.Tensor:
    return valid.sum() * (3 if reduction == "element" else 1)


def _valid_depth(label: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(label) & (label > 0)


def _check(task: str, pred: torch.Tensor, label: torch.Tensor, channels: int | None, class_label: bool) -> None:
    if pred.dim() != 4:
        raise ValueError(f"{task}: expected a prediction of shape (B, C, H, W), got {tuple(pred.shape)}")
    if channels is not None and pred.shape[1] != channels:
        raise ValueError(f"{task}: expected {channels} prediction channel(s), got shape {tuple(pred.shape)}")
    expected = (pred.shape[0], *pred.shape[2:]) if class_label else (pred.shape[0], channels, *pred.shape[2:])
    if tuple(label.shape) != tuple(expected):
        raise ValueError(f"{task}: label of shape {tuple(label.shape)} does not fit prediction {tuple(pred.shape)} "
                         f"(expected {tuple(expected)})")


def cross_entropy_loss(pred: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                       count: torch.Tensor | None = None) -> torch.Tensor:
    """pred (B,C,H,W) logits, label (B,H,W) int64; mean over pixels whose label is not ``ignore_index`` (their
    number, or ``count``)."""
    _check("cross-entropy", pred, label, None, True)
    total = F.cross_entropy(_wide(pred), label, ignore_index=ignore_index, reduction="sum")
    return _mean(total, _class_count(label, ignore_index) if count is None else count)


def check_binary_labels(labels: Mapping[str, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> None:
    """Every label of ``labels`` ({name: tensor}) holds only 0, 1 and ``ignore_index``: a soft or 0/255-scaled map
    is an error naming it, not entries silently left out of the balanced BCE. One device sync for all of them
    (:class:`MultiTaskLoss` checks a batch's labels once, not per deep-supervision stage)."""
    others = {name: ~((label == 0) | (label == 1) | (label == ignore_index)) for name, label in labels.items()}
    if not others or not torch.stack([other.any() for other in others.values()]).any():
        return
    name, other = next((name, other) for name, other in others.items() if other.any())
    raise ValueError(f"{name}: label values must be 0, 1 or {ignore_index} (ignored); got e.g. "
                     f"{sorted(set(labels[name][other][:8].tolist()))}")


def balanced_bce_loss(pred: torch.Tensor, label: torch.Tensor, pos_weight: float | None = None,
                      ignore_index: int = IGNORE_INDEX, check_labels: bool = True, count: torch.Tensor | None = None,
                      negatives: torch.Tensor | None = None) -> torch.Tensor:
    """pred (B,1,H,W) logits, label (B,1,H,W) in {0,1} (``ignore_index`` ignored; any other value is an error,
    :func:`check_binary_labels`, unless ``check_labels=False`` says the caller checked); positive weight
    ``pos_weight`` or, when None, the fraction of negative labels (a constant, no gradient): the batch's, or
    ``negatives`` / ``count`` (both then given); divided by the valid labels (their number, or ``count``)."""
    _check("balanced BCE", pred, label, 1, False)
    if check_labels:
        check_binary_labels({"balanced BCE": label}, ignore_index)
    if pos_weight is None and (count is None) != (negatives is None):
        raise ValueError("balanced BCE: count= and negatives= go together without pos_weight (the class-balance "
                         "weight is negatives / count of one batch)")
    pred = _wide(pred)
    pos = label == 1
    neg = label == 0
    norm = _binary_counts(label) if count is None else {"count": count, "negatives": negatives}
    n_valid = norm["count"]
    if pos_weight is None:
        w = norm["negatives"].to(pred.dtype) / n_valid.clamp(min=1).to(pred.dtype)
    else:
        w = torch.tensor(pos_weight, dtype=pred.dtype, device=pred.device)
    x = pred
    loss_pos = torch.where(pos, F.softplus(-x), torch.zeros_like(x)).sum()   # -log σ(x)
    loss_neg = torch.where(neg, F.softplus(x), torch.zeros_like(x)).sum()    # -log(1 - σ(x))
    return _mean(w * loss_pos + (1 - w) * loss_neg, n_valid)


NORMALS_REDUCTIONS = ("element", "pixel")


def normals_loss(pred: torch.Tensor, label: torch.Tensor, reduction: str = "element",
                 count: torch.Tensor | None = None) -> torch.Tensor:
    """pred (B,3,H,W) unnormalised, label (B,3,H,W) unit vectors, zero vector = invalid; the L1 distance
    |pred/‖pred‖ − label| summed over the valid pixels' 3 components and divided by the number of valid
    entries (``reduction="element"``: 3 per pixel, the MTI-Net / PAD-Net code) or of valid pixels
    (``"pixel"``: 3 times larger, the InvPT / ATRC code, whose methods keep the weight 10), or by ``count``."""
    _check("normals", pred, label, 3, False)
    if reduction not in NORMALS_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(NORMALS_REDUCTIONS)}, got {reduction!r}")
    pred = _wide(pred)
    valid = _valid_normals(label)
    diff = (F.normalize(pred, dim=1) - label).abs()
    if count is None:
        count = _normals_count(valid, reduction)
    return _mean(torch.where(valid, diff, torch.zeros_like(diff)).sum(), count)


def depth_loss(pred: torch.Tensor, label: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """pred, label (B,1,H,W) metres; mean |pred − label| over labels that are finite and > 0 (their number, or
    ``count``)."""
    _check("depth", pred, label, 1, False)
    pred = _wide(pred)
    valid = _valid_depth(label)
    safe = torch.where(valid, label, torch.zeros_like(label))  # NaN labels must not reach the backward pass
    diff = (pred - safe).abs()
    return _mean(torch.where(valid, diff, torch.zeros_like(diff)).sum(), valid.sum() if count is None else count)


#: Tasks scored with the balanced BCE, whose labels are 0/1 maps.
BINARY_TASKS = ("edge", "sal")


def normaliser(task: str, label: torch.Tensor, normals_reduction: str = "element") -> dict[str, torch.Tensor]:
    """What the loss of ``task`` divides by on ``label``'s batch: {"count": valid entries} (normals: 3 per valid
    pixel for ``normals_reduction="element"``), plus {"negatives": negative labels} for saliency, whose balance
    weight is their share. Sums over micro-batches give their whole batch's (module docstring)."""
    if task in ("semseg", "parts"):
        return {"count": _class_count(label)}
    if task == "sal":
        return _binary_counts(label)
    if task == "edge":  # a fixed positive weight
        return {"count": _binary_counts(label)["count"]}
    if task == "normals":
        return {"count": _normals_count(_valid_normals(label), normals_reduction)}
    if task == "depth":
        return {"count": _valid_depth(label).sum()}
    raise ValueError(f"task: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def task_loss(task: str, pred: torch.Tensor, label: torch.Tensor, normals_reduction: str = "element",
              check_labels: bool = True, normalised_by: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The (unweighted) standard loss of ``task`` (``normals_reduction``: see :func:`normals_loss`;
    ``check_labels``: see :func:`balanced_bce_loss`), divided by the batch's own :func:`normaliser` or by
    ``normalised_by`` (one of its results, e.g. summed over micro-batches)."""
    norm = dict(normalised_by or {})
    if task in ("semseg", "parts"):
        return cross_entropy_loss(pred, label, **norm)
    if task == "sal":
        return balanced_bce_loss(pred, label, check_labels=check_labels, **norm)
    if task == "edge":
        return balanced_bce_loss(pred, label, pos_weight=EDGE_POS_WEIGHT, check_labels=check_labels, **norm)
    if task == "normals":
        return normals_loss(pred, label, normals_reduction, **norm)
    if task == "depth":
        return depth_loss(pred, label, **norm)
    raise ValueError(f"task: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses of the final predictions and of deep-supervision outputs.

    ``forward(preds, labels, aux=None, normalised_by=None) -> (total, losses)``:

    - ``preds``: {task: (B, C, H, W)} at label resolution, one per task in ``tasks``;
    - ``labels``: a batch from :mod:`mtlfast.data` ({task: label, ...}; other keys are ignored);
    - ``aux``: optional deep supervision {stage_name: {task: (B, C, h, w)}} (any subset of ``tasks`` per
      stage, any resolution): each output is resized bilinearly (align_corners=False) to the label size
      and scored with the same task loss;
    - ``total = Σ_t w_t L_t(preds[t]) + Σ_s λ_s Σ_t w_t L_t(up(aux[s][t]))`` with w_t = ``weights``
      (default :data:`LOSS_WEIGHTS`) and λ_s = ``stage_weights[s]`` (default 1 for every stage: MTI-Net
      weighs its initial predictions like the final ones);
    - ``losses``: the unweighted losses, keys ``task`` and ``"stage/task"``, still attached to the graph;
    - ``normalised_by``: {task: normaliser} for every task, e.g. :meth:`normalisers` of the micro-batches of one
      step (each then yields its share of their whole batch's loss), else each term's own batch's.

    ``aux_tasks``: auxiliary tasks (MTI-Net / PAD-Net / TPIM ``aux_tasks``, e.g. edge + normals on NYUD as in
    MTI-Net's Table S1), predicted in the front-end only: they have no final prediction and are scored
    wherever they appear in ``aux``, with the same terms as the main tasks' deep supervision, i.e. weight
    λ_s · w_t with w_t the task's standard weight (``weights`` may override it), as in the public MTI-Net /
    PAD-Net code, whose deep-supervision terms take ``loss_weights[task]`` for every front-end task,
    auxiliary or not. Their labels must be in the batch.

    ``normals_reduction``: "element" or "pixel" (:func:`normals_loss`); :meth:`for_model` takes a model's.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None,
                 stage_weights: Mapping[str, float] | None = None, aux_tasks: Sequence[str] = (),
                 normals_reduction: str = "element"):
        super().__init__()
        if normals_reduction not in NORMALS_REDUCTIONS:
            raise ValueError(f"normals_reduction: expected one of {', '.join(NORMALS_REDUCTIONS)}, "
                             f"got {normals_reduction!r}")
        self.normals_reduction = normals_reduction
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        aux_tasks = [aux_tasks] if isinstance(aux_tasks, str) else list(aux_tasks or ())
        for task in tasks + aux_tasks:
            if task not in TASKS:
                raise ValueError(f"tasks: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        overlap = [t for t in aux_tasks if t in tasks]
        if overlap:
            raise ValueError(f"aux_tasks: {overlap} are already main tasks {tasks}")
        for task in weights or {}:
            if task not in tasks + aux_tasks:
                raise ValueError(f"weights: {task!r} is not one of the tasks {tasks + aux_tasks}")
        self.tasks = tuple(tasks)
        self.aux_tasks = tuple(aux_tasks)
        self.weights = {t: float((weights or {}).get(t, LOSS_WEIGHTS[t])) for t in self.tasks + self.aux_tasks}
        self.stage_weights = dict(stage_weights or {})

    @classmethod
    def for_model(cls, model: nn.Module, aux_tasks: Sequence[str] | None = None) -> "MultiTaskLoss":
        """The loss a model trains with: its tasks, its auxiliary tasks (``model.aux_tasks`` unless
        ``aux_tasks`` is given) and its normals reduction (``normals_loss_reduction``), see
        :mod:`mtlfast.models.base`; every deep-supervision stage weighs 1, as in every method's code."""
        if aux_tasks is None:
            aux_tasks = getattr(model, "aux_tasks", ())
        return cls(model.tasks, aux_tasks=aux_tasks, normals_reduction=model.normals_loss_reduction)

    def normalisers(self, label_batches: Sequence[Mapping]) -> dict[str, dict[str, torch.Tensor]]:
        """{task: :func:`normaliser` summed over ``label_batches``} for the loss's tasks (and auxiliary tasks):
        passed as ``normalised_by`` to the forward of each of those batches, their losses add up to the loss of
        all of them as one batch (deep-supervision terms are scored at label resolution: the same counts)."""
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for labels in label_batches:
            for task in self.weights:
                if task not in labels:
                    raise KeyError(f"labels: no {task!r} label in the batch (keys: {sorted(k for k in labels)})")
                counts = sums.setdefault(task, {})
                for key, value in normaliser(task, labels[task], self.normals_reduction).items():
                    counts[key] = counts[key] + value if key in counts else value
        return sums

    def _term(self, task: str, pred: torch.Tensor, labels: Mapping, where: str,
              normalised_by: Mapping | None) -> torch.Tensor:
        if task not in self.weights:
            raise KeyError(f"{where}: task {task!r} is not one of the loss's tasks {list(self.tasks)}"
                           + (f" or auxiliary tasks {list(self.aux_tasks)}" if self.aux_tasks else ""))
        if task not in labels:
            raise KeyError(f"labels: no {task!r} label in the batch (keys: {sorted(k for k in labels)})")
        label = labels[task]
        if pred.dim() == 4 and tuple(pred.shape[-2:]) != tuple(label.shape[-2:]):
            if where == "preds":
                raise ValueError(f"preds[{task!r}]: size {tuple(pred.shape[-2:])} differs from the label's "
                                 f"{tuple(label.shape[-2:])}; final predictions must be at label resolution")
            pred = F.interpolate(pred, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
        if normalised_by is not None and task not in normalised_by:
            raise KeyError(f"normalised_by: no normaliser for task {task!r} (got {sorted(normalised_by)})")
        norm = None if normalised_by is None else normalised_by[task]
        return task_loss(task, pred, label, self.normals_reduction, check_labels=False, normalised_by=norm)

    def forward(self, preds: Mapping[str, torch.Tensor], labels: Mapping, aux: Mapping | None = None,
                normalised_by: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
        check_binary_labels({task: labels[task] for task in self.weights if task in BINARY_TASKS and task in labels})
        losses: dict[str, torch.Tensor] = {}
        total = None
        for task in self.tasks:
            if task not in preds:
                raise KeyError(f"preds: no prediction for task {task!r} (got {sorted(preds)})")
            losses[task] = self._term(task, preds[task], labels, "preds", normalised_by)
            term = self.weights[task] * losses[task]
            total = term if total is None else total + term
        for stage, outputs in (aux or {}).items():
            lam = float(self.stage_weights.get(stage, 1.0))
            for task, pred in outputs.items():
                loss = self._term(task, pred, labels, f"aux[{stage!r}]", normalised_by)
                losses[f"{stage}/{task}"] = loss
                total = total + lam * self.weights[task] * loss
        return total, losses
