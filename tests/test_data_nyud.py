"""NYUD-v2 reader on a miniature dataset in the real layout, written by the test: every label decoded
exactly, splits, evaluation padding, errors naming the path, and no write into the dataset root."""
import numpy as np
import pytest
import torch
from PIL import Image

from mtlfast.data import DataError, build_dataset
from mtlfast.data.nyud import NYUDv2
from data_helpers import identity, snapshot

H, W = 5, 7


def _unit(v):
    n = np.asarray(v, dtype=np.float64)
    return n / np.linalg.norm(n)


def make_nyud(root):
    """Three images: 0001 (png image, png normals, png edge), 0002 (jpg image, npy normals / edge), 0003 (val)."""
    base = root / "NYUDv2"
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for stem in ("0001", "0002", "0003"):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
        seg[0, :4] = [0, 1, 40, 17]
        depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[1, :4] = [0.0, np.nan, -1.0, np.inf]
        ext = ".jpg" if stem == "0002" else ".png"
        Image.fromarray(image).save(base / "images" / f"{stem}{ext}")
        Image.fromarray(seg).save(base / "segmentation" / f"{stem}.png")
        np.save(base / "depth" / f"{stem}.npy", depth)
        truth[stem] = {"image": image, "seg": seg, "depth": depth}
        if stem == "0002":
            normals = rng.normal(size=(H, W, 3)).astype(np.float32)
            normals[0, 0] = 0.0
            normals[0, 1] = [0.3, 0.0, 0.0]  # too short: invalid
            np.save(base / "normals" / f"{stem}.npy", normals)
            edge = (rng.uniform(size=(H, W)) > 0.6).astype(np.float32)
            edge[0, :3] = [0.7, 255.0, 0.2]
            np.save(base / "edge" / f"{stem}.npy", edge)
        else:
            normals = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            normals[0, :3] = [[255, 128, 128], [128, 128, 128], [0, 0, 0]]
            Image.fromarray(normals).save(base / "normals" / f"{stem}.png")
            edge = np.where(rng.uniform(size=(H, W)) > 0.6, 255, 0).astype(np.uint8)
            edge[0, :2] = [200, 100]
            Image.fromarray(edge).save(base / "edge" / f"{stem}.png")
        truth[stem].update(normals=normals, edge=edge)
    (base / "gt_sets" / "train.txt").write_text("0001\n0002\n\n")
    (base / "gt_sets" / "val.txt").write_text("0003\n")
    return base, truth


def test_every_label_decoded(tmp_path):
    base, truth = make_nyud(tmp_path)
    before = snapshot(base)
    ds = NYUDv2(tmp_path, split="train", transform=identity)
    assert len(ds) == 2 and ds.ids == ["0001", "0002"] and ds.tasks == ("semseg", "depth", "normals", "edge")
    for index, stem in enumerate(ds.ids):
        s, t = ds[index], truth[stem]
        assert s["meta"] == {"dataset": "nyud", "name": stem, "index": index, "size": (H, W)}
        image = s["image"].permute(1, 2, 0).numpy()
        stored = t["image"] if stem == "0001" else np.asarray(Image.open(base / "images" / f"{stem}.jpg"))  # lossy
        assert np.array_equal(image, stored.astype(np.float32))
        seg = t["seg"].astype(np.int64)
        assert torch.equal(s["semseg"], torch.from_numpy(np.where(seg == 0, 255, seg - 1)))
        assert s["semseg"][0, :4].tolist() == [255, 0, 39, 16]
        depth = t["depth"]
        expected = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
        assert torch.equal(s["depth"][0], torch.from_numpy(expected))
        assert s["depth"][0, 1, :4].tolist() == [0.0, 0.0, 0.0, 0.0]
        normals = s["normals"].permute(1, 2, 0).numpy()
        if stem == "0001":
            raw = t["normals"].astype(np.float64) * 2 / 255 - 1
            assert np.allclose(normals[0, 0], _unit([1.0, 1 / 255, 1 / 255]), atol=1e-6)
            assert np.all(normals[0, 1] == 0) and np.all(normals[0, 2] == 0)  # mid-grey, black: invalid
        else:
            raw = t["normals"].astype(np.float64)
            assert np.all(normals[0, 0] == 0) and np.all(normals[0, 1] == 0)
        length = np.linalg.norm(raw, axis=-1, keepdims=True)
        valid = (length >= 0.5) & (length <= 1.5)
        assert np.allclose(normals, np.where(valid, raw / np.maximum(length, 1e-9), 0), atol=1e-6)
        edge = s["edge"][0].numpy()
        if stem == "0001":
            assert np.array_equal(edge, (t["edge"] >= 128).astype(np.float32))
            assert edge[0, :2].tolist() == [1.0, 0.0]
        else:
            expected = np.where(t["edge"] == 255, 255, (t["edge"] >= 0.5).astype(np.float32))
            assert np.array_equal(edge, expected)
            assert edge[0, :3].tolist() == [1.0, 255.0, 0.0]
    assert snapshot(base) == before  # nothing written
    # an (H, W, 1) edge .npy reads as the (H, W) one
    np.save(base / "edge" / "0002.npy", truth["0002"]["edge"][..., None])
    assert torch.equal(ds[1]["edge"], s["edge"])
    # a channel-first (3, H, W) normals .npy and an RGBA normals png read as the (H, W, 3) / RGB ones
    np.save(base / "normals" / "0002.npy", truth["0002"]["normals"].transpose(2, 0, 1))
    assert torch.equal(ds[1]["normals"], s["normals"])
    first = ds[0]["normals"]
    Image.fromarray(np.dstack([truth["0001"]["normals"], np.full((H, W), 7, np.uint8)])).save(
        base / "normals" / "0001.png")
    assert torch.equal(ds[0]["normals"], first)
    np.save(base / "normals" / "0002.npy", truth["0002"]["normals"][..., :2])
    with pytest.raises(DataError, match=r"normals file .*0002\.npy: expected an \(H, W, 3\) or \(3, H, W\) array, "
                                        r"got shape \(5, 7, 2\)"):
        ds[1]
    # a 0/1 edge png (not 0/255) keeps its edges
    Image.fromarray((truth["0001"]["edge"] >= 128).astype(np.uint8)).save(base / "edge" / "0001.png")
    assert np.array_equal(ds[0]["edge"][0].numpy(), (truth["0001"]["edge"] >= 128).astype(np.float32))
    # 0/1 with 255 (ignore, as in the npy files, or a 0/255 map with stray 1s?) is refused, not guessed
    ones = (truth["0001"]["edge"] >= 128).astype(np.uint8)
    ones[2, :3] = 255
    Image.fromarray(ones).save(base / "edge" / "0001.png")
    with pytest.raises(DataError, match=r"edge.0001\.png: values 0, 1 and 255 only"):
        ds[0]


def test_astmt_archive_layout(tmp_path):
    """ASTMT's NYUD_MT archive: the folder name, .mat segmentation (variable segmentation, 0 = unlabelled) and
    depth (variable depth), .jpg normals; decoded as the other archive's files. Errors name the file."""
    import scipy.io

    base = tmp_path / "NYUD_MT"
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
    depth = rng.uniform(0.5, 9.0, (H, W))
    depth[0, 0] = 0.0
    normals = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(base / "images" / "0001.jpg")
    Image.fromarray(np.where(rng.uniform(size=(H, W)) > 0.6, 255, 0).astype(np.uint8)).save(base / "edge" / "0001.png")
    scipy.io.savemat(base / "segmentation" / "0001.mat", {"segmentation": seg})
    scipy.io.savemat(base / "depth" / "0001.mat", {"depth": depth})  # float64, as MATLAB writes it
    Image.fromarray(normals).save(base / "normals" / "0001.jpg", quality=95)
    (base / "gt_sets" / "val.txt").write_text("0001\n")
    for root in (tmp_path, base):  # the folder under the root, or the root itself
        s = NYUDv2(root, split="val", transform=identity)[0]
        assert torch.equal(s["semseg"], torch.from_numpy(np.where(seg == 0, 255, seg.astype(np.int64) - 1)))
        assert torch.equal(s["depth"][0], torch.from_numpy(depth.astype(np.float32)))
        stored = np.asarray(Image.open(base / "normals" / "0001.jpg")).astype(np.float64) * 2 / 255 - 1  # lossy
        length = np.linalg.norm(stored, axis=-1, keepdims=True)
        valid = (length >= 0.5) & (length <= 1.5)
        assert np.allclose(s["normals"].permute(1, 2, 0).numpy(), np.where(valid, stored / length, 0), atol=1e-6)
    scipy.io.savemat(base / "segmentation" / "0001.mat", {"labels": seg})
    with pytest.raises(DataError, match=r"segmentation.0001\.mat: no variable 'segmentation' \(it holds labels\)"):
        NYUDv2(base, split="val")[0]
    scipy.io.savemat(base / "segmentation" / "0001.mat", {"segmentation": seg + 0.5})
    with pytest.raises(DataError, match=r"segmentation.0001\.mat: non-integer or non-finite class ids"):
        NYUDv2(base, split="val")[0]
    scipy.io.savemat(base / "segmentation" / "0001.mat", {"segmentation": np.full((H, W), np.inf)})
    with pytest.raises(DataError, match=r"segmentation.0001\.mat: non-integer or non-finite class ids"):
        NYUDv2(base, split="val")[0]
    scipy.io.savemat(base / "segmentation" / "0001.mat", {"segmentation": np.full((H, W), 41.0)})
    with pytest.raises(DataError, match=r"segmentation.0001\.mat: values \[41\] outside 0..40"):
        NYUDv2(base, split="val")[0]


def test_val_split_padding_and_task_subset(tmp_path):
    base, truth = make_nyud(tmp_path)
    ds = build_dataset("nyud", root=base, split="val", tasks=["depth", "semseg"])
    assert len(ds) == 1
    s = ds[0]
    assert set(s) == {"image", "meta", "depth", "semseg"}
    assert s["image"].shape == (3, 32, 32) and s["meta"]["size"] == (H, W)
    assert torch.all(s["semseg"][H:] == 255) and torch.all(s["depth"][:, :, W:] == 0)
    seg = truth["0003"]["seg"].astype(np.int64)
    assert torch.equal(s["semseg"][:H, :W], torch.from_numpy(np.where(seg == 0, 255, seg - 1)))
    train = build_dataset("nyud", root=tmp_path, split="train", size=(4, 6))
    assert train[1]["image"].shape == (3, 4, 6)


def test_root_from_environment(tmp_path, monkeypatch):
    make_nyud(tmp_path)
    monkeypatch.setenv("MTLFAST_DATA", str(tmp_path))
    assert len(NYUDv2(split="val")) == 1
    monkeypatch.delenv("MTLFAST_DATA")
    with pytest.raises(FileNotFoundError, match="MTLFAST_DATA"):
        NYUDv2(split="val")


def test_missing_folders_and_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="NYUDv2"):
        NYUDv2(tmp_path / "nowhere")
    base, _ = make_nyud(tmp_path)
    (base / "edge" / "0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"edge.0001"):
        NYUDv2(base, split="train")
    assert len(NYUDv2(base, split="train", tasks=["semseg", "depth"])) == 2  # edge not needed
    for f in (base / "edge").iterdir():
        f.unlink()
    (base / "edge").rmdir()
    with pytest.raises(FileNotFoundError, match="edge labels: folder not found"):
        NYUDv2(base, split="val")
    (base / "gt_sets" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        NYUDv2(base, split="val", tasks=["semseg"])
    with pytest.raises(ValueError, match="split: unknown split 'test' for nyud; valid: train, val"):
        NYUDv2(base, split="test")


def test_corrupt_files_name_the_path(tmp_path):
    base, _ = make_nyud(tmp_path)
    (base / "gt_sets" / "val.txt").write_bytes(b"\xff\xfe0\x003\x00")  # UTF-16, not the ids' text
    with pytest.raises(DataError, match=r"split file .*gt_sets.val\.txt: not a text file of image ids"):
        NYUDv2(base, split="val")
    ds = NYUDv2(base, split="train", transform=identity)
    (base / "segmentation" / "0001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"segmentation.0001\.png"):
        ds[0]
    (base / "depth" / "0002.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"depth.0002\.npy"):
        ds[1]
    np.save(base / "depth" / "0002.npy", np.full((H, W), 2500.0, dtype=np.float32))  # millimetres
    with pytest.raises(DataError, match=r"depth.0002\.npy: values up to 2500, expected metres .*millimetres"):
        ds[1]
    bad = np.full((H, W), 41, dtype=np.uint8)
    Image.fromarray(bad).save(base / "segmentation" / "0001.png")
    with pytest.raises(DataError, match="outside 0..40"):
        ds[0]
    Image.fromarray(np.zeros((H + 1, W), dtype=np.uint8)).save(base / "segmentation" / "0001.png")
    with pytest.raises(DataError, match="has size"):
        ds[0]
