"""Task and dataset registry: task names, output channels, label conventions, which tasks each dataset has.

Tasks: ``semseg`` (semantic segmentation), ``depth``, ``normals`` (surface normals), ``edge`` (boundary
detection), ``parts`` (human part segmentation), ``sal`` (saliency).

Label conventions (every dataset returns these, see :mod:`mtlfast.data` for the sample format):

=========  =========================  =============================================================
task       label tensor               invalid / ignored pixels
=========  =========================  =============================================================
semseg     int64 (H, W), 0..C-1       255
parts      int64 (H, W), 0..6         255 (0 = background, 1..6 = head, torso, upper arms,
                                      lower arms + hands, upper legs, lower legs + feet)
depth      float32 (1, H, W), metres  0 (a valid depth is finite and > 0)
normals    float32 (3, H, W), unit    the zero vector (a valid normal has norm 1)
edge       float32 (1, H, W), {0, 1}  255
sal        float32 (1, H, W), {0, 1}  255
=========  =========================  =============================================================

Normals are in the camera frame with x to the right and y down the image, z into the scene; a
horizontal flip of the image negates x.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASKS", "DATASETS", "TaskInfo", "TASK_INFO", "IGNORE_INDEX", "LOSS_WEIGHTS",
           "canonical_dataset", "dataset_tasks", "num_outputs", "check_tasks", "edge_max_dist"]

TASKS = ("semseg", "depth", "normals", "edge", "parts", "sal")

#: Ignore value of the class-index and binary labels.
IGNORE_INDEX = 255


@dataclass(frozen=True)
class TaskInfo:
    """How a task's label is stored and resampled.

    ``kind``: "classes" (int64 (H,W) class indices), "binary" (float32 (1,H,W) in {0,1}), "depth",
    "normals". ``pad``: the value written where a label is padded or cropped outside the image (it is the
    task's invalid value). ``primary``: the metric Δm uses by default
    (its direction: :data:`mtlfast.metrics.LOWER_IS_BETTER`).
    """

    name: str
    kind: str
    pad: float
    primary: str


TASK_INFO = {
    "semseg": TaskInfo("semseg", "classes", IGNORE_INDEX, "mIoU"),
    "parts": TaskInfo("parts", "classes", IGNORE_INDEX, "mIoU"),
    "depth": TaskInfo("depth", "depth", 0.0, "rmse"),
    "normals": TaskInfo("normals", "normals", 0.0, "mean"),
    "edge": TaskInfo("edge", "binary", IGNORE_INDEX, "odsF"),
    "sal": TaskInfo("sal", "binary", IGNORE_INDEX, "maxF"),
}

#: Standard loss weights (DESIGN.md §5; MTI-Net / InvPT setups).
LOSS_WEIGHTS = {"semseg": 1.0, "parts": 2.0, "sal": 5.0, "normals": 10.0, "depth": 1.0, "edge": 50.0}

# dataset -> (tasks it has, semseg classes, edge maxDist as a fraction of the image diagonal)
_DATASETS = {
    "nyud": (("semseg", "depth", "normals", "edge"), 40, 0.011),
    "pascal": (("semseg", "parts", "sal", "normals", "edge"), 21, 0.0075),
    "synthetic": (TASKS, 6, 0.011),
}
DATASETS = tuple(_DATASETS)
_ALIASES = {"nyudv2": "nyud", "nyud-v2": "nyud", "nyud_v2": "nyud", "pascalcontext": "pascal",
            "pascal_context": "pascal", "pascal-context": "pascal"}
_PARTS_CLASSES = 7


def canonical_dataset(name: str) -> str:
    """``"nyud" | "pascal" | "synthetic"`` for a dataset name or alias (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset: expected a name, one of {', '.join(DATASETS)}; got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _DATASETS:
        raise ValueError(f"dataset: unknown dataset {name!r}; valid choices: {', '.join(DATASETS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def dataset_tasks(dataset: str) -> tuple[str, ...]:
    """The tasks ``dataset`` has labels for."""
    return _DATASETS[canonical_dataset(dataset)][0]


def check_tasks(tasks, dataset: str) -> tuple[str, ...]:
    """``tasks`` (None = all of the dataset's) validated against the dataset, as a tuple without duplicates."""
    available = dataset_tasks(dataset)
    if tasks is None:
        return available
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks: expected at least one task; {canonical_dataset(dataset)} has {', '.join(available)}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"tasks: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        if task not in available:
            raise ValueError(f"tasks: dataset {canonical_dataset(dataset)} has no {task!r} labels; "
                             f"it has {', '.join(available)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: duplicate task in {list(tasks)}")
    return tasks


def num_outputs(task: str, dataset: str) -> int:
    """Output channels of a model head for ``task`` on ``dataset`` (semseg 40 NYUD / 21 PASCAL / 6 synthetic,
    parts 7, depth 1, normals 3, edge 1, sal 1)."""
    check_tasks([task], dataset)
    if task == "semseg":
        return _DATASETS[canonical_dataset(dataset)][1]
    return {"parts": _PARTS_CLASSES, "depth": 1, "normals": 3, "edge": 1, "sal": 1}[task]


def edge_max_dist(dataset: str) -> float:
    """Edge-matching tolerance of odsF as a fraction of the image diagonal (SEISM: 0.011 NYUD, 0.0075 PASCAL)."""
    return _DATASETS[canonical_dataset(dataset)][2]
