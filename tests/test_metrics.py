"""Metrics on hand-computed cases: dataset pooling, ignore handling, odsF matching, Δm."""
import json
import math

import numpy as np
import pytest
import torch

from mtlfast.metrics import (DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegmentationMeter, build_metrics,
                             delta_m, edge_nms, load_baseline, match_edges)


def _row(values, channels=1, dtype=torch.float64):
    """(1, C, 1, N) from N pixels (scalars or C-vectors)."""
    t = torch.tensor(values, dtype=dtype)
    return t.reshape(1, 1, 1, -1) if channels == 1 else t.T.reshape(1, channels, 1, -1)


def test_miou_pooled_over_the_dataset():
    m = SegmentationMeter(3)
    # image 1: label 0 0 1 1 255, prediction 0 1 1 1 0 (as class ids); image 2 as logits: label 1, pred 0
    m.update(torch.tensor([[[0, 1, 1, 1, 0]]]), torch.tensor([[[0, 0, 1, 1, 255]]]))
    m.update(torch.tensor([[5.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 1), torch.tensor([[[1]]]))
    # pooled: class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 1/2; class 2 absent: excluded
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert out["pixel_acc"] == pytest.approx(100 * 3 / 5)
    iou = m.per_class()
    assert iou[:2].tolist() == pytest.approx([1 / 3, 1 / 2]) and math.isnan(iou[2])
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(torch.tensor([[[0]]]), torch.tensor([[[3]]]))


def test_depth_rmse_pixel_pooled():
    m = DepthMeter()
    m.update(_row([3.0, 9.0]), _row([1.0, 0.0]))             # error 2; a 0 label is invalid
    m.update(_row([1.0, 1.0, 5.0]), _row([1.0, 1.0, float("nan")]))  # errors 0, 0; NaN invalid
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(4 / 3))    # per-image mean would be (2 + 0) / 2 = 1
    assert out["abs_rel"] == pytest.approx(2 / 3)


def test_normals_angles():
    m = NormalsMeter()
    s = math.sqrt(0.5)
    pred = _row([[5.0, 0, 0], [0, 2.0, 0], [s, s, 0], [1.0, 0, 0]], channels=3)
    label = _row([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]], channels=3)  # last: invalid
    m.update(pred, label)
    out = m.compute()
    assert out["mean"] == pytest.approx(45.0)
    assert out["median"] == pytest.approx(45.0, abs=0.006)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 90 ** 2 + 45 ** 2) / 3))
    assert (out["11.25"], out["22.5"], out["30"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))


def test_saliency_maxf_and_maxiou():
    m = SaliencyMeter(from_logits=False)
    m.update(_row([0.9, 0.4, 0.6, 0.1, 0.99]), _row([1.0, 1.0, 0.0, 0.0, 255.0]))
    # t < 0.1: TP 2 FP 2 -> F = 1.3*.5/(.3*.5+1); 0.1 <= t < 0.4: TP 2 FP 1 -> F = 1.3*(2/3)/(.2+1), IoU 2/3;
    # 0.4 <= t < 0.6: P = R = .5; 0.6 <= t < 0.9: TP 1 FP 0 FN 1 -> F = 1.3*.5/(.3+.5) = .8125, IoU 1/2
    out = m.compute()
    assert out["maxF"] == pytest.approx(81.25)
    assert out["maxIoU"] == pytest.approx(200 / 3)
    logits = SaliencyMeter()
    logits.update(torch.logit(_row([0.9, 0.4, 0.6, 0.1, 0.99])), _row([1.0, 1.0, 0.0, 0.0, 255.0]))
    assert logits.compute()["maxF"] == pytest.approx(81.25)


def test_saliency_pooled_not_averaged():
    m = SaliencyMeter(thresholds=[0.5], from_logits=False)
    m.update(_row([0.9, 0.9]), _row([1.0, 0.0]))               # P 1/2 R 1
    m.update(_row([0.9, 0.1, 0.1, 0.1]), _row([1.0, 1.0, 1.0, 1.0]))  # P 1 R 1/4
    p, r = 2 / 3, 2 / 5
    assert m.compute()["maxF"] == pytest.approx(100 * 1.3 * p * r / (0.3 * p + r))


def _line(h, w, col, rows):
    m = np.zeros((h, w), dtype=bool)
    m[rows, col] = True
    return m


def test_match_edges_one_to_one_within_distance():
    gt = _line(20, 20, 10, slice(5, 15))
    assert match_edges(_line(20, 20, 12, slice(5, 15)), gt, 2.0) == 10
    assert match_edges(_line(20, 20, 12, slice(5, 15)), gt, 1.9) == 0
    double = _line(20, 20, 9, slice(5, 15)) | _line(20, 20, 11, slice(5, 15))
    assert match_edges(double, gt, 1.0) == 10  # each ground-truth pixel used once
    diagonal = np.zeros((20, 20), dtype=bool)
    diagonal[4, 11] = True
    assert match_edges(diagonal, gt, 1.42) == 1 and match_edges(diagonal, gt, 1.41) == 0
    assert match_edges(np.zeros_like(gt), gt, 3.0) == 0


def test_edge_nms_thins_a_blurred_line_to_its_ridge():
    x = np.arange(30)
    profile = np.exp(-0.5 * ((x - 14) / 1.5) ** 2)
    blurred = np.tile(profile, (30, 1))
    out = edge_nms(blurred)
    assert np.all(out[5:25, 14] > 0.99) and np.all(out[5:25, :14] == 0) and np.all(out[5:25, 15:] == 0)
    assert out[2, 14] == pytest.approx(blurred[2, 14] * 2 / 5)  # border taper


def test_edge_odsf_hand_cases():
    h, w = 32, 32
    gt = torch.zeros(1, 1, h, w)
    gt[0, 0, 8:24, 16] = 1
    perfect = gt.clone()
    # max_dist 0.03 of the diagonal (1.36 px): perfect -> F = 1; half the line -> P = 1, R = 1/2
    m = EdgeMeter(0.03, thresholds=9, from_logits=False)
    m.update(perfect, gt)
    assert m.compute()["odsF"] == pytest.approx(100.0)
    half = gt.clone()
    half[0, 0, 16:] = 0
    m = EdgeMeter(0.03, thresholds=9, from_logits=False)
    m.update(half, gt)
    assert m.compute()["odsF"] == pytest.approx(100 * 2 / 3)
    # shifted by one column: matched within 1.36 px, not within 0.011 x 45 = 0.5 px
    shifted = torch.roll(gt, 1, dims=-1)
    m = EdgeMeter(0.03, thresholds=9, from_logits=False)
    m.update(shifted, gt)
    assert m.compute()["odsF"] == pytest.approx(100.0)
    m = EdgeMeter(0.011, thresholds=9, from_logits=False)
    m.update(shifted, gt)
    assert m.compute()["odsF"] == 0.0


def test_edge_odsf_pooled_and_ignores_padding():
    gt = torch.zeros(2, 1, 24, 24)
    gt[:, 0, 6:18, 12] = 1
    gt[1, :, 20:] = 255  # padding of the second image
    pred = torch.full((2, 1, 24, 24), -10.0)
    pred[:, 0, 6:18, 12] = 10.0
    pred[1, 0, 21:, :] = 10.0  # strong responses in the padding: ignored
    pred[1, 0, 6:18, 12] = -10.0  # second image misses its line
    m = EdgeMeter(0.03, thresholds=5)
    m.update(pred, gt)
    # pooled over the two images: 12 of 24 ground-truth pixels found, no false positive -> F = 2/3
    assert m.compute()["odsF"] == pytest.approx(100 * 2 / 3)


def test_merge_and_state_dict():
    label = torch.randint(0, 4, (2, 5, 6))
    logits = torch.randn(2, 4, 5, 6)
    whole, a, b = SegmentationMeter(4), SegmentationMeter(4), SegmentationMeter(4)
    whole.update(logits, label)
    a.update(logits[:1], label[:1])
    b.update(logits[1:], label[1:])
    a.merge(b)
    assert torch.equal(a.state["confusion"], whole.state["confusion"])
    c = SegmentationMeter(4)
    c.load_state_dict(whole.state_dict())
    assert c.compute() == whole.compute()
    c.all_reduce()  # no process group: unchanged
    assert c.compute() == whole.compute()
    c.reset()
    assert c.state["confusion"].sum() == 0


def test_build_metrics():
    metrics = build_metrics(None, "pascal")
    assert list(metrics.meters) == ["semseg", "parts", "sal", "normals", "edge"]
    assert metrics.meters["semseg"].num_classes == 21 and metrics.meters["parts"].num_classes == 7
    assert metrics.meters["edge"].max_dist == 0.0075
    nyud = build_metrics(["semseg", "edge"], "nyud", edge_thresholds=9)
    assert nyud.meters["semseg"].num_classes == 40 and nyud.meters["edge"].max_dist == 0.011
    assert len(nyud.meters["edge"].thresholds) == 9
    with pytest.raises(ValueError, match="no 'parts' labels"):
        build_metrics(["parts"], "nyud")
    label = torch.randint(0, 40, (1, 4, 4))
    nyud = build_metrics(["semseg"], "nyud")
    nyud.update({"semseg": torch.nn.functional.one_hot(label, 40).permute(0, 3, 1, 2).float()}, {"semseg": label})
    assert nyud.compute() == {"semseg": {"mIoU": 100.0, "pixel_acc": 100.0}}
    with pytest.raises(KeyError, match="no prediction for task 'semseg'"):
        nyud.update({}, {"semseg": label})


def test_delta_m(tmp_path):
    results = {"semseg": {"mIoU": 44.0, "pixel_acc": 70.0}, "depth": {"rmse": 0.55}, "normals": {"mean": 18.0}}
    baseline = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}
    assert delta_m(results, baseline) == pytest.approx(0.0)  # +10 % and -10 %
    baseline["normals"] = {"mean": 20.0}                      # lower is better: +10 %
    assert delta_m(results, baseline) == pytest.approx(10 / 3)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"description": "single-task HRNet-18", "metrics": baseline}))
    assert delta_m(results, path) == pytest.approx(10 / 3)
    yaml_path = tmp_path / "baseline.yaml"
    yaml_path.write_text("semseg:\n  mIoU: 40.0\n  pixel_acc: 50.0\n")
    assert load_baseline(yaml_path) == {"semseg": {"mIoU": 40.0, "pixel_acc": 50.0}}
    assert delta_m(results, yaml_path) == pytest.approx(100 * (0.1 + 0.4) / 2)  # metrics of a task averaged
    with pytest.raises(KeyError, match="no task 'sal'"):
        delta_m(results, {"sal": {"maxF": 80.0}})
    with pytest.raises(KeyError, match="no depth.abs_rel"):
        delta_m(results, {"depth": {"abs_rel": 0.1}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse baseline file"):
        load_baseline(bad)
    bad.write_text(json.dumps({"segm": {"mIoU": 1.0}}))
    with pytest.raises(ValueError, match="unknown task 'segm'"):
        load_baseline(bad)
    with pytest.raises(FileNotFoundError, match="baseline file not found"):
        load_baseline(tmp_path / "missing.yaml")


def test_match_edges_is_a_maximum_matching():
    """Against an independent solver: linear_sum_assignment maximising the number of admissible pairs."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for _ in range(20):
        pred, gt = rng.uniform(size=(2, 12, 15)) < rng.uniform(0.05, 0.3)
        radius = rng.uniform(0.5, 3.0)
        p, g = np.argwhere(pred), np.argwhere(gt)
        if len(p) == 0 or len(g) == 0:
            continue
        admissible = np.linalg.norm(p[:, None, :] - g[None, :, :], axis=-1) <= radius
        rows, cols = linear_sum_assignment(admissible.astype(np.int64), maximize=True)
        assert match_edges(pred, gt, radius) == admissible[rows, cols].sum()
