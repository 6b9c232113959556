"""NYUD-v2 reader for the ``NYUDv2/`` layout (DESIGN.md §5, the multi-task release used by MTI-Net/InvPT).

::

    NYUDv2/ (or NYUD_MT/, the name the public archives unpack to)
      images/<id>.png|.jpg        RGB
      segmentation/<id>.png|.mat  0 = unlabelled, 1..40 = classes       -> semseg: 0 -> 255, v -> v - 1
      depth/<id>.npy|.mat         metres, (H,W), (H,W,1) or (1,H,W)      -> depth; 0 / NaN / <0 -> 0 (invalid)
      normals/<id>.png|.jpg|.npy  png/jpg: 2 v / 255 - 1; npy: values    -> unit normals; |n| not in [0.5, 1.5] -> 0
      edge/<id>.png|.npy          png: v / 255 >= 0.5 (a 0/1 png: v >= 0.5); npy (as depth): v >= 0.5 -> {0,1}
                                  (npy: 255 stays 255, ignored; a png of only 0, 1 and 255 is ambiguous: refused)
      gt_sets/train.txt, val.txt  one image id per line

The ``.mat`` segmentation (variable ``segmentation``), ``.mat`` depth (variable ``depth``) and ``.jpg`` normals
are those of ASTMT's NYUD_MT archive; the other files those of the MTI-Net / InvPT one. ASTMT trained 41-way
(unlabelled as a class); here both archives give the 40 classes of DESIGN.md §5 (unlabelled ignored), as
MTI-Net and the later methods evaluate.

Segmentation values other than 0..40 and 255 (kept as ignore) are reported as a corrupt file, and so are
depth values above :data:`MAX_DEPTH_M` (depth stored in millimetres). Every
file a split needs for the requested tasks is checked at construction (the error names the first
missing path). Nothing is written under the root.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtlfast.data.base import (DataError, SplitDataset, check_class_ids, decode_normals, read_class_png,
                               read_depth_npy, read_label_png, read_mat_array, read_npy, require_dir,
                               single_channel_map)
from mtlfast.data.tasks import IGNORE_INDEX

__all__ = ["NYUDv2", "MAX_DEPTH_M"]

#: Largest depth a NYUD-v2 file may hold, in metres: larger values mean another unit (millimetres) and are refused.
MAX_DEPTH_M = 100.0

# task -> (folder, accepted extensions in order of preference)
_FILES = {"semseg": ("segmentation", (".png", ".mat")), "depth": ("depth", (".npy", ".mat")),
          "normals": ("normals", (".png", ".jpg", ".npy")), "edge": ("edge", (".png", ".npy"))}


def _find(folder: Path, stem: str, extensions) -> Path:
    for ext in extensions:
        path = folder / (stem + ext)
        if path.is_file():
            return path
    raise FileNotFoundError(f"file not found: {folder / stem}{'|'.join(extensions)}")


class NYUDv2(SplitDataset):
    """NYUD-v2 split with labels for ``tasks`` (semseg, depth, normals, edge)."""

    name = "nyud"
    folder, split_folder, image_folder = "NYUDv2", "gt_sets", "images"
    folder_aliases = ("NYUD_MT",)

    def __init__(self, root=None, split: str = "train", tasks=None, transform=None):
        super().__init__(root, split, tasks, transform)
        folders = {t: require_dir(self.root / _FILES[t][0], f"NYUDv2 {t} labels") for t in self.tasks}
        for stem in self.ids:
            entry = {"image": _find(self.image_dir, stem, (".png", ".jpg", ".jpeg"))}
            for task in self.tasks:
                entry[task] = _find(folders[task], stem, _FILES[task][1])
            self.files.append(entry)

    def read_labels(self, files: dict[str, Path], image: np.ndarray) -> dict[str, np.ndarray]:
        return {task: getattr(self, f"_{task}")(files[task]) for task in self.tasks}

    @staticmethod
    def _semseg(path: Path) -> np.ndarray:
        if path.suffix == ".mat":
            raw = check_class_ids(read_mat_array(path, "segmentation"), path, 40, " (0 = unlabelled)")
        else:
            raw = read_class_png(path, 40, " (0 = unlabelled)")
        return np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)

    @staticmethod
    def _depth(path: Path) -> np.ndarray:
        depth = (single_channel_map(read_mat_array(path, "depth"), path, "depth file") if path.suffix == ".mat"
                 else read_depth_npy(path))
        finite = depth[np.isfinite(depth)]
        if finite.size and finite.max() > MAX_DEPTH_M:  # the Kinect's range is ~10 m
            raise DataError(f"depth file {path}: values up to {finite.max():g}, expected metres (<= {MAX_DEPTH_M:g}); "
                            "millimetres? divide the files by 1000")
        return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)

    @staticmethod
    def _normals(path: Path) -> np.ndarray:
        values = read_npy(path) if path.suffix == ".npy" else read_label_png(path, "RGB")
        return decode_normals(values, path)

    @staticmethod
    def _edge(path: Path) -> np.ndarray:
        if path.suffix == ".png":
            raw = read_label_png(path, "L").astype(np.float32)
            values = set(np.unique(raw).tolist())
            if {1.0, 255.0} <= values and values <= {0.0, 1.0, 255.0}:
                # 0/1 edges with 255 = ignore, or 0/255 edges with stray 1s: refused rather than guessed (a file of
                # that dataset without edges, {0, 255}, could not be told apart from a 0/255 map anyway)
                raise DataError(f"edge file {path}: values 0, 1 and 255 only: 0/1 edges with 255 = ignore, or 0/255 "
                                "edges? Store 0/1 edges with 255 = ignore as .npy, or edge PNGs as 0/255 or 0/1 "
                                "without ignored pixels")
            raw = raw / 255.0 if raw.max() > 1 else raw  # 0/255 maps, or 0/1 ones (which /255 would empty)
        else:
            raw = single_channel_map(read_npy(path), path, "edge file")
            raw = np.where(raw == IGNORE_INDEX, np.nan, raw)
        return np.where(np.isnan(raw), IGNORE_INDEX, (raw >= 0.5).astype(np.float32)).astype(np.float32)
