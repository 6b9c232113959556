"""`mtlfast data`: every sample decoded once, label statistics equal to what the readers decode, failing files
listed (the others still read), the same report for any number of workers, and nothing written into the root."""
import json

import numpy as np
import pytest
import torch

from mtlfast.cli import main
from mtlfast.data.nyud import NYUDv2
from mtlfast.data.pascal import PASCALContext
from data_helpers import identity, snapshot
from test_data_nyud import make_nyud
from test_data_pascal import make_pascal


def _run(capsys, root, dataset, tasks, *extra):
    code = main(["data", f"data.dataset={dataset}", f"data.root={root}", f"data.tasks=[{', '.join(tasks)}]",
                 *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _expected(samples, task, classes):
    """The statistics of ``task`` computed directly from the reader's decoded samples."""
    labels = [s[task] for s in samples]
    pixels = sum(t.numel() if task != "normals" else t[0].numel() for t in labels)
    if task in ("semseg", "parts"):
        valid = torch.cat([t[t != 255] for t in labels])
        counts = torch.bincount(valid, minlength=classes).tolist()
        return {"valid_share": valid.numel() / pixels, "class_shares": [c / valid.numel() for c in counts],
                "classes_never_seen": [c for c, n in enumerate(counts) if n == 0]}
    if task == "depth":
        valid = torch.cat([t[t > 0] for t in labels]).double()
        return {"valid_share": valid.numel() / pixels, "min": valid.min().item(), "max": valid.max().item(),
                "mean": valid.mean().item()}
    if task == "normals":
        return {"valid_share": sum(int((t.abs().sum(0) > 0).sum()) for t in labels) / pixels}
    valid = torch.cat([t[t != 255] for t in labels])
    return {"valid_share": valid.numel() / pixels, "positive_share": (valid > 0.5).sum().item() / valid.numel()}


def _assert_equal(got, want, task):
    assert got.keys() == want.keys(), task
    for key, value in want.items():
        assert got[key] == (value if key == "classes_never_seen" else pytest.approx(value, rel=1e-9)), (task, key)


@pytest.mark.parametrize("workers", [0, 2])
def test_nyud_report_matches_the_decoded_labels(tmp_path, capsys, workers):
    base, _ = make_nyud(tmp_path)
    before = snapshot(base)
    tasks = ["semseg", "depth", "normals", "edge"]
    code, out, err = _run(capsys, tmp_path, "nyud", tasks, f"data.num_workers={workers}",
                          "--out", str(tmp_path / "report.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "nyud" and set(report["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        samples = [s for s in NYUDv2(base, split=split, tasks=tasks, transform=identity)]
        got = report["splits"][split]
        assert (got["samples"], got["decoded"], got["errors"]) == (len(samples), len(samples), [])
        assert got["height"] == [5, 5] and got["width"] == [7, 7]
        for task in tasks:
            _assert_equal(got["tasks"][task], _expected(samples, task, 40), task)
    assert "train: 2 samples read, 2 decoded, 0 failed" in out and "classes seen (never:" in out
    assert snapshot(base) == before  # read only


def test_pascal_with_parts_and_saliency(tmp_path, capsys):
    base = make_pascal(tmp_path)[0]
    tasks = ["semseg", "parts", "sal", "normals", "edge"]
    code, out, err = _run(capsys, tmp_path, "pascal", tasks, "--splits", "val", "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    got = json.loads((tmp_path / "r.json").read_text())["splits"]
    assert list(got) == ["val"]
    samples = list(PASCALContext(base, split="val", tasks=tasks, transform=identity))
    for task, classes in (("semseg", 21), ("parts", 7), ("sal", 0), ("normals", 0), ("edge", 0)):
        _assert_equal(got["val"]["tasks"][task], _expected(samples, task, classes), task)


def test_failing_files_are_listed_and_the_rest_is_read(tmp_path, capsys):
    base, _ = make_nyud(tmp_path)
    (base / "segmentation" / "0001.png").write_bytes(b"not a png")
    np.save(base / "depth" / "0003.npy", np.full((5, 7), 2500.0, dtype=np.float32))  # millimetres
    code, out, err = _run(capsys, tmp_path, "nyud", ["semseg", "depth"], "--out", str(tmp_path / "r.json"))
    assert code == 1 and "mtlfast data: 2 sample(s) failed to decode (listed above)" in err
    report = json.loads((tmp_path / "r.json").read_text())["splits"]
    assert (report["train"]["samples"], report["train"]["decoded"]) == (2, 1)
    (train_error,), (val_error,) = report["train"]["errors"], report["val"]["errors"]
    assert train_error.startswith("0001: DataError: ") and "segmentation/0001.png" in train_error
    assert val_error.startswith("0003: DataError: ") and "expected metres" in val_error
    assert f"  failed {train_error}" in out


def test_synthetic_limit_and_argument_errors(tmp_path, capsys):
    code = main(["data", "data.num_train=20", "data.num_val=5", "--limit", "3", "--splits", "train"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train: 3 of 20 samples read, 3 decoded, 0 failed" in out and "6 of 6 classes seen" in out
    assert main(["data", "--limit", "0"]) == 1
    assert "--limit: expected a number of samples >= 1, got 0" in capsys.readouterr().err
    assert main(["data", "data.dataset=nyud", f"data.root={tmp_path}", "data.tasks=[semseg]"]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
