"""PASCAL-Context reader on a miniature dataset in the real layout (jpg/png/mat written by the test): every
label decoded exactly, the human-parts and normals conventions, errors naming the path, no writes."""
import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mtlfast.data import DataError, build_dataset
from mtlfast.data.pascal import HUMAN_PART_GROUPS, NORMALS_CONTEXT_CLASSES, PASCALContext
from data_helpers import identity, snapshot

H, W = 6, 8


def _objects(records):
    """A 1xN MATLAB struct array with PASCAL-Part's object fields (parts: 1xK struct or [])."""
    objs = np.zeros((1, len(records)), dtype=[("class", object), ("class_ind", object), ("mask", object),
                                              ("parts", object)])
    for i, (name, ind, mask, parts) in enumerate(records):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=[("part_name", object), ("mask", object)])
            for j, (pname, pmask) in enumerate(parts):
                arr[0, j] = (pname, pmask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        objs[0, i] = (name, np.array([[ind]], dtype=np.float64), mask.astype(np.uint8), arr)
    return objs


def _mask(*cells):
    m = np.zeros((H, W), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def make_pascal(root, with_json=True):
    base = root / "PASCALContext"
    for sub in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "pascal-context/trainval",
                "human_parts", "normals_distill", "sal_distill"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    truth = {}
    labelmaps = {"a": np.where(np.arange(W)[None, :] < 4, 3, 7) * np.ones((H, 1), dtype=np.uint16),
                 "b": np.full((H, W), 9, dtype=np.uint16), "c": np.full((H, W), 20, dtype=np.uint16)}
    labelmaps["b"][:, 6:] = 20
    parts = {
        "a": [("person", 15, _mask((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)),
               [("head", _mask((0, 0), (0, 1), (1, 0))), ("hair", _mask((1, 1))), ("luarm", _mask((2, 0), (2, 1))),
                ("torso", _mask((2, 1), (3, 1))), ("rlarm", _mask((3, 0))), ("llleg", _mask((4, 0), (4, 1)))]),
              ("person", 15, _mask((0, 5), (0, 6)), []),                       # no part annotation
              ("cat", 8, _mask((5, 5), (5, 6)), [("head", _mask((5, 5), (5, 6), (5, 7)))]),  # not a person
              ("person", 15, _mask((5, 3), (5, 4), (0, 7)),
               [("ruleg", _mask((5, 3))), ("rfoot", _mask((5, 4))), ("neck", _mask((0, 7)))])],
        "b": [("chair", 9, _mask((1, 1)), [])],
        "c": [("person", 15, _mask((2, 2)), [("lhand", _mask((2, 2)))])],
    }
    for stem in ("a", "b", "c"):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(base / "JPEGImages" / f"{stem}.jpg")
        seg = rng.integers(0, 21, (H, W)).astype(np.uint8)
        seg[0, :3] = [0, 20, 255]
        pal = Image.fromarray(seg, mode="P")
        pal.putpalette(list(rng.integers(0, 256, 768)))
        folder = "pascal-context" if stem == "b" else "VOC12"
        pal.save(base / "semseg" / folder / f"{stem}.png")
        if stem == "c":  # also in pascal-context with other values: VOC12 wins
            Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(base / "semseg" / "pascal-context" / "c.png")
        scipy.io.savemat(base / "pascal-context" / "trainval" / f"{stem}.mat", {"LabelMap": labelmaps[stem]})
        scipy.io.savemat(base / "human_parts" / f"{stem}.mat",
                         {"anno": {"imname": stem, "objects": _objects(parts[stem])}})
        normals = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        normals[0, 0] = [128, 128, 255]
        Image.fromarray(normals).save(base / "normals_distill" / f"{stem}.png")
        sal = rng.integers(0, 256, (H, W), dtype=np.uint8)
        sal[0, :4] = [0, 127, 128, 255]
        Image.fromarray(sal).save(base / "sal_distill" / f"{stem}.png")
        truth[stem] = {"seg": seg, "normals": normals, "sal": sal, "labelmap": labelmaps[stem]}
    (base / "ImageSets" / "Context" / "train.txt").write_text("a\nb\n")
    (base / "ImageSets" / "Context" / "val.txt").write_text("c\n")
    if with_json:
        (base / "json").mkdir()
        (base / "json" / "nyu_classes.json").write_text(json.dumps(["wall", "floor", "unknown", "bed"]))
        (base / "json" / "context_classes.json").write_text(
            json.dumps({"wall": 3, "floor": 12, "cat": 7, "tvmonitor": 9, "unknown": 0, "sky": 20}))
    return base, truth


def _decode_normals(values):
    n = values.astype(np.float64) * 2 / 255 - 1
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where((length >= 0.5) & (length <= 1.5), n / np.maximum(length, 1e-9), 0)


def test_every_label_decoded(tmp_path):
    base, truth = make_pascal(tmp_path)
    before = snapshot(base)
    ds = PASCALContext(tmp_path, split="train", transform=identity)
    assert ds.tasks == ("semseg", "parts", "sal", "normals", "edge") and ds.ids == ["a", "b"]
    a, b = ds[0], ds[1]
    assert a["meta"] == {"dataset": "pascal", "name": "a", "index": 0, "size": (H, W)}
    stored = np.asarray(Image.open(base / "JPEGImages" / "a.jpg").convert("RGB"))
    assert np.array_equal(a["image"].permute(1, 2, 0).numpy(), stored.astype(np.float32))
    # semseg: palette indices as stored (0..20, 255)
    for s, stem in ((a, "a"), (b, "b")):
        assert torch.equal(s["semseg"], torch.from_numpy(truth[stem]["seg"].astype(np.int64)))
        assert s["semseg"][0, :3].tolist() == [0, 20, 255]
    # edge: the LabelMap boundary between columns 3 and 4, thinned to one pixel (thinning also trims the
    # line's end at the top border); b's boundary between columns 5 and 6 likewise
    expected = np.zeros((H, W), dtype=np.float32)
    expected[1:, 3] = 1
    assert np.array_equal(a["edge"][0].numpy(), expected)
    expected = np.zeros((H, W), dtype=np.float32)
    expected[1:, 5] = 1
    assert np.array_equal(b["edge"][0].numpy(), expected)
    # parts: groups painted in file order; person without parts, cat head: background
    expected = np.zeros((H, W), dtype=np.int64)
    expected[0, :2] = expected[1, :2] = 1   # head, hair
    expected[2, 0] = 3                      # upper arm
    expected[2, 1] = expected[3, 1] = 2     # torso painted after the arm
    expected[3, 0] = 4                      # lower arm
    expected[4, :2] = 6                     # lower leg
    expected[5, 3], expected[5, 4], expected[0, 7] = 5, 6, 2  # upper leg, foot, neck
    assert np.array_equal(a["parts"].numpy(), expected)
    assert torch.all(b["parts"] == 255)  # no annotated person: ignored (MTI-Net / InvPT AddIgnoreRegions)
    # normals: 2v/255-1, unit, kept on NYU classes only (a: wall=3 on the left, cat=7 on the right;
    # b: tvmonitor=9 kept, sky=20 dropped)
    for s, stem in ((a, "a"), (b, "b")):
        decoded = _decode_normals(truth[stem]["normals"])
        keep = np.isin(truth[stem]["labelmap"], [3, 12, 9])
        assert np.allclose(s["normals"].permute(1, 2, 0).numpy(), np.where(keep[..., None], decoded, 0), atol=1e-6)
    e = 1 / 255  # (128, 128, 255) -> (1/255, 1/255, 1), then unit length
    assert np.allclose(a["normals"][:, 0, 0].numpy(), np.array([e, e, 1]) / np.sqrt(2 * e * e + 1), atol=1e-6)
    assert torch.all(a["normals"][:, :, 4:] == 0) and torch.all(b["normals"][:, :, 6:] == 0)
    # saliency: v/255 > 0.5
    for s, stem in ((a, "a"), (b, "b")):
        assert np.array_equal(s["sal"][0].numpy(), (truth[stem]["sal"] > 127.5).astype(np.float32))
    assert a["sal"][0, 0, :4].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert snapshot(base) == before


def test_val_split_prefers_voc12_and_pads(tmp_path):
    base, truth = make_pascal(tmp_path)
    ds = build_dataset("pascal_context", root=base, split="val", tasks=["semseg", "parts"])
    s = ds[0]
    # one pad size for every image (data.EVAL_PAD): a prediction cannot depend on which images share a batch
    assert s["image"].shape == (3, 512, 512) and s["meta"]["size"] == (H, W)
    assert torch.equal(s["semseg"][:H, :W], torch.from_numpy(truth["c"]["seg"].astype(np.int64)))
    expected = np.zeros((H, W), dtype=np.int64)
    expected[2, 2] = HUMAN_PART_GROUPS["lhand"]
    assert np.array_equal(s["parts"][:H, :W].numpy(), expected) and torch.all(s["parts"][H:] == 255)


def test_normals_without_class_lists_use_the_protocol_set(tmp_path):
    """A folder without json/ (the public code bases ship the class lists with their code): the built-in set of the
    protocol's NYU classes masks the normals, on every split."""
    base, truth = make_pascal(tmp_path, with_json=False)
    ids = set(NORMALS_CONTEXT_CLASSES.values())
    assert len(ids) == len(NORMALS_CONTEXT_CLASSES) == 170 and ids <= set(range(1, 460))
    assert NORMALS_CONTEXT_CLASSES["tvmonitor"] == 427 and "unknown" not in NORMALS_CONTEXT_CLASSES
    assert {3, 9} <= ids and not {7, 20} & ids  # the LabelMap ids of the miniature images: kept / masked
    for split, stem in (("train", "a"), ("val", "c")):
        ds = PASCALContext(base, split=split, tasks=["normals"], transform=identity)
        kept = np.isin(truth[stem]["labelmap"], list(ids))[..., None]
        expected = np.where(kept, _decode_normals(truth[stem]["normals"]), 0)
        assert np.allclose(ds[0]["normals"].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    base, _ = make_pascal(tmp_path)
    (base / "human_parts" / "b.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"human_parts.b\.mat"):
        PASCALContext(base, split="train")
    ds = PASCALContext(base, split="train", tasks=["semseg", "edge", "sal"], transform=identity)
    (base / "pascal-context" / "trainval" / "a.mat").write_bytes(b"MATLAB 5.0 garbage" * 20)
    with pytest.raises(DataError, match=r"trainval.a\.mat"):
        ds[0]
    scipy.io.savemat(base / "pascal-context" / "trainval" / "a.mat", {"Other": np.zeros((H, W))})
    with pytest.raises(DataError, match="no variable 'LabelMap'"):
        ds[0]
    Image.fromarray(np.full((H, W), 21, dtype=np.uint8)).save(base / "semseg" / "VOC12" / "a.png")
    ds = PASCALContext(base, split="train", tasks=["semseg"], transform=identity)
    with pytest.raises(DataError, match="outside 0..20"):
        ds[0]
    (base / "semseg" / "pascal-context" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        PASCALContext(base, split="train", tasks=["semseg"])
    (base / "JPEGImages" / "c.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"JPEGImages.c\.jpg"):
        PASCALContext(base, split="val", tasks=["sal"])
    for f in (base / "JPEGImages").iterdir():
        f.unlink()
    (base / "JPEGImages").rmdir()
    with pytest.raises(FileNotFoundError, match="PASCALContext images: folder not found"):
        PASCALContext(base, split="val", tasks=["sal"])


def test_human_parts_errors(tmp_path):
    base, _ = make_pascal(tmp_path)
    scipy.io.savemat(base / "human_parts" / "c.mat",
                     {"anno": {"imname": "c", "objects": _objects([("person", 15, _mask((1, 1)),
                                                                     [("tail", _mask((1, 1)))])])}})
    ds = PASCALContext(base, split="val", tasks=["parts"], transform=identity)
    with pytest.raises(DataError, match="unknown person part 'tail'"):
        ds[0]
    big = np.zeros((H + 1, W), dtype=bool)
    scipy.io.savemat(base / "human_parts" / "c.mat",
                     {"anno": {"imname": "c", "objects": _objects([("person", 15, big, [("head", big)])])}})
    with pytest.raises(DataError, match="part mask of shape"):
        ds[0]
    scipy.io.savemat(base / "human_parts" / "c.mat", {"something": np.zeros(3)})
    with pytest.raises(DataError, match="'anno' struct"):
        ds[0]


def test_public_archive_folder_name(tmp_path):
    """PASCAL_MT/ (the name the public archive unpacks to) is read as PASCALContext/, under the root or as it."""
    base, _ = make_pascal(tmp_path)
    base.rename(tmp_path / "PASCAL_MT")
    for root in (tmp_path, tmp_path / "PASCAL_MT"):
        assert PASCALContext(root, split="val", tasks=["semseg"]).root == tmp_path / "PASCAL_MT"
    with pytest.raises(FileNotFoundError, match=r"none of .*JPEGImages, .*JPEGImages.PASCALContext, "
                       r".*JPEGImages.PASCAL_MT is a PASCALContext/ or PASCAL_MT/ folder"):
        PASCALContext(tmp_path / "PASCAL_MT" / "JPEGImages")


def test_laplacian_boundaries_are_the_public_rule():
    """PASCAL's edge labels: pixels whose 4-neighbour Laplacian (OpenCV ksize 1, border mirrored without repeating
    the edge pixel) is non-zero, then thinned: equal to that formula written per pixel, on random maps where label
    values cancel; a pixel between labels 3 and 5 with label 4 is no edge (as in the public ground truth)."""
    from skimage.morphology import thin

    from mtlfast.data.base import label_boundaries, laplacian_boundaries

    def mirror(i, n):
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    rng = np.random.default_rng(5)
    for shape in ((7, 9), (12, 5), (16, 16)):
        lab = rng.integers(0, 4, shape) * rng.integers(1, 3, shape)
        h, w = shape
        band = np.zeros(shape, dtype=bool)
        for y in range(h):
            for x in range(w):
                around = (lab[mirror(y - 1, h), x] + lab[mirror(y + 1, h), x] + lab[y, mirror(x - 1, w)]
                          + lab[y, mirror(x + 1, w)])
                band[y, x] = around - 4 * lab[y, x] != 0
        assert np.array_equal(laplacian_boundaries(lab.astype(np.uint16)), thin(band).astype(np.float32))
    lab = np.repeat(np.array([[3, 3, 4, 5, 5]]), 4, axis=0)
    assert laplacian_boundaries(lab)[:, 2].sum() == 0 and label_boundaries(lab)[:, 2].sum() > 0


def test_edges_of_the_dataset_follow_the_public_rule(tmp_path):
    """PASCALContext's edge labels are laplacian_boundaries of the LabelMap (a map where the two rules differ)."""
    from mtlfast.data.base import label_boundaries, laplacian_boundaries

    base, _ = make_pascal(tmp_path)
    labelmap = np.repeat(np.array([[3, 3, 4, 5, 5, 9, 9, 9]], dtype=np.uint16), H, axis=0)  # W = 8 columns
    scipy.io.savemat(base / "pascal-context" / "trainval" / "c.mat", {"LabelMap": labelmap})
    edge = PASCALContext(base, split="val", tasks=["edge"], transform=identity)[0]["edge"][0].numpy()
    assert np.array_equal(edge, laplacian_boundaries(labelmap))
    assert not np.array_equal(edge, label_boundaries(labelmap))


def test_parts_alone_keeps_the_images_that_show_a_person(tmp_path, monkeypatch):
    """tasks=["parts"]: images without a person (an object of class 15 with a non-empty mask, with or without part
    annotations) are left out, as ASTMT / MTI-Net's single-task parts; with another task they stay (all 255). Their
    object lists (ImageSets/Parts/<split>.txt) are used where the archive has them; otherwise the scan is cached in
    $MTLFAST_CACHE (not in the dataset root) and redone for a file that changed."""
    from mtlfast.data import pascal
    from mtlfast.data.base import cache_dir

    monkeypatch.delenv("MTLFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mtlfast"
    monkeypatch.setenv("MTLFAST_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    base, _ = make_pascal(tmp_path / "data")
    before = snapshot(base)
    alone = PASCALContext(base, split="train", tasks=["parts"])
    assert alone.ids == ["a"] and len(alone.files) == 1 and alone.files[0]["parts"].name == "a.mat"
    assert PASCALContext(base, split="train", tasks=["parts", "sal"]).ids == ["a", "b"]
    assert len(list((tmp_path / "cache").glob("pascal_persons-*.json"))) == 1 and snapshot(base) == before
    reads = []
    monkeypatch.setattr(pascal, "read_mat", lambda path: reads.append(path) or pytest.fail("cache not used"))
    assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["a"] and not reads
    (base / "ImageSets" / "Parts").mkdir()  # the public code's object lists: used, no file read
    (base / "ImageSets" / "Parts" / "train.txt").write_text(json.dumps({"a": [-1, 8], "b": [15]}))
    assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["b"] and not reads
    (base / "ImageSets" / "Parts" / "train.txt").write_text(json.dumps({"a": [15]}))  # b missing: not used
    assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["a"] and not reads
    (base / "ImageSets" / "Parts" / "train.txt").write_text("a -1\nb 15\n")  # not their JSON: not used
    assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["a"] and not reads
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("")  # a cache that cannot be written: scanned, with a warning
    monkeypatch.setenv("MTLFAST_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(UserWarning, match=r"could not keep the PASCAL-Part person scan in .*a_file.cache.* it runs "
                                         "again next time"):
        assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["a"]
    monkeypatch.setenv("MTLFAST_CACHE", str(tmp_path / "cache"))
    (base / "ImageSets" / "Parts" / "train.txt").unlink()
    scipy.io.savemat(base / "human_parts" / "b.mat",  # b gets a person without part annotations: scanned again
                     {"anno": {"imname": "b", "objects": _objects([("person", 15, _mask((1, 1)), [])])}})
    assert PASCALContext(base, split="train", tasks=["parts"]).ids == ["a", "b"]
    scipy.io.savemat(base / "human_parts" / "c.mat",  # a person with an empty mask shows no person
                     {"anno": {"imname": "c", "objects": _objects([("person", 15, _mask(), [])])}})
    with pytest.raises(DataError, match="split 'val': no image shows a person"):
        PASCALContext(base, split="val", tasks=["parts"])
