"""The synthetic dataset: deterministic, any size, labels consistent across the six tasks and with the
geometry, and learnable by a small CNN."""
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from mtlfast.data import build_dataset, collate, num_outputs
from mtlfast.data.synthetic import SYNTHETIC_CLASSES, render_scene
from mtlfast.losses import MultiTaskLoss


def test_deterministic_from_seed_split_index():
    a, b = render_scene(3, 7, (24, 32)), render_scene(3, 7, (24, 32))
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["image"], render_scene(3, 8, (24, 32))["image"])
    assert not np.array_equal(a["image"], render_scene(4, 7, (24, 32))["image"])
    assert not np.array_equal(a["image"], render_scene(3, 7, (24, 32), split="val")["image"])


@pytest.mark.parametrize("size", [(5, 3), (17, 23)])
def test_any_size(size):
    s = render_scene(0, 1, size)
    assert s["image"].shape == (*size, 3) and s["image"].dtype == np.uint8
    assert s["normals"].shape == (*size, 3)
    for key in ("semseg", "parts", "depth", "edge", "sal"):
        assert s[key].shape == size


def test_size_argument():
    from mtlfast.data.synthetic import SyntheticDataset

    assert SyntheticDataset(size=17, length=1).size == (17, 17)
    for bad in (1, (1, 5), (4, 4, 4)):
        with pytest.raises(ValueError, match=r"size: expected \(height, width\) >= 2"):
            SyntheticDataset(size=bad)


def _backproject(depth, f, size):
    h, w = size
    u = (np.arange(w) + 0.5 - w / 2) / f
    v = (np.arange(h) + 0.5 - h / 2) / f
    return np.stack([u[None, :] * depth, v[:, None] * depth, depth], -1)


def test_labels_consistent_across_tasks():
    for index in range(4):
        s = render_scene(0, index, (48, 64))
        semseg, parts, inst = s["semseg"], s["parts"], s["instances"]
        assert semseg.min() >= 0 and semseg.max() < len(SYNTHETIC_CLASSES)
        assert parts.min() >= 0 and parts.max() <= 6
        person = semseg == SYNTHETIC_CLASSES.index("person")
        assert np.array_equal(parts > 0, person)
        assert np.array_equal(s["sal"] == 1, semseg >= SYNTHETIC_CLASSES.index("box"))
        assert np.all(np.isfinite(s["depth"])) and np.all(s["depth"] > 0)
        assert np.allclose(np.linalg.norm(s["normals"], axis=-1), 1.0, atol=1e-5)
        rays = _backproject(np.ones((48, 64)), s["focal"], (48, 64))
        assert np.all((s["normals"] * rays).sum(-1) < 0)  # normals face the camera
        # edges: every edge pixel has a 4-neighbour of another instance, and every pair of 4-neighbours of
        # different instances has an edge pixel close by (thinning moves the line by at most a pixel, a
        # little more at junctions)
        pad = np.pad(inst, 1, mode="edge")
        differs = np.zeros(inst.shape, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            differs |= pad[dy:dy + 48, dx:dx + 64] != inst
        assert s["edge"].sum() > 0 and np.all(differs[s["edge"] == 1])
        dist = distance_transform_edt(s["edge"] == 0)
        assert np.minimum(dist[:, 1:], dist[:, :-1])[inst[:, 1:] != inst[:, :-1]].max() <= 5 ** 0.5
        assert np.minimum(dist[1:], dist[:-1])[inst[1:] != inst[:-1]].max() <= 5 ** 0.5


def test_normals_agree_with_depth_geometry():
    """The normal of a pixel is perpendicular to the surface through its back-projected right and lower
    neighbours: to float32 precision on flat patches (same primitive, same normal: room, box faces), to
    within a few degrees on balls."""
    size = (60, 80)
    flat_count = ball_count = 0
    for index in range(4):
        s = render_scene(1, index, size)
        p = _backproject(s["depth"].astype(np.float64), s["focal"], size)
        surf, n = s["surfaces"], s["normals"]
        n_fd = np.cross(p[:-1, 1:] - p[:-1, :-1], p[1:, :-1] - p[:-1, :-1])
        n_fd /= np.linalg.norm(n_fd, axis=-1, keepdims=True)
        angle = np.degrees(np.arccos(np.clip(np.abs((n_fd * n[:-1, :-1]).sum(-1)), 0, 1)))
        same = (surf[:-1, :-1] == surf[1:, :-1]) & (surf[:-1, :-1] == surf[:-1, 1:])
        flat = (same & (np.abs(n[:-1, :-1] - n[1:, :-1]).max(-1) < 1e-5)
                & (np.abs(n[:-1, :-1] - n[:-1, 1:]).max(-1) < 1e-5))
        assert angle[flat].max() < 0.5
        flat_count += flat.sum()
        # a ball's points P and normals n satisfy P = c + r n for one centre c and radius r
        for k in np.unique(surf[s["semseg"] == SYNTHETIC_CLASSES.index("ball")]):
            mask = surf == k
            if mask.sum() < 4:
                continue
            a = np.concatenate([np.tile(np.eye(3), (mask.sum(), 1)), n[mask].reshape(-1, 1)], 1)
            solution, *_ = np.linalg.lstsq(a, p[mask].reshape(-1), rcond=None)
            assert np.abs(a @ solution - p[mask].reshape(-1)).max() < 1e-4 * p[mask][:, 2].max()
            assert solution[3] > 0
            ball_count += 1
    assert flat_count > 0.8 * 4 * 59 * 79 and ball_count >= 1


def test_dataset_items_follow_the_sample_format():
    ds = build_dataset("synthetic", split="val", length=3, size=(40, 56))
    assert len(ds) == 3 and ds.tasks == ("semseg", "depth", "normals", "edge", "parts", "sal")
    item = ds[2]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32  # padded to /32
    assert item["meta"]["size"] == (40, 56) and item["meta"]["name"] == "val_000002"
    assert item["semseg"].dtype == torch.int64 and item["semseg"].shape == (64, 64)
    assert item["depth"].shape == (1, 64, 64) and item["normals"].shape == (3, 64, 64)
    assert torch.all(item["semseg"][40:] == 255) and torch.all(item["depth"][:, :, 56:] == 0)
    train = build_dataset("synthetic", split="train", tasks=["semseg", "depth"], length=2)
    item = train[0]
    assert set(item) == {"image", "meta", "semseg", "depth"} and item["image"].shape == (3, 64, 64)
    with pytest.raises(IndexError, match=r"index 2 out of range for synthetic \(2 items\)"):
        train[2]


def test_small_cnn_learns_the_synthetic_tasks():
    """A 4-layer CNN trained for 60 Adam steps on 64 scenes of 32x32 cuts the semseg, depth and normals
    losses by a third or more (saliency needs longer: ~400 steps halve it)."""
    torch.manual_seed(0)
    tasks = ["semseg", "depth", "normals"]
    ds = build_dataset("synthetic", split="train", tasks=tasks, size=(32, 32), augment=False, length=64)
    data = collate([ds[i] for i in range(len(ds))])
    heads = [num_outputs(t, "synthetic") for t in tasks]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=2, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=4, dilation=4), torch.nn.ReLU(),
        torch.nn.Conv2d(24, sum(heads), 1))
    criterion = MultiTaskLoss(tasks)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def run(batch):
        return criterion(dict(zip(tasks, net(batch["image"]).split(heads, dim=1))), batch)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on the shared CI machine
    try:
        with torch.no_grad():
            _, start = run(data)
        for _ in range(60):
            idx = torch.randint(0, len(ds), (16,))
            loss, _ = run({k: v[idx] for k, v in data.items() if k != "meta"})
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, end = run(data)
    finally:
        torch.set_num_threads(threads)
    for task in tasks:
        assert end[task] < 0.7 * start[task], (task, start[task].item(), end[task].item())


def test_scenes_without_a_person_ignore_parts():
    """As PASCAL-Context's reader: a scene with no part pixel has parts 255 everywhere (not scored as pure
    background); a scene with a person keeps its part labels."""
    from mtlfast.data.synthetic import render_scene

    ds = build_dataset("synthetic", split="val", tasks=["parts"], length=24)
    has_person = [bool(render_scene(ds.seed, i, ds.size, "val")["parts"].any()) for i in range(len(ds))]
    assert any(has_person) and not all(has_person), has_person
    for i, person in enumerate(has_person):
        h, w = ds[i]["meta"]["size"]
        parts = ds[i]["parts"][:h, :w]
        assert (parts != 255).all() if person else (parts == 255).all(), i
