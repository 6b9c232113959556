"""``mtlfast data``: every sample of a dataset's splits decoded once, as training and evaluation read them (the
raw labels, before augmentation), with what they hold and every file that fails, so that a bad folder shows
before a long run meets it at iteration 30 000. Reads only: nothing is written into the dataset root.

Per split: images, their sizes, and per task the share of valid label pixels and the label's content — class
pixel shares and the classes never seen (semseg, parts; a dataset whose labels were saved with the wrong
palette or offset shows here), depth's range and mean in metres, the positive share of edge and saliency
maps. A sample whose files fail to decode (:class:`mtlfast.data.DataError`: missing, corrupt, wrong size,
out-of-range values) is listed with its error; the others are still read.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from mtlfast.data.tasks import TASK_INFO, num_outputs

__all__ = ["check_split", "format_report"]


def _sample_stats(sample: dict, tasks: Sequence[str], dataset: str) -> dict:
    """What one raw sample (:func:`mtlfast.data.base.to_sample`) holds, in sums that add over samples."""
    height, width = sample["image"].shape[-2:]
    stats: dict = {"size": (int(height), int(width)), "tasks": {}}
    for task in tasks:
        label, kind = sample[task], TASK_INFO[task].kind
        if kind == "classes":
            valid = label != TASK_INFO[task].pad
            counts = torch.bincount(label[valid].flatten(), minlength=num_outputs(task, dataset))
            entry = {"pixels": label.numel(), "valid": int(valid.sum()), "classes": counts.tolist()}
        elif kind == "depth":
            valid = label > 0
            values = label[valid].double()
            entry = {"pixels": label.numel(), "valid": int(valid.sum()), "sum": float(values.sum()),
                     "min": float(values.min()) if values.numel() else math.inf,
                     "max": float(values.max()) if values.numel() else -math.inf}
        elif kind == "normals":
            entry = {"pixels": label[0].numel(), "valid": int((label.abs().sum(0) > 0).sum())}
        else:  # binary: {0, 1}, 255 = ignore
            valid = label != TASK_INFO[task].pad
            entry = {"pixels": label.numel(), "valid": int(valid.sum()), "positive": int((label[valid] > 0.5).sum())}
        stats["tasks"][task] = entry
    return stats


class _Checked(torch.utils.data.Dataset):
    """Each item: (index, the sample's stats or None, its error text or None), so that one pass lists them all."""

    def __init__(self, dataset, dataset_name: str):
        self.dataset, self.dataset_name = dataset, dataset_name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, _sample_stats(self.dataset.load(index), self.dataset.tasks, self.dataset_name), None
        except Exception as exc:  # noqa: BLE001  (reported per sample: the check goes on)
            return index, None, f"{type(exc).__name__}: {exc}"


def check_split(dataset, dataset_name: str, workers: int = 0, limit: int | None = None) -> dict:
    """Decodes the first ``limit`` (default all) samples of ``dataset`` (a :class:`mtlfast.data.MultiTaskDataset`)
    in ``workers`` loader processes and returns the report of this module's docstring (a JSON-able dict)."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_Checked(dataset, dataset_name), range(count)),
                                         batch_size=None, num_workers=workers)
    ids = getattr(dataset, "ids", None)
    sizes, errors, totals = set(), [], {}
    for index, stats, error in loader:
        if error is not None:
            errors.append(f"{ids[index] if ids else index}: {error}")
            continue
        sizes.add(tuple(stats["size"]))  # the loader hands tuples back as lists
        for task, entry in stats["tasks"].items():
            total = totals.setdefault(task, {})
            for key, value in entry.items():
                if key == "classes":
                    total[key] = [a + b for a, b in zip(total.get(key, [0] * len(value)), value)]
                elif key in ("min", "max"):
                    total[key] = (min if key == "min" else max)(total.get(key, value), value)
                else:
                    total[key] = total.get(key, 0) + value
    tasks = {}
    for task, total in totals.items():
        entry = {"valid_share": total["valid"] / total["pixels"] if total["pixels"] else 0.0}
        if "classes" in total:
            valid = max(total["valid"], 1)
            entry["class_shares"] = [c / valid for c in total["classes"]]
            entry["classes_never_seen"] = [c for c, n in enumerate(total["classes"]) if n == 0]
        if "sum" in total and total["valid"]:
            entry.update(min=total["min"], max=total["max"], mean=total["sum"] / total["valid"])
        if "positive" in total:
            entry["positive_share"] = total["positive"] / max(total["valid"], 1)
        tasks[task] = entry
    heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    return {"samples": count, "of": len(dataset), "decoded": count - len(errors), "errors": errors,
            "height": [min(heights), max(heights)] if sizes else None,
            "width": [min(widths), max(widths)] if sizes else None, "tasks": tasks}


def format_report(split: str, report: dict) -> str:
    """The report of one split as text lines."""
    read = f"{report['samples']}" + (f" of {report['of']}" if report["samples"] != report["of"] else "")
    lines = [f"{split}: {read} samples read, {report['decoded']} decoded, {len(report['errors'])} failed"]
    if report["height"]:
        lines.append(f"  image size: height {_span(report['height'])}, width {_span(report['width'])}")
    for task, entry in report["tasks"].items():
        text = f"  {task}: {100 * entry['valid_share']:.1f}% of pixels valid"
        if "class_shares" in entry:
            never = entry["classes_never_seen"]
            text += (f"; {len(entry['class_shares']) - len(never)} of {len(entry['class_shares'])} classes seen"
                     + (f" (never: {', '.join(map(str, never))})" if never else "")
                     + f"; largest class {int(np.argmax(entry['class_shares']))} at "
                     f"{100 * max(entry['class_shares']):.1f}%")
        if "mean" in entry:
            text += f"; {entry['min']:.3g} to {entry['max']:.3g} m, mean {entry['mean']:.3g} m"
        if "positive_share" in entry:
            text += f"; {100 * entry['positive_share']:.1f}% positive"
        lines.append(text)
    lines += [f"  failed {error}" for error in report["errors"]]
    return "\n".join(lines)


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}" if values[0] == values[1] else f"{values[0]}-{values[1]}"
