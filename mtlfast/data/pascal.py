"""PASCAL-Context reader for the ``PASCALContext/`` layout (DESIGN.md §5, the multi-task release of ASTMT /
MTI-Net with 5 tasks).

::

    PASCALContext/
      JPEGImages/<id>.jpg
      ImageSets/Context/train.txt, val.txt        one image id per line
      semseg/VOC12/<id>.png, else semseg/pascal-context/<id>.png
                                                  21 classes 0..20 (0 = background), 255 = ignore
      pascal-context/trainval/<id>.mat            ``LabelMap`` (459-class context labels)
      human_parts/<id>.mat                        PASCAL-Part ``anno`` struct
      normals_distill/<id>.png                    2 v / 255 - 1
      sal_distill/<id>.png                        v / 255 > 0.5
      json/nyu_classes.json, json/context_classes.json   (optional, see normals)

Conventions implemented:

- edge: boundaries of ``LabelMap`` (4-neighbour label change), thinned to one pixel
  (:func:`mtlfast.data.base.label_boundaries`); no ignored pixels.
- parts: from ``anno.objects`` (fields class, class_ind, mask, parts{part_name, mask}). Background 0
  everywhere; for every object with ``class_ind == 15`` (person) that has part annotations, each part
  mask is painted with its group, in file order (later parts overwrite earlier ones): 1 head (head,
  hair, eyes, ears, eyebrows, nose, mouth), 2 torso (torso, neck), 3 upper arms, 4 lower arms and
  hands, 5 upper legs, 6 lower legs and feet (the ``*arm``/``*leg`` names: l/r, then l(ower)/u(pper)).
  A person without part annotations, and person pixels no part covers, stay background; an image with no
  part pixel at all (no annotated person) is ignored entirely (255), as the public MTI-Net / InvPT code does
  (their ``AddIgnoreRegions``: such images would otherwise train and score the parts head as pure
  background); training crops without a part pixel are ignored too (:class:`~mtlfast.data.transforms.RandomCrop`,
  as InvPT). An unknown part name is an error.
- normals: unit vectors; when both json files exist, only pixels whose ``LabelMap`` class is one of the
  NYU classes (``context_classes.json`` maps names to LabelMap ids; ``nyu_classes.json`` lists names;
  "unknown" excluded, "tvmonitor" added) keep their normal, all others become the zero vector (invalid),
  as in the public protocol. Without the json files the train split keeps every pixel (with a warning) and
  any other split is an error (its normals metric would not follow the protocol).
- sal: ``v / 255 > 0.5`` -> 1 else 0; no ignored pixels.
- semseg: values as stored (palette PNGs give indices); anything outside 0..20 and 255 is an error.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from mtlfast.data.base import (DataError, SplitDataset, decode_normals, label_boundaries, read_class_png,
                               read_label_png, read_mat, require_dir, require_file)
from mtlfast.data.tasks import IGNORE_INDEX

__all__ = ["PASCALContext", "HUMAN_PART_GROUPS", "PERSON_CLASS"]

PERSON_CLASS = 15
_GROUP_NAMES = {
    1: ("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"),
    2: ("torso", "neck"),
    3: ("luarm", "ruarm"),
    4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"),
    6: ("llleg", "rlleg", "lfoot", "rfoot"),
}
#: PASCAL-Part person part name -> parts class (1..6).
HUMAN_PART_GROUPS = {name: group for group, names in _GROUP_NAMES.items() for name in names}


def _scalar(value):
    return np.asarray(value).ravel()[0]


class PASCALContext(SplitDataset):
    """PASCAL-Context split with labels for ``tasks`` (semseg, parts, sal, normals, edge)."""

    name = "pascal"
    folder, split_folder, image_folder = "PASCALContext", "ImageSets/Context", "JPEGImages"

    def __init__(self, root=None, split: str = "train", tasks=None, transform=None):
        super().__init__(root, split, tasks, transform)
        self.normal_classes = self._normal_classes() if "normals" in self.tasks else None
        need_labelmap = "edge" in self.tasks or self.normal_classes is not None
        if need_labelmap:
            context_dir = require_dir(self.root / "pascal-context" / "trainval", "PASCALContext LabelMap files")
        if "semseg" in self.tasks:
            seg_dirs = [self.root / "semseg" / "VOC12", self.root / "semseg" / "pascal-context"]
            if not any(d.is_dir() for d in seg_dirs):
                raise FileNotFoundError(f"PASCALContext semseg labels: folder not found: {seg_dirs[0]} "
                                        f"(nor {seg_dirs[1]})")
        folders = {"parts": "human_parts", "normals": "normals_distill", "sal": "sal_distill"}
        for task in self.tasks:
            if task in folders:
                require_dir(self.root / folders[task], f"PASCALContext {task} labels")
        for stem in self.ids:
            entry = {"image": require_file(self.image_dir / f"{stem}.jpg", "image")}
            if need_labelmap:
                entry["labelmap"] = require_file(context_dir / f"{stem}.mat", "LabelMap")
            if "edge" in self.tasks:  # edges are decoded from the LabelMap
                entry["edge"] = entry["labelmap"]
            if "semseg" in self.tasks:
                found = [d / f"{stem}.png" for d in seg_dirs if (d / f"{stem}.png").is_file()]
                if not found:
                    raise FileNotFoundError(f"semseg label: file not found: {seg_dirs[0] / stem}.png "
                                            f"(nor {seg_dirs[1] / stem}.png)")
                entry["semseg"] = found[0]
            for task, folder in folders.items():
                if task in self.tasks:
                    ext = ".mat" if task == "parts" else ".png"
                    entry[task] = require_file(self.root / folder / f"{stem}{ext}", f"{task} label")
            self.files.append(entry)

    def _normal_classes(self) -> set[int] | None:
        nyu_path, ctx_path = self.root / "json" / "nyu_classes.json", self.root / "json" / "context_classes.json"
        if not (nyu_path.is_file() and ctx_path.is_file()):
            what = (f"{nyu_path} / {ctx_path} not found (they come with the PASCAL-Context release of the "
                    "multi-task benchmark, folder json/)")
            if self.split != "train":  # the metric would not be the published protocol's
                raise DataError(f"{what}: normals of split {self.split!r} are evaluated on the NYU classes only; "
                                "without the class lists they cannot be")
            warnings.warn(f"{what}: training normals are used on every pixel, not only on the NYU classes of "
                          "the public protocol", stacklevel=3)
            return None
        try:
            nyu, context = json.loads(nyu_path.read_text()), json.loads(ctx_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot parse {nyu_path} / {ctx_path}: {exc}") from exc
        valid = {int(context[n]) for n in nyu if n in context and n != "unknown"}
        if "tvmonitor" in context:
            valid.add(int(context["tvmonitor"]))
        return valid

    def read_labels(self, files: dict[str, Path], image: np.ndarray) -> dict[str, np.ndarray]:
        labelmap = self._labelmap(files["labelmap"]) if "labelmap" in files else None
        if labelmap is not None:
            self._check_same_size(image.shape, labelmap, files["labelmap"], files["image"])
        labels = {}
        for task in self.tasks:
            if task == "edge":
                labels[task] = label_boundaries(labelmap)
            elif task == "normals":
                labels[task] = self._normals(files[task], labelmap)
            elif task == "parts":
                labels[task] = self._parts(files[task], image.shape[:2])
            else:
                labels[task] = getattr(self, f"_{task}")(files[task])
        return labels

    @staticmethod
    def _labelmap(path: Path) -> np.ndarray:
        mat = read_mat(path)
        if "LabelMap" not in mat:
            raise DataError(f"{path}: no 'LabelMap' variable (has {sorted(k for k in mat if not k.startswith('__'))})")
        labelmap = np.asarray(mat["LabelMap"])
        if labelmap.ndim != 2:
            raise DataError(f"{path}: LabelMap should be 2-d, got shape {labelmap.shape}")
        return labelmap

    @staticmethod
    def _semseg(path: Path) -> np.ndarray:
        return read_class_png(path, 20)

    @staticmethod
    def _sal(path: Path) -> np.ndarray:
        return (read_label_png(path, "L").astype(np.float32) / 255.0 > 0.5).astype(np.float32)

    def _normals(self, path: Path, labelmap: np.ndarray | None) -> np.ndarray:
        normals = decode_normals(read_label_png(path, "RGB"), path)
        if self.normal_classes is not None and normals.shape[:2] == labelmap.shape:
            normals[~np.isin(labelmap, list(self.normal_classes))] = 0.0
        return normals

    @staticmethod
    def _parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
        mat = read_mat(path)
        try:
            objects = np.asarray(mat["anno"][0, 0]["objects"]).ravel()
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"{path}: expected a PASCAL-Part 'anno' struct with 'objects' ({exc})") from exc
        target = np.zeros(shape, dtype=np.int64)
        for obj in objects:
            if int(_scalar(obj["class_ind"])) != PERSON_CLASS:
                continue
            for part in np.asarray(obj["parts"]).ravel():
                name = str(_scalar(part["part_name"]))
                if name not in HUMAN_PART_GROUPS:
                    raise DataError(f"{path}: unknown person part {name!r}; known: {', '.join(HUMAN_PART_GROUPS)}")
                mask = np.asarray(part["mask"]).astype(bool)
                if mask.shape != shape:
                    raise DataError(f"{path}: part mask of shape {mask.shape}, the image has {shape}")
                target[mask] = HUMAN_PART_GROUPS[name]
        if not target.any():  # no annotated person part: the whole image is ignored
            target[:] = IGNORE_INDEX
        return target
