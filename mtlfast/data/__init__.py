"""Datasets for multi-task dense prediction: ``synthetic`` (default, no download), ``nyud``, ``pascal``.

Sample format (what ``dataset[i]`` returns and models/trainer rely on)::

    {"image":   float32 (3, H, W), normalised with the ImageNet mean/std,
     "meta":    {"dataset": str, "name": image id, "index": int, "size": (H0, W0) of the original image,
                 plus "scale"/"flipped"/"crop" when augmentations ran},
     "semseg":  int64 (H, W), classes 0..C-1, 255 = ignore,
     "parts":   int64 (H, W), 0 background + 6 parts, 255 = ignore,
     "depth":   float32 (1, H, W), metres, 0 = invalid,
     "normals": float32 (3, H, W), unit vectors (camera frame: x right, y down), zero vector = invalid,
     "edge":    float32 (1, H, W), {0, 1}, 255 = ignore,
     "sal":     float32 (1, H, W), {0, 1}, 255 = ignore}

with only the requested tasks present. Training samples are augmented and cropped to ``size``
(:func:`mtlfast.data.transforms.train_transform`); evaluation samples keep the original resolution and
are padded at the bottom/right (to ``size``, or to a multiple of 32 when size is None), so
``pred[..., :H0, :W0]`` with ``meta["size"]`` recovers the original frame. Use
:func:`mtlfast.data.transforms.collate` as the DataLoader ``collate_fn``: it pads a batch to a common
size and keeps ``meta`` as a list of dicts. Padded label pixels carry the invalid values above, so losses
and metrics ignore them.
"""
from __future__ import annotations

from mtlfast.data.base import DataError, MultiTaskDataset
from mtlfast.data.tasks import (DATASETS, LOSS_WEIGHTS, TASK_INFO, TASKS, canonical_dataset, check_tasks,
                                dataset_tasks, edge_max_dist, num_outputs)
from mtlfast.data.transforms import collate, train_transform, val_transform

__all__ = ["TASKS", "DATASETS", "TASK_INFO", "LOSS_WEIGHTS", "DataError", "MultiTaskDataset", "build_dataset",
           "canonical_dataset", "check_tasks", "dataset_tasks", "num_outputs", "edge_max_dist", "collate",
           "train_transform", "val_transform", "DEFAULT_CROP", "EVAL_PAD"]

#: Training crop size per dataset (DESIGN.md §5); synthetic: the rendered size.
DEFAULT_CROP = {"nyud": (448, 576), "pascal": (512, 512), "synthetic": (64, 64)}
#: Evaluation pad size where a dataset's images differ in size: PASCAL-Context's (at most 500x500) are each
#: padded to 512x512, as InvPT and ATRC evaluate. Padding to a multiple of 32 alone would let :func:`collate` pad
#: each batch to its largest image, and models with global context (attention, EM bases) give other
#: predictions with other padding: results would depend on eval.batch_size and on which images share a batch.
#: NYUD-v2's images are all 480x640 (a multiple of 32).
EVAL_PAD = {"pascal": (512, 512)}


def build_dataset(name: str, root=None, split: str = "train", tasks=None, size=None, augment: bool | None = None,
                  **kwargs) -> MultiTaskDataset:
    """The dataset ``name`` ("synthetic", "nyud", "pascal"; aliases accepted) for ``split`` with ``tasks``
    (None = every task it has).

    ``augment`` (default: split == "train") selects the training transform (random scale 0.5-2, flip,
    photometric distortion, normalise, random crop to ``size``, default :data:`DEFAULT_CROP`) or the
    evaluation one (normalise, pad to ``size`` or, when None, to :data:`EVAL_PAD` or else a multiple of 32). ``root``: the folder
    holding ``NYUDv2/`` / ``PASCALContext/`` (or the public archives' ``NYUD_MT/`` / ``PASCAL_MT/``; or that folder
    itself; default $MTLFAST_DATA).
    ``synthetic`` needs no root; its images are rendered at ``size`` (default 64x64; the training crop has
    the same size, evaluation pads to a multiple of 32), and it takes ``length`` (default 1000 train /
    200 val) and ``seed`` keyword arguments.
    """
    dataset = canonical_dataset(name)
    augment = split == "train" if augment is None else augment
    if dataset == "synthetic":
        from mtlfast.data.synthetic import SyntheticDataset

        render = size if size is not None else DEFAULT_CROP["synthetic"]
        transform = train_transform(render) if augment else val_transform()
        return SyntheticDataset(split=split, tasks=tasks, size=render, transform=transform, **kwargs)
    if kwargs:
        raise TypeError(f"build_dataset: unexpected arguments for {dataset}: {', '.join(kwargs)}")
    transform = (train_transform(size or DEFAULT_CROP[dataset]) if augment
                 else val_transform(size or EVAL_PAD.get(dataset)))
    if dataset == "nyud":
        from mtlfast.data.nyud import NYUDv2

        return NYUDv2(root=root, split=split, tasks=tasks, transform=transform)
    from mtlfast.data.pascal import PASCALContext

    return PASCALContext(root=root, split=split, tasks=tasks, transform=transform)
