"""Run logs: CSV files (always), TensorBoard event files (when the tensorboard package is installed), and
PNG plots of the training curves and of sample predictions per task."""
from __future__ import annotations

import csv
import os
from typing import Mapping, Sequence

import numpy as np
import torch


class RunLog:
    """Appends rows to ``<dir>/<name>.csv`` (header: every key written so far) and mirrors scalars to
    TensorBoard under ``<dir>/tensorboard``. Only the main rank should own one."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: CSV only
            self._writer, self.tensorboard = None, None
        else:
            self._writer = SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"))

    def write(self, name: str, row: Mapping[str, object], step: int) -> None:
        """Appends ``row`` under the file's header; a key the header lacks (e.g. a run resumed with gradient
        clipping switched on, or on a GPU, whose memory column differs) widens the header and the file is
        rewritten with empty cells for the earlier rows, so that no column is ever misread."""
        path = os.path.join(self.folder, f"{name}.csv")
        header = self._header(path)
        if header is not None and set(row) <= set(header):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(row)
        else:
            header = header or []
            rows = self._rows(path) if header else []
            self._rewrite(path, header + [k for k in row if k not in header], rows + [row])
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.tensorboard.add_scalar(f"{name}/{key}", value, step)
            self.tensorboard.flush()

    @staticmethod
    def _header(path: str) -> list[str] | None:
        if not os.path.exists(path):
            return None
        with open(path, newline="") as f:
            return next(csv.reader(f), None)

    @staticmethod
    def _rows(path: str) -> list[dict[str, str]]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @staticmethod
    def _rewrite(path: str, header: list[str], rows: list[Mapping[str, object]]) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

    def read(self, name: str) -> list[dict[str, float]]:
        path = os.path.join(self.folder, f"{name}.csv")
        if not os.path.exists(path):
            return []
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in self._rows(path)]

    def resume_at(self, iteration: int) -> None:
        """A resumed run rewrites what the interrupted one logged after ``iteration``: the CSV rows past it are
        dropped and TensorBoard hides the earlier events from step ``iteration + 1`` on (``purge_step``)."""
        for name in ("train", "eval"):
            self.truncate(name, iteration)
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = self._writer(os.path.join(self.folder, "tensorboard"), purge_step=iteration + 1)

    def truncate(self, name: str, after_iteration: int) -> None:
        """Drops rows past ``after_iteration`` (a resumed run rewrites what the interrupted one logged)."""
        path = os.path.join(self.folder, f"{name}.csv")
        header = self._header(path)
        if header is None:
            return
        self._rewrite(path, header, [r for r in self._rows(path) if float(r["iteration"]) <= after_iteration])


def _keys(rows: list[dict]) -> list[str]:
    """Every key of ``rows`` in first-seen order (a column may start after the first row)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def plot_curves(log: RunLog, path: str) -> None:
    """Training losses (left) and evaluation metrics (right) against the iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = log.read("train"), log.read("eval")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        its = [r["iteration"] for r in train]
        for key in [k for k in _keys(train) if k.startswith("loss")]:
            axes[0].plot(its, [r.get(key, np.nan) for r in train], label=key)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
    axes[0].set(title="training loss", xlabel="iteration")
    if evals:
        its = [r["iteration"] for r in evals]
        for key in [k for k in _keys(evals) if k != "iteration"]:
            axes[1].plot(its, [r.get(key, np.nan) for r in evals], marker="o", label=key)
        axes[1].legend(fontsize=7)
    axes[1].set(title="evaluation", xlabel="iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _task_image(task: str, x: torch.Tensor, is_label: bool) -> np.ndarray:
    """An (H,W,3) or (H,W) array in [0,1] showing a prediction (logits) or a label of ``task``."""
    if task in ("semseg", "parts"):
        classes = x if is_label else x.argmax(0)
        classes = classes.float()
        shown = classes.clone()
        shown[classes == 255] = float("nan")
        return shown.numpy()
    if task == "normals":
        n = x if is_label else torch.nn.functional.normalize(x, dim=0)
        return ((n.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    if task in ("edge", "sal"):
        v = x[0] if is_label else torch.sigmoid(x[0])
        v = v.clone()
        v[v == 255] = float("nan")
        return v.numpy()
    return x[0].numpy()  # depth


def plot_predictions(images: Sequence[torch.Tensor], preds: Mapping[str, Sequence[torch.Tensor]],
                     labels: Mapping[str, Sequence[torch.Tensor]], path: str, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225)) -> None:
    """One row per sample: the image, then prediction and label for each task. Per sample a (3,H,W) normalised
    image, (C,H,W) predictions and labels (sizes may differ between samples)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(preds)
    n = len(images)
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
    for i in range(n):
        image = images[i].float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        axes[i, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for j, task in enumerate(tasks):
            for k, (tensor, is_label) in enumerate(((preds[task][i], False), (labels[task][i], True))):
                ax = axes[i, 1 + 2 * j + k]
                shown = _task_image(task, tensor.float().cpu(), is_label)
                ax.imshow(shown, cmap=None if shown.ndim == 3 else ("tab20" if task in ("semseg", "parts") else "viridis"))
                if i == 0:
                    ax.set_title(f"{task} {'label' if is_label else 'pred'}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
