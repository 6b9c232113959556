"""Shared pieces of the datasets: the base classes, file decoding with errors that name the path, and the
label-boundary rule used for edges.

Every reader decodes files into the raw sample format: ``{"image": float32 (3,H,W) in [0, 255],
"meta": {...}, task: label}`` with the labels of :mod:`mtlfast.data.tasks`; the dataset's ``transform``
(normalisation, augmentation, padding: :mod:`mtlfast.data.transforms`) turns it into the final sample.
Nothing here writes to disk.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mtlfast.data.tasks import IGNORE_INDEX, check_tasks

__all__ = ["DataError", "MultiTaskDataset", "SplitDataset", "read_image", "read_label_png", "read_class_png",
           "check_class_ids", "single_channel_map", "read_mat_array",
           "read_npy", "read_mat", "read_split", "require_dir", "require_file", "resolve_root", "decode_normals",
           "label_boundaries", "laplacian_boundaries", "to_sample", "cache_dir"]


class DataError(RuntimeError):
    """A dataset file exists but cannot be decoded or has an unexpected content; the message names the path."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path


def read_split(path: Path) -> list[str]:
    """Image ids of a split file, one per line (blank lines skipped)."""
    require_file(path, "split file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise DataError(f"split file {path}: not a text file of image ids ({exc})") from exc
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {path} lists no image")
    return ids


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    require_file(path, "image")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot decode image file {path}: {exc}") from exc
    return image


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    return np.asarray(_open_image(path).convert("RGB"))


def read_label_png(path: Path, mode: str | None = None) -> np.ndarray:
    """The stored values of a label PNG (palette PNGs give their indices), optionally converted to ``mode``."""
    image = _open_image(path)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return np.asarray(image)


def read_class_png(path: Path, top: int, note: str = "") -> np.ndarray:
    """int64 (H, W) values of a single-channel class PNG, each in 0..``top`` or 255 (ignore); ``note`` follows
    the range in the error for other values."""
    raw = read_label_png(path)
    if raw.ndim != 2:
        raise DataError(f"segmentation file {path}: expected a single-channel PNG, got shape {raw.shape}")
    return check_class_ids(raw, path, top, note)


def check_class_ids(raw: np.ndarray, path: Path, top: int, note: str = "") -> np.ndarray:
    """``raw`` (H, W) as int64 class ids, each an integer in 0..``top`` or 255 (ignore), else an error naming
    ``path`` (``note`` follows the range)."""
    if raw.ndim != 2:
        raise DataError(f"segmentation file {path}: expected an (H, W) map, got shape {raw.shape}")
    if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and np.array_equal(raw, np.round(raw))):
        raise DataError(f"segmentation file {path}: non-integer or non-finite class ids")
    if raw.dtype.kind not in "uif":
        raise DataError(f"segmentation file {path}: expected numeric class ids, got {raw.dtype}")
    raw = raw.astype(np.int64)
    bad = ((raw < 0) | (raw > top)) & (raw != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"segmentation file {path}: values {np.unique(raw[bad]).tolist()[:5]} outside 0..{top}{note} "
                        "and 255")
    return raw


def read_npy(path: Path) -> np.ndarray:
    require_file(path, "array")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot read .npy file {path}: {exc}") from exc


def read_depth_npy(path: Path, what: str = "depth file") -> np.ndarray:
    """float32 (H, W) from a ``.npy`` of shape (H, W), (H, W, 1) or (1, H, W), values as stored."""
    return single_channel_map(read_npy(path), path, what)


def single_channel_map(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """float32 (H, W) from an array of shape (H, W), (H, W, 1) or (1, H, W) read from ``path`` (a ``what``)."""
    if values.dtype.kind not in "buif":
        raise DataError(f"{what} {path}: expected numbers, got {values.dtype}")
    values = values.astype(np.float32)
    if values.ndim == 3 and 1 in (values.shape[0], values.shape[-1]):
        values = values.reshape(values.shape[1:] if values.shape[0] == 1 else values.shape[:2])
    if values.ndim != 2:
        raise DataError(f"{what} {path}: expected an (H, W) array, got shape {values.shape}")
    return values


def read_mat(path: Path) -> dict:
    """``scipy.io.loadmat`` (MATLAB structs as record arrays)."""
    import scipy.io

    require_file(path, ".mat file")
    try:
        return scipy.io.loadmat(str(path), struct_as_record=True, squeeze_me=False)
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError... on corrupt files
        raise DataError(f"cannot read .mat file {path}: {exc}") from exc


def read_mat_array(path: Path, key: str) -> np.ndarray:
    """The array stored under ``key`` in a MATLAB file (e.g. ASTMT's NYUD ``segmentation`` / ``depth`` .mat)."""
    content = read_mat(path)
    if key not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f".mat file {path}: no variable {key!r} (it holds {', '.join(found) or 'none'})")
    return np.asarray(content[key])


def decode_normals(values: np.ndarray, path: Path) -> np.ndarray:
    """float32 (H, W, 3) unit normals from an (H, W, 3) array: uint8 PNG values map to ``2 v / 255 - 1``,
    floats are taken as they are. A decoded vector should have length ~1: those of length in [0.5, 1.5] are
    renormalised to unit length (PNG quantisation leaves them slightly off), all others (a mid-grey
    (128,128,128) or black (0,0,0) PNG pixel, zeros, NaN) are invalid -> zero vector.
    """
    if values.ndim == 3 and values.shape[0] == 3 and values.shape[-1] != 3:
        values = values.transpose(1, 2, 0)
    if values.ndim != 3 or values.shape[-1] != 3:
        raise DataError(f"normals file {path}: expected an (H, W, 3) or (3, H, W) array, got shape {values.shape}")
    if values.dtype == np.uint8:
        n = values.astype(np.float32) * (2.0 / 255.0) - 1.0
    else:
        n = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = (norm >= 0.5) & (norm <= 1.5)
    return np.where(valid, n / np.where(valid, norm, 1.0), 0.0).astype(np.float32)


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Thin boundary map (float32 {0, 1}) of a label/instance map.

    A pixel is on a boundary when one of its 4-neighbours inside the image has another label; the
    two-pixel-wide band this gives is thinned to one pixel with ``skimage.morphology.thin`` (MATLAB's
    ``bwmorph(.., 'thin', Inf)``). The synthetic scenes' rule; PASCAL-Context's benchmark edges follow the public
    code's :func:`laplacian_boundaries`, which misses pixels whose neighbours' labels happen to sum to 4x its own.
    """
    from skimage.morphology import thin

    lab = np.asarray(labels)
    band = np.zeros(lab.shape, dtype=bool)
    vertical = lab[1:, :] != lab[:-1, :]
    horizontal = lab[:, 1:] != lab[:, :-1]
    band[1:, :] |= vertical
    band[:-1, :] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return thin(band).astype(np.float32)


def laplacian_boundaries(labels: np.ndarray) -> np.ndarray:
    """Thin boundary map (float32 {0, 1}) of a label map as the public PASCAL-Context multi-task benchmark derives
    its edge labels (ASTMT / MTI-Net / InvPT): the pixels where the 4-neighbour Laplacian of the label values
    (OpenCV's ``Laplacian`` at ksize 1, its default border: mirrored without repeating the edge pixel) is not
    zero, thinned with ``skimage.morphology.thin``. The same pixels as their ground truth, bit for bit."""
    from skimage.morphology import thin

    lab = np.asarray(labels, dtype=np.int64)
    pad = np.pad(lab, 1, mode="reflect")  # numpy's "reflect" = OpenCV's BORDER_REFLECT_101
    laplacian = pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:] - 4 * lab
    return thin(laplacian != 0).astype(np.float32)


def to_sample(image: np.ndarray, labels: dict[str, np.ndarray], meta: dict) -> dict:
    """Raw arrays -> the raw sample of tensors: image (3,H,W) float32 in [0,255]; class labels int64 (H,W);
    depth/edge/sal float32 (1,H,W); normals float32 (3,H,W) from (H,W,3)."""
    sample = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
              "meta": meta}
    for task, value in labels.items():
        if task in ("semseg", "parts"):
            sample[task] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
        elif task == "normals":
            sample[task] = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1), dtype=np.float32))
        else:
            sample[task] = torch.from_numpy(np.ascontiguousarray(value[None], dtype=np.float32))
    return sample


class MultiTaskDataset(torch.utils.data.Dataset):
    """Base class: subclasses implement ``__len__`` and ``load(index) -> raw sample`` (see :func:`to_sample`);
    ``__getitem__`` applies ``transform`` (default: :class:`mtlfast.data.transforms.Normalize` only)."""

    name = "base"

    def __init__(self, tasks: Sequence[str] | None, transform: Callable[[dict], dict] | None = None):
        from mtlfast.data.transforms import Normalize

        self.tasks = check_tasks(tasks, self.name)
        self.transform = transform if transform is not None else Normalize()

    def load(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} ({len(self)} items)")
        return self.transform(self.load(index))

    @staticmethod
    def _check_same_size(image_shape, label: np.ndarray, path: Path, image_path: Path) -> None:
        if tuple(label.shape[:2]) != tuple(image_shape[:2]):
            raise DataError(f"label file {path} has size {label.shape[:2]}, its image {image_path} has "
                            f"{tuple(image_shape[:2])}")


def cache_dir() -> Path:
    """Where the datasets keep what is slow to recompute from their files (never inside a dataset root):
    $MTLFAST_CACHE, else $XDG_CACHE_HOME/mtlfast, else ~/.cache/mtlfast."""
    if os.environ.get("MTLFAST_CACHE"):
        return Path(os.environ["MTLFAST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mtlfast"


def resolve_root(root: str | os.PathLike | None, folder: str, aliases: Sequence[str] = ()) -> Path:
    """The dataset folder: ``root`` itself when it is named ``folder`` (or one of ``aliases``: the names the public
    releases unpack to, e.g. NYUD_MT/), else ``root/folder`` (or ``root/<alias>``); root=None reads the
    environment variable MTLFAST_DATA (a folder holding NYUDv2/ and PASCALContext/)."""
    if root is None:
        env = os.environ.get("MTLFAST_DATA")
        if not env:
            raise FileNotFoundError(f"no dataset root given: pass root=<folder containing {folder}/> (data.root=... "
                                    "in a config or on the command line) or set MTLFAST_DATA")
        root = env
    root = Path(root).expanduser()
    names = (folder, *aliases)
    if root.name in names:
        return require_dir(root, "dataset root")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"dataset folder not found: none of {root}, "
                            f"{', '.join(str(root / name) for name in names)} is a {'/ or '.join(names)}/ folder")



class SplitDataset(MultiTaskDataset):
    """A dataset folder whose splits are id lists (NYUD-v2, PASCAL-Context).

    Subclasses name the layout (``folder`` under the data root; ``split_folder`` holding ``<split>.txt`` and
    ``image_folder``, both relative to it), fill ``self.files`` (per id: "image" and each task -> the file
    its label is decoded from) and implement ``read_labels``; every label is checked against the image size.
    """

    folder = split_folder = image_folder = ""
    folder_aliases: tuple[str, ...] = ()  # other names of ``folder``: those the public releases unpack to
    splits = ("train", "val")

    def __init__(self, root, split: str, tasks: Sequence[str] | None, transform: Callable[[dict], dict] | None):
        super().__init__(tasks, transform)
        if split not in self.splits:
            raise ValueError(f"split: unknown split {split!r} for {self.name}; valid: {', '.join(self.splits)}")
        self.root = resolve_root(root, self.folder, self.folder_aliases)
        self.split = split
        self.ids = read_split(require_dir(self.root / self.split_folder, f"{self.folder} split folder")
                              / f"{split}.txt")
        self.image_dir = require_dir(self.root / self.image_folder, f"{self.folder} images")
        self.files: list[dict[str, Path]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def read_labels(self, files: dict[str, Path], image: np.ndarray) -> dict[str, np.ndarray]:
        """The decoded label of every task, from ``files`` (an entry of ``self.files``) and the (H, W, 3) image."""
        raise NotImplementedError

    def load(self, index: int) -> dict:
        files = self.files[index]
        image = read_image(files["image"])
        labels = self.read_labels(files, image)
        for task, label in labels.items():
            self._check_same_size(image.shape, label, files[task], files["image"])
        meta = {"dataset": self.name, "name": self.ids[index], "index": index, "size": tuple(image.shape[:2])}
        return to_sample(image, labels, meta)
