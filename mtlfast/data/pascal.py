"""PASCAL-Context reader for the ``PASCALContext/`` layout (DESIGN.md §5, the multi-task release of ASTMT /
MTI-Net with 5 tasks).

::

    PASCALContext/ (or PASCAL_MT/, the name the public archives unpack to)
      JPEGImages/<id>.jpg
      ImageSets/Context/train.txt, val.txt        one image id per line
      semseg/VOC12/<id>.png, else semseg/pascal-context/<id>.png
                                                  21 classes 0..20 (0 = background), 255 = ignore
      pascal-context/trainval/<id>.mat            ``LabelMap`` (459-class context labels)
      human_parts/<id>.mat                        PASCAL-Part ``anno`` struct
      normals_distill/<id>.png                    2 v / 255 - 1
      sal_distill/<id>.png                        v / 255 > 0.5
      json/nyu_classes.json, json/context_classes.json   (optional, see normals)
      ImageSets/Parts/train.txt, val.txt          (optional) JSON object lists of the public code (see parts)

Conventions implemented:

- edge: boundaries of ``LabelMap`` where its 4-neighbour Laplacian is not zero, thinned to one pixel, as the
  public code derives them (:func:`mtlfast.data.base.laplacian_boundaries`); no ignored pixels.
- parts: from ``anno.objects`` (fields class, class_ind, mask, parts{part_name, mask}). Background 0
  everywhere; for every object with ``class_ind == 15`` (person) that has part annotations, each part
  mask is painted with its group, in file order (later parts overwrite earlier ones): 1 head (head,
  hair, eyes, ears, eyebrows, nose, mouth), 2 torso (torso, neck), 3 upper arms, 4 lower arms and
  hands, 5 upper legs, 6 lower legs and feet (the ``*arm``/``*leg`` names: l/r, then l(ower)/u(pper)).
  A person without part annotations, and person pixels no part covers, stay background; an image with no
  part pixel at all (no annotated person) is ignored entirely (255), as the public MTI-Net / InvPT code does
  (their ``AddIgnoreRegions``: such images would otherwise train and score the parts head as pure
  background); training crops without a part pixel are ignored too (:class:`~mtlfast.data.transforms.RandomCrop`,
  as InvPT). With parts as the only task, the split keeps only the images that show a person, as the public code
  does for its single-task parts baseline (:func:`person_flags`; the scores are the same, the batches hold fewer
  images without a part label). An unknown part name is an error.
- normals: unit vectors; only pixels whose ``LabelMap`` class is one of the NYU classes keep their normal, all
  others become the zero vector (invalid), as in the public protocol: the context classes whose names are
  NYUD-v2 class names ("unknown" excluded, "tvmonitor" added), from the folder's json files when both exist
  (``context_classes.json`` maps names to LabelMap ids; ``nyu_classes.json`` lists names), else
  :data:`NORMALS_CONTEXT_CLASSES` (the same set; the public code bases ship these lists with their code, not
  with the data).
- sal: ``v / 255 > 0.5`` -> 1 else 0; no ignored pixels.
- semseg: values as stored (palette PNGs give indices); anything outside 0..20 and 255 is an error.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from mtlfast._files import write_json_atomically
from mtlfast.data.base import (DataError, SplitDataset, cache_dir, decode_normals, laplacian_boundaries,
                               read_class_png, read_label_png, read_mat, read_mat_array, require_dir, require_file)
from mtlfast.data.tasks import IGNORE_INDEX

__all__ = ["PASCALContext", "HUMAN_PART_GROUPS", "PERSON_CLASS", "NORMALS_CONTEXT_CLASSES", "person_flags"]

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

#: The PASCAL-Context classes (name -> ``LabelMap`` id of the 459-class list) whose pixels keep their distilled
#: normal: the public protocol's set, computed once from the class lists that ASTMT / MTI-Net ship with their code
#: (data/db_info/context_classes.json, nyu_classes.json: the context names that are also NYUD-v2 class names,
#: except "unknown", plus "tvmonitor"); 170 classes.
NORMALS_CONTEXT_CLASSES = {
    "air conditioner": 3, "antenna": 4, "ashtray": 6, "bag": 9, "ball": 10, "balloon": 11, "barrel": 13,
    "basket": 15, "bathtub": 17, "bed": 18, "bench": 22, "bicycle": 23, "blackboard": 29, "board": 30, "book": 33,
    "bottle": 34, "bowl": 36, "box": 37, "bracelet": 38, "brick": 39, "broom": 41, "bucket": 43, "cabinet": 46,
    "cake": 49, "calculator": 50, "calendar": 51, "camera": 53, "can": 55, "candle": 56, "car": 59, "cart": 61,
    "case": 62, "cat": 65, "cd": 66, "ceiling": 68, "cell phone": 69, "chair": 72, "chessboard": 73, "clock": 78,
    "coffee machine": 83, "comb": 84, "computer": 85, "cone": 87, "container": 88, "corkscrew": 95, "counter": 96,
    "crate": 101, "cup": 104, "curtain": 105, "cutting board": 107, "dishwasher": 111, "dog": 113, "door": 115,
    "drum": 122, "duck": 124, "envelope": 135, "fan": 141, "faucet": 142, "fax machine": 143,
    "fire extinguisher": 146, "fish tank": 150, "flag": 154, "flashlight": 157, "floor": 158, "flower": 159,
    "fork": 165, "fruit": 172, "furnace": 174, "glass": 181, "globe": 183, "glove": 184, "guitar": 191,
    "hammer": 193, "handle": 195, "hanger": 197, "hat": 199, "heater": 202, "ipod": 213, "ironing board": 215,
    "jar": 216, "key": 219, "keyboard": 220, "knife": 223, "ladder": 225, "laptop": 228, "lid": 230, "light": 232,
    "light bulb": 233, "lock": 238, "machine": 239, "map": 242, "mask": 243, "mattress": 246, "microphone": 250,
    "microwave": 251, "mirror": 252, "money": 255, "mouse": 260, "mouse pad": 261, "napkin": 263, "oven": 269,
    "pan": 272, "paper": 273, "paper cutter": 275, "pen": 281, "pencil": 283, "person": 284, "photo": 285,
    "piano": 286, "picture": 287, "pig": 288, "pillow": 290, "pipe": 291, "pitcher": 292, "plant": 293, "plate": 295,
    "pool table": 304, "pot": 307, "printer": 309, "projector": 310, "radiator": 314, "radio": 315,
    "range hood": 319, "remote control": 323, "rope": 329, "rug": 330, "ruler": 331, "scale": 336, "sculpture": 342,
    "sewing machine": 345, "shelves": 349, "shoe": 350, "shopping cart": 351, "shovel": 352, "sign": 355,
    "sink": 357, "sofa": 368, "spatula": 370, "speaker": 371, "spoon": 374, "stapler": 379, "stick": 380,
    "stool": 383, "stove": 384, "table": 397, "tape": 401, "telephone": 403, "tent": 405, "toaster": 407,
    "toilet": 408, "toothbrush": 411, "towel": 412, "toy": 413, "toy car": 414, "trampoline": 417, "tray": 419,
    "tricycle": 421, "trophy": 423, "tvmonitor": 427, "typewriter": 429, "umbrella": 430, "vacuum cleaner": 432,
    "wall": 440, "wallet": 441, "wardrobe": 442, "washing machine": 443, "watch": 444, "water dispenser": 446,
    "window": 454, "wire": 457}


def _scalar(value):
    return np.asarray(value).ravel()[0]


class PASCALContext(SplitDataset):
    """PASCAL-Context split with labels for ``tasks`` (semseg, parts, sal, normals, edge)."""

    name = "pascal"
    folder, split_folder, image_folder = "PASCALContext", "ImageSets/Context", "JPEGImages"
    folder_aliases = ("PASCAL_MT",)

    def __init__(self, root=None, split: str = "train", tasks=None, transform=None):
        super().__init__(root, split, tasks, transform)
        self.normal_classes = self._normal_classes() if "normals" in self.tasks else None
        need_labelmap = "edge" in self.tasks or "normals" in self.tasks  # edges and the normals' class mask
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
        if self.tasks == ("parts",):  # trained or scored alone: only the images that show a person
            keep = person_flags([entry["parts"] for entry in self.files],
                                self.root / "ImageSets" / "Parts" / f"{split}.txt")
            self.ids = [stem for stem, k in zip(self.ids, keep) if k]
            self.files = [entry for entry, k in zip(self.files, keep) if k]
            if not self.ids:
                raise DataError(f"PASCALContext split {split!r}: no image shows a person (human_parts/), nothing to "
                                "train or score parts alone on")

    def _normal_classes(self) -> set[int]:
        """LabelMap ids of the NYU classes (normals kept): from the folder's json/ class lists when both exist,
        else :data:`NORMALS_CONTEXT_CLASSES`."""
        nyu_path, ctx_path = self.root / "json" / "nyu_classes.json", self.root / "json" / "context_classes.json"
        if not (nyu_path.is_file() and ctx_path.is_file()):
            return set(NORMALS_CONTEXT_CLASSES.values())
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
                labels[task] = laplacian_boundaries(labelmap)
            elif task == "normals":
                labels[task] = self._normals(files[task], labelmap)
            elif task == "parts":
                labels[task] = self._parts(files[task], image.shape[:2])
            else:
                labels[task] = getattr(self, f"_{task}")(files[task])
        return labels

    @staticmethod
    def _labelmap(path: Path) -> np.ndarray:
        labelmap = read_mat_array(path, "LabelMap")
        if labelmap.ndim != 2:
            raise DataError(f"{path}: LabelMap should be 2-d, got shape {labelmap.shape}")
        return labelmap

    @staticmethod
    def _semseg(path: Path) -> np.ndarray:
        return read_class_png(path, 20)

    @staticmethod
    def _sal(path: Path) -> np.ndarray:
        return (read_label_png(path, "L").astype(np.float32) / 255.0 > 0.5).astype(np.float32)

    def _normals(self, path: Path, labelmap: np.ndarray) -> np.ndarray:
        normals = decode_normals(read_label_png(path, "RGB"), path)
        if normals.shape[:2] == labelmap.shape:
            normals[~np.isin(labelmap, list(self.normal_classes))] = 0.0
        return normals

    @staticmethod
    def _parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
        target = np.zeros(shape, dtype=np.int64)
        for obj in _part_objects(path):
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


def _part_objects(path: Path) -> np.ndarray:
    """The objects of a PASCAL-Part annotation file (fields class, class_ind, mask, parts)."""
    mat = read_mat(path)
    try:
        return np.asarray(mat["anno"][0, 0]["objects"]).ravel()
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"{path}: expected a PASCAL-Part 'anno' struct with 'objects' ({exc})") from exc


def _shows_person(path: Path) -> bool:
    """An object of the person class with a non-empty mask (the public code's object list, area threshold 0)."""
    return any(int(_scalar(obj["class_ind"])) == PERSON_CLASS and np.asarray(obj["mask"]).any()
               for obj in _part_objects(path))


def person_flags(paths: list[Path], object_lists: Path | None = None) -> list[bool]:
    """Whether each PASCAL-Part annotation file (``human_parts/<id>.mat``) shows a person: the images ASTMT /
    MTI-Net keep when human parts is the only task. Their object lists (``ImageSets/Parts/<split>.txt``, JSON:
    image id -> class of each object with a non-empty mask, -1 otherwise; written by their code and shipped in
    the multi-task archive) are read when ``object_lists`` names one that covers every image. Otherwise the files
    are read (~5k per split, about a minute), and the answers are kept in :func:`~mtlfast.data.base.cache_dir`,
    one JSON per human_parts folder, each valid while its file's size and modification time are unchanged."""
    if not paths:
        return []
    if object_lists is not None and object_lists.is_file():
        try:
            lists = json.loads(object_lists.read_text())
        except (OSError, ValueError):
            lists = None
        if isinstance(lists, dict) and all(path.stem in lists for path in paths):
            return [PERSON_CLASS in [int(c) for c in lists[path.stem]] for path in paths]
    folder = paths[0].parent.resolve()
    cache_path = cache_dir() / f"pascal_persons-{hashlib.sha1(str(folder).encode()).hexdigest()[:16]}.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    stats = [path.stat() for path in paths]
    keys = [[st.st_size, st.st_mtime_ns] for st in stats]
    stale = [i for i, path in enumerate(paths) if cache.get(path.name, [None, None])[:2] != keys[i]]
    if stale:
        from tqdm import tqdm

        for i in tqdm(stale, desc=f"PASCAL-Part persons in {folder}", disable=len(stale) < 200, dynamic_ncols=True):
            cache[paths[i].name] = [*keys[i], _shows_person(paths[i])]
        try:
            write_json_atomically(cache_path, cache)
        except OSError as exc:
            warnings.warn(f"could not keep the PASCAL-Part person scan in {cache_path} ({exc}); it runs again next "
                          "time", stacklevel=3)
    return [bool(cache[path.name][2]) for path in paths]
