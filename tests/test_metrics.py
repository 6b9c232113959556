"""Metrics on hand-computed cases: dataset pooling, ignore handling, odsF matching, Δm; the fast odsF path
against the literal per-threshold loop; the stored baselines and the ``baseline`` command."""
import collections
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import mtlfast.edge_eval
from mtlfast.edge_eval import edge_counts, edge_nms, match_edges
from mtlfast.metrics import (DepthMeter, EdgeMeter, MultiTaskMetrics, NormalsMeter, SaliencyMeter, SegmentationMeter,
                             build_metrics, delta_m, load_baseline)


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
    table = MultiTaskMetrics({"semseg": m, "depth": DepthMeter()}).per_class_iou()
    assert list(table) == ["semseg"] and table["semseg"][:2] == pytest.approx([100 / 3, 50])
    assert table["semseg"][2] is None  # absent from labels and predictions
    with pytest.raises(ValueError, match=r"segmentation: label values outside 0\.\.2"):
        m.update(torch.tensor([[[0]]]), torch.tensor([[[3]]]))
    # a predicted id out of range would be counted in the next row of the confusion matrix
    with pytest.raises(ValueError, match=r"segmentation: predicted class ids outside 0\.\.2 \(got 3\.\.4"):
        m.update(torch.tensor([[[3, 4]]]), torch.tensor([[[0, 1]]]))
    # a class seen only in the predictions counts (IoU 0): mIoU over label classes alone would stay 100
    only = SegmentationMeter(3)
    only.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    assert only.compute()["mIoU"] == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)


def test_non_finite_predictions_are_refused():
    """One NaN would silently change odsF (it suppresses its neighbours in the edge NMS), mIoU (argmax) and maxF
    (thresholds); every meter refuses a non-finite prediction instead, naming the task."""
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 1, 2] = float("nan")
    cases = [(SegmentationMeter(3), torch.zeros(1, 3, 4, 4).index_fill_(1, torch.tensor([1]), float("inf")),
              torch.zeros(1, 4, 4, dtype=torch.long), "segmentation"),
             (DepthMeter(), one, torch.ones(1, 1, 4, 4), "depth"),
             (NormalsMeter(), one.expand(1, 3, 4, 4), torch.ones(1, 3, 4, 4), "normals"),
             (SaliencyMeter(), one, torch.ones(1, 1, 4, 4), "saliency"),
             (EdgeMeter(max_dist=0.01, thresholds=5), one, torch.ones(1, 1, 4, 4), "edge")]
    for meter, pred, label, name in cases:
        with pytest.raises(ValueError, match=f"{name}: the prediction holds NaN or infinite values"):
            meter.update(pred, label)


def test_depth_rmse_pixel_pooled():
    m = DepthMeter()
    m.update(_row([3.0, 9.0]), _row([1.0, 0.0]))             # error 2; a 0 label is invalid
    m.update(_row([1.0, 1.0, 5.0]), _row([1.0, 1.0, float("nan")]))  # errors 0, 0; NaN invalid
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(4 / 3))    # per-image mean would be (2 + 0) / 2 = 1
    assert out["abs_rel"] == pytest.approx(2 / 3)
    m.update(_row([-1.0]), _row([2.0]))                      # a negative depth counts as 0: error 2
    assert m.compute()["rmse"] == pytest.approx(math.sqrt(8 / 4))
    empty = DepthMeter()  # no valid pixel: undefined, not 0
    empty.update(_row([1.0, 2.0]), _row([0.0, float("inf")]))
    assert all(math.isnan(v) for v in empty.compute().values())


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
    m.update(_row([[0, 0, 1.0]], channels=3), _row([[1.0, 0, 0]], channels=3))  # 90 degrees: 0, 45, 90, 90
    assert m.compute()["median"] == pytest.approx((45 + 90) / 2, abs=0.006)  # numpy.median: the middle two's mean


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
    # p >= t is positive (the InvPT code): a probability on a threshold counts; with p > t, t = 0.5 would see
    # no positive here and maxIoU would stay 0
    edge = SaliencyMeter(thresholds=[0.5], from_logits=False)
    edge.update(_row([0.5, 0.2]), _row([1.0, 0.0]))
    assert edge.compute()["maxIoU"] == pytest.approx(100.0)


def test_saliency_pooled_not_averaged():
    m = SaliencyMeter(thresholds=[0.5], from_logits=False)
    m.update(_row([0.9, 0.9]), _row([1.0, 0.0]))               # P 1/2 R 1
    m.update(_row([0.9, 0.1, 0.1, 0.1]), _row([1.0, 1.0, 1.0, 1.0]))  # P 1 R 1/4
    p, r = 2 / 3, 2 / 5
    assert m.compute()["maxF"] == pytest.approx(100 * 1.3 * p * r / (0.3 * p + r))


def test_saliency_astmt_miou_per_image():
    m = SaliencyMeter(from_logits=False)
    # image 1: p 0.9 0.5 0.3 0.1 | label 1 1 0 255; image 2: nothing salient, nothing predicted above 0.2
    m.update(_row([0.9, 0.5, 0.3, 0.1]), _row([1.0, 1.0, 0.0, 255.0]))
    m.update(_row([0.2, 0.1]), _row([0.0, 0.0]))
    # image 1 at t < 0.3: J = 2/3; 0.3 <= t < 0.5: J = 1 (strict >: 0.3 is negative at t = 0.3); 0.5 <= t < 0.9:
    # J = 1/2. Image 2: empty vs empty at every t (0.2 > 0.2 is false) = 1. Best mean: t = 0.3, (1 + 1) / 2
    assert m.compute()["mIoU"] == pytest.approx(100.0)
    pooled = SaliencyMeter(from_logits=False)
    pooled.update(_row([0.9, 0.5, 0.3, 0.1]), _row([1.0, 1.0, 0.0, 255.0]))
    pooled.update(_row([0.6, 0.1]), _row([0.0, 1.0]))  # image 2: J = 0 at t < 0.6, 0 above (fn only)
    assert pooled.compute()["mIoU"] == pytest.approx(100 * (1 + 0) / 2)
    pooled.update(_row([0.9, 0.1]), _row([255.0, 255.0]))  # nothing to score: not an image of Jaccard 1
    assert pooled.compute()["mIoU"] == pytest.approx(100 * (1 + 0) / 2)
    assert math.isnan(SaliencyMeter().compute()["mIoU"])
    strict = SaliencyMeter(from_logits=False)  # p on the last threshold is negative there (p > t): J = 1 at t = 0.9
    strict.update(_row([SaliencyMeter.ASTMT_THRESHOLDS[-1]]), _row([0.0]))
    assert strict.compute()["mIoU"] == pytest.approx(100.0)


def test_saliency_astmt_miou_matches_the_per_image_loop():
    """Random maps against a literal transcription of ASTMT's evaluation (eval_sal: per image, per threshold
    of linspace(0.2, 0.9, 15), Jaccard of (p > t) with the ground truth, 1 when both are empty; mean over
    images, max over thresholds), with ignored pixels removed and batches of different sizes."""
    gen = torch.Generator().manual_seed(3)
    meter, per_image = SaliencyMeter(), []
    for batch, h, w in ((3, 7, 9), (1, 5, 4), (2, 6, 11)):
        logits = torch.randn(batch, 1, h, w, generator=gen, dtype=torch.float64) * 2
        label = (torch.rand(batch, 1, h, w, generator=gen) < 0.4).double()
        label[torch.rand(batch, 1, h, w, generator=gen) < 0.1] = 255
        label[0] = torch.where(label[0] == 255, label[0], 0.0)  # an image without salient pixels
        meter.update(logits, label)
        prob = torch.sigmoid(logits).numpy()
        for b in range(batch):
            keep = label[b].numpy() != 255
            gt, p = label[b].numpy()[keep] == 1, prob[b][keep]
            row = []
            for t in np.linspace(0.2, 0.9, 15):
                mask = p > t
                row.append(1.0 if not gt.any() and not mask.any() else (gt & mask).sum() / (gt | mask).sum())
            per_image.append(row)
    assert meter.compute()["mIoU"] == pytest.approx(100 * np.mean(per_image, 0).max(), abs=1e-9)
    merged = SaliencyMeter()
    merged.merge(meter)
    assert merged.compute()["mIoU"] == meter.compute()["mIoU"]


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


# --- odsF fast path against the literal per-threshold loop -------------------------------------------------

def _slow_match_edges(pred, gt, max_dist, gt_distance=None):
    """match_edges as it was before the fast path (a literal copy): max-flow on the pairs of each call."""
    from scipy.ndimage import distance_transform_edt
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    h, w = gt.shape
    gy, gx = np.nonzero(gt)
    if len(gy) == 0 or not pred.any():
        return 0
    if gt_distance is None:
        gt_distance = distance_transform_edt(~gt)
    py, px = np.nonzero(pred & (gt_distance <= max_dist))
    if len(py) == 0:
        return 0
    gt_index = np.full((h, w), -1, dtype=np.int64)
    gt_index[gy, gx] = np.arange(len(gy))
    r = int(math.floor(max_dist))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy ** 2 + dx ** 2 <= max_dist ** 2
    rows, cols = [], []
    for oy, ox in zip(dy[inside], dx[inside]):
        y, x = py + oy, px + ox
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        idx = np.full(len(py), -1, dtype=np.int64)
        idx[ok] = gt_index[y[ok], x[ok]]
        hit = idx >= 0
        rows.append(np.nonzero(hit)[0])
        cols.append(idx[hit])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n_gt, n_pred = len(gy), len(py)
    source, sink = n_gt + n_pred, n_gt + n_pred + 1
    tail = np.concatenate([np.full(n_gt, source), cols, n_gt + np.arange(n_pred)])
    head = np.concatenate([np.arange(n_gt), n_gt + rows, np.full(n_pred, sink)])
    graph = csr_matrix((np.ones(len(tail), dtype=np.int32), (tail, head)), shape=(sink + 1, sink + 1))
    return int(maximum_flow(graph, source, sink, method="dinic").flow_value)


def _slow_edge_counts(prob, gt, max_dist, thresholds):
    """The per-threshold loop of EdgeMeter.update as it was: skimage's thin, then a matching, per threshold."""
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import thin as sk_thin

    gt_distance = distance_transform_edt(~gt)
    matched, n_pred = [], []
    for t in thresholds:
        binary = sk_thin(prob >= t)
        matched.append(_slow_match_edges(binary, gt, max_dist, gt_distance))
        n_pred.append(int(binary.sum()))
    return np.array(matched), np.array(n_pred)


def _random_edge_case(rng, h, w, kind):
    """(probabilities, ground truth) for an (h, w) image: ground truth = boundaries of random discs;
    kind "nms": smooth responses near (shifted) boundaries plus texture, after edge_nms (thin ridges, as the
    meter sees them); "blobs": thick random regions (heavy thinning); "coarse": values on a 0.1 grid (many
    thresholds give the same set)."""
    from scipy.ndimage import gaussian_filter

    labels = np.zeros((h, w), dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, rng.integers(2, 7)):
        cy, cx, radius = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(h, w) / 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = k
    gt = np.zeros((h, w), dtype=bool)
    gt[:-1] |= labels[:-1] != labels[1:]
    gt[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    if kind == "blobs":
        prob = gaussian_filter(rng.uniform(size=(h, w)), 1.5)
        prob = (prob - prob.min()) / (np.ptp(prob) + 1e-12)
    else:
        ridge = gaussian_filter(np.roll(gt, rng.integers(-1, 2, 2), (0, 1)).astype(float), 1.2)
        logit = 8 * ridge / (ridge.max() + 1e-12) - 4 + 1.5 * gaussian_filter(rng.normal(size=(h, w)), 1.0) * 3
        prob = edge_nms(1 / (1 + np.exp(-logit)))
    if kind == "coarse":
        prob = np.round(prob, 1)
    return prob, gt


@pytest.mark.parametrize("kind", ["nms", "blobs", "coarse"])
def test_edge_counts_equal_the_literal_per_threshold_loop(kind):
    rng = np.random.default_rng({"nms": 1, "blobs": 2, "coarse": 3}[kind])
    for case in range(4):
        h, w = rng.integers(20, 56, 2)
        prob, gt = _random_edge_case(rng, h, w, kind)
        max_dist = rng.uniform(0.8, 4.5)
        thresholds = np.linspace(0.01, 0.99, 99) if case % 2 == 0 else rng.uniform(-0.05, 1.05, 23)
        expected = _slow_edge_counts(prob, gt, max_dist, thresholds)
        got = edge_counts(prob, gt, max_dist, thresholds)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), (kind, case)


def test_edge_counts_max_flow_fallback_and_degenerate_inputs(monkeypatch):
    rng = np.random.default_rng(4)
    prob, gt = _random_edge_case(rng, 40, 48, "nms")
    thresholds = np.linspace(0.01, 0.99, 99)
    expected = _slow_edge_counts(prob, gt, 2.5, thresholds)
    monkeypatch.setattr(mtlfast.edge_eval, "_augment", lambda *args, **kwargs: False)  # every threshold by max-flow
    got = edge_counts(prob, gt, 2.5, thresholds)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    monkeypatch.undo()
    empty = np.zeros_like(gt)
    for p, g in ((prob, empty), (np.zeros_like(prob), gt), (prob, gt)):
        for ts in (thresholds, [0.5, 0.5, 0.2], [2.0], []):
            expected = _slow_edge_counts(p, g, 2.5, ts)
            got = edge_counts(p, g, 2.5, ts)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_thin_is_skimage_thin():
    from skimage.morphology import _skeletonize, thin as sk_thin

    from mtlfast.edge_eval import _THIN_LUTS, thin

    assert np.array_equal(_THIN_LUTS[0], _skeletonize.G123_LUT)
    assert np.array_equal(_THIN_LUTS[1], _skeletonize.G123P_LUT)
    rng = np.random.default_rng(5)
    for _ in range(200):
        image = rng.uniform(size=rng.integers(1, 40, 2)) < rng.uniform(0.05, 0.95)
        assert np.array_equal(thin(image), sk_thin(image))
    ring = np.zeros((30, 30), dtype=bool)
    ring[5:25, 5:25] = True
    ring[10:20, 10:20] = False
    assert np.array_equal(thin(ring), sk_thin(ring))
    assert np.array_equal(thin(np.ones((7, 9), dtype=bool)), sk_thin(np.ones((7, 9), dtype=bool)))


def test_augmenting_paths_reach_a_maximum_matching():
    """_augment from random partial matchings against linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    from mtlfast.edge_eval import _augment

    rng = np.random.default_rng(6)
    for _ in range(60):
        n_a, n_b = rng.integers(1, 25, 2)
        adjacency = rng.uniform(size=(n_a, n_b)) < rng.uniform(0.05, 0.4)
        valid_b = rng.uniform(size=n_b) < 0.8
        admissible = adjacency & valid_b[None, :]
        rows, cols = linear_sum_assignment(admissible.astype(np.int64), maximize=True)
        best = int(admissible[rows, cols].sum())
        a_of_edge, b_of_edge = np.nonzero(adjacency)
        ptr = np.concatenate([[0], np.cumsum(adjacency.sum(1))])
        mate_a, mate_b = np.full(n_a, -1), np.full(n_b, -1)
        for a, b in zip(a_of_edge, b_of_edge):  # a random greedy start
            if valid_b[b] and mate_a[a] < 0 and mate_b[b] < 0 and rng.uniform() < 0.5:
                mate_a[a], mate_b[b] = b, a
        assert _augment(ptr, b_of_edge, mate_a, mate_b, np.ones(n_a, dtype=bool), valid_b)
        matched = np.flatnonzero(mate_a >= 0)
        assert len(matched) == best
        assert np.all(mate_b[mate_a[matched]] == matched) and np.all(adjacency[matched, mate_a[matched]])
        assert np.all(valid_b[mate_a[matched]])


def test_edge_meter_equals_the_literal_loop_with_padding():
    rng = np.random.default_rng(7)
    probs, labels = [], []
    for _ in range(3):
        prob, gt = _random_edge_case(rng, 36, 44, "nms")
        probs.append(prob)
        labels.append(gt.astype(np.float32))
    labels[2][30:] = 255  # padding at the bottom of the third image
    pred = torch.from_numpy(np.stack(probs))[:, None]
    label = torch.from_numpy(np.stack(labels))[:, None]
    meter = EdgeMeter(0.03, thresholds=99, nms=False, from_logits=False)
    meter.update(pred, label)
    expected = np.zeros((2, 99), dtype=np.int64)
    for prob, lab in zip(probs, labels):
        valid = lab != 255
        rows = np.flatnonzero(valid.any(1))
        prob, gt = np.where(valid, prob, 0.0)[:rows[-1] + 1], (lab == 1)[:rows[-1] + 1]
        counts = _slow_edge_counts(prob, gt, 0.03 * math.hypot(*prob.shape), meter.thresholds)
        expected += np.stack(counts)
    assert np.array_equal(meter.state["matched"].numpy(), expected[0])
    assert np.array_equal(meter.state["n_pred"].numpy(), expected[1])


def test_edge_meter_worker_processes_give_the_same_counts():
    """workers=2 (spawned processes, images queued across batches): the state equals the in-process meter's after
    every kind of read (state_dict, merge, compute), an all-ignored image included; at most 4 images per worker
    wait; compute ends the processes and a later update starts new ones; reset drops queued images."""
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(3):
        cases = [_random_edge_case(rng, 30, 38, "nms") for _ in range(3)]
        label = np.stack([gt.astype(np.float32) for _, gt in cases])
        label[1, 20:] = 255
        batches.append((torch.from_numpy(np.stack([p for p, _ in cases]))[:, None], torch.from_numpy(label)[:, None]))
    batches[1][1][2] = 255  # an image without a valid pixel
    plain, pooled = EdgeMeter(0.03, thresholds=9), EdgeMeter(0.03, thresholds=9, workers=2)
    for pred, label in batches[:2]:
        plain.update(pred, label)
        pooled.update(pred, label)
    assert pooled._pool is not None and len(pooled._queued) > 0  # queued in the workers, not counted in-process
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), pooled.state_dict().values()))
    plain.update(*batches[2])
    bounded = EdgeMeter(0.03, thresholds=9, workers=1)
    for batch in batches:  # 9 images: past 4 queued per worker, update collects the oldest first
        bounded.update(*batch)
        assert 0 < len(bounded._queued) <= 4
    assert bounded.compute() == plain.compute()
    other = EdgeMeter(0.03, thresholds=9, workers=1)
    other.update(*batches[2])
    pooled.merge(other)
    assert pooled.compute() == plain.compute() and pooled._pool is None and other._queued == collections.deque()
    pooled.update(*batches[0])
    pooled.reset()
    assert pooled.compute()["odsF"] == 0.0 and pooled._pool is None
    other.close()
    # load_state_dict and close drop what is still queued (a failed evaluation closes without collecting)
    pooled.update(*batches[0])
    pooled.load_state_dict(plain.state_dict())
    assert pooled.compute() == plain.compute()
    pooled.update(*batches[0])
    pooled.close()
    assert pooled._pool is None and not pooled._queued and pooled.compute() == plain.compute()
    with pytest.raises(ValueError, match="workers: expected an integer >= 0, got -1"):
        EdgeMeter(0.03, workers=-1)


def test_edge_thresholds_are_a_count_or_a_list_in_the_open_unit_interval():
    """0 thresholds (or an empty list) left odsF's argmax nothing to pick, after the whole evaluation; true was one
    threshold; 0 and 1 are no thresholds of a probability map. Refused when the meter is built, naming the key."""
    from mtlfast.metrics import edge_thresholds

    assert np.allclose(EdgeMeter(0.03, thresholds=3).thresholds, [0.25, 0.5, 0.75])
    assert EdgeMeter(0.03, thresholds=[0.3, 0.6]).thresholds.tolist() == [0.3, 0.6]
    assert np.allclose(edge_thresholds(np.int64(99))[[0, -1]], [0.01, 0.99])
    for bad in (0, -1, True, 2.5, "9", [], [0.0, 0.5], [0.5, 1.0], [True], [float("nan")]):
        with pytest.raises(ValueError, match="thresholds: expected a number of thresholds >= 1 or a list of "
                                             r"thresholds in \(0, 1\), got "):
            EdgeMeter(0.03, thresholds=bad)
    with pytest.raises(ValueError, match="^eval.edge_thresholds: expected"):
        edge_thresholds(0, "eval.edge_thresholds")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # an unreaped zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process maps from /proc")
def test_edge_workers_run_without_torch():
    """The spawned workers import mtlfast.edge_eval alone (numpy, scipy): no torch library is mapped in them,
    while this process has it (the check can fail)."""
    meter = EdgeMeter(0.03, thresholds=3, workers=2)
    try:
        meter.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
        meter._collect()
        workers = list(meter._pool._processes)

        def libraries(pid):
            with open(f"/proc/{pid}/maps") as f:
                return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}

        assert any(name.startswith("libtorch") for name in libraries("self"))
        assert len(workers) == 2
        for pid in workers:
            assert not [name for name in libraries(pid) if name.startswith(("libtorch", "libc10"))], pid
    finally:
        meter.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_edge_workers_end_with_a_killed_parent(tmp_path):
    """A parent killed by SIGKILL (OOM killer, a scheduler) never shuts its pool down: the workers end
    themselves (EdgeMeter's pool initializer) instead of waiting for jobs forever."""
    script = ("import os, signal, sys, torch\n"
              "from mtlfast.metrics import EdgeMeter\n"
              "m = EdgeMeter(0.03, thresholds=3, workers=2)\n"
              "m.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))\n"
              "m._collect()\n"
              "open(sys.argv[1], 'w').write(' '.join(map(str, m._pool._processes)))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    with open(tmp_path / "log", "w") as log:  # not pipes: orphaned workers would hold them open
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pids")], stdout=log, stderr=log,
                             timeout=300)
    workers = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(workers) == 2 and run.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    deadline = time.monotonic() + 20
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _running(p)]
    for pid in left:  # leave no process behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left


# --- stored single-task baselines and `mtlfast baseline` -----------------------------------------------------

def test_every_stored_baseline_loads_by_name_and_path():
    import yaml

    from mtlfast.data import dataset_tasks
    from mtlfast.metrics import BASELINE_DIR, METRIC_NAMES, list_baselines

    names = list_baselines()
    assert {"nyud_hrnet_w18_single_task", "pascal_hrnet_w18_single_task"} <= set(names) and len(names) >= 10
    for name in names:
        path = BASELINE_DIR / f"{name}.yaml"
        baseline = load_baseline(name)
        assert load_baseline(path) == baseline == load_baseline(f"{name}.yaml") == load_baseline(str(path))
        text = path.read_text()
        document = yaml.safe_load(text)
        if document["source"].startswith("measured by: mtlfast baseline"):  # measured here: how, in a comment
            assert "# Command: mtlfast baseline" in text and document["config"]["model"]["name"] == "single_task"
        else:  # printed in a paper: paper and table, in a comment too
            assert "# Source:" in text and "Table" in document["source"], name
        assert set(baseline) <= set(dataset_tasks(document["dataset"])), name
        assert name.startswith(document["dataset"] + "_"), name
        for task, metrics in baseline.items():
            assert metrics and set(metrics) <= set(METRIC_NAMES[task]), (name, task)
    # the numbers as printed (MTI-Net Table 2)
    assert load_baseline("nyud_hrnet_w18_single_task") == {"semseg": {"mIoU": 33.18}, "depth": {"rmse": 0.667}}
    assert load_baseline("pascal_hrnet_w18_single_task") == {
        "semseg": {"mIoU": 60.07}, "parts": {"mIoU": 60.74}, "sal": {"mIoU": 67.18}, "edge": {"odsF": 69.70},
        "normals": {"mean": 14.59}}
    # Δm against a stored baseline by name: MTI-Net's NYUD numbers (+5.85 % semseg, +7.05 % depth)
    results = {"semseg": {"mIoU": 35.12}, "depth": {"rmse": 0.620}}
    assert delta_m(results, "nyud_hrnet_w18_single_task") == pytest.approx(
        100 * ((35.12 - 33.18) / 33.18 + (0.667 - 0.620) / 0.667) / 2)
    with pytest.raises(FileNotFoundError, match="neither a file nor a stored baseline"):
        load_baseline("nyud_hrnet_w18_single_tsk")


def test_load_baseline_checks_metric_names(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("semseg:\n  miou: 40.0\n")
    with pytest.raises(ValueError, match="semseg has no metric 'miou'"):
        load_baseline(path)
    path.write_text("normals:\n  11.25: 40.0\n  mean: 20.0\n")  # a numeric YAML key is the metric '11.25'
    assert load_baseline(path) == {"normals": {"11.25": 40.0, "mean": 20.0}}
    path.write_text("edge:\n  odsF: true\n")
    with pytest.raises(ValueError, match="non-zero number"):
        load_baseline(path)
    # a file's dataset and the run's compare by canonical name (aliases such as nyudv2)
    path.write_text("dataset: nyudv2\nmetrics:\n  depth:\n    rmse: 0.6\n")
    assert load_baseline(path, dataset="nyud") == {"depth": {"rmse": 0.6}}
    with pytest.raises(ValueError, match="holds nyudv2 results, not pascal"):
        load_baseline(path, dataset="pascal")


def test_baseline_command_trains_single_task_models(tmp_path, capsys, monkeypatch):
    from mtlfast.cli import main
    from mtlfast.engine import checkpoint as ckpt
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import Trainer

    # on the CPU on every machine: the numbers are compared to 1e-12 across runs
    tiny = ["train.device=cpu", "data.num_train=8", "data.num_val=4", "data.batch_size=4", "data.train_size=[32, 32]",
            "data.tasks=[semseg, depth, sal]", "train.iterations=2", "train.eval_every=0",
            "train.checkpoint_every=2", "eval.edge_thresholds=9", f"output_dir={tmp_path / 'runs'}",
            "model.kwargs={head_channels: 16, aux_tasks: [normals]}"]
    out = tmp_path / "measured.yaml"
    code, captured = main(["baseline", "--no-progress", "--out", str(out), *tiny]), capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "aux_tasks belong to 'baseline', not single_task; left out" in captured.out
    measured = load_baseline(out)
    assert set(measured) == {"semseg", "depth", "sal"}
    assert set(measured["semseg"]) == {"mIoU"} and set(measured["depth"]) == {"rmse"}
    assert set(measured["sal"]) == {"maxF"}
    for task in ("semseg", "depth", "sal"):  # one single_task model per task, the value its evaluation
        last = tmp_path / "runs" / "single_task" / task / "last.pt"
        config = ckpt.load_checkpoint(str(last))["config"]
        assert config["model"]["name"] == "single_task" and config["data"]["tasks"] == [task]
        assert config["model"]["kwargs"] == {"head_channels": 16}
        trainer = Trainer(config, resume=str(last), progress=False)
        (name, value), = measured[task].items()
        assert trainer.evaluate()[f"{task}/{name}"] == pytest.approx(value, rel=1e-12)
        trainer.close()
    # --resume: finished runs are not trained again, the same numbers come out
    again = tmp_path / "again.yaml"
    assert main(["baseline", "--no-progress", "--resume", "--out", str(again), *tiny]) == 0
    assert load_baseline(again) == measured
    # Δm of a multi-task run on the synthetic data against the measured file
    config = load_config(None, tiny[:-2] + [f"output_dir={tmp_path / 'mtl'}", f"eval.baseline={out}"])
    trainer = Trainer(config, progress=False)
    trainer.train()
    flat = trainer.evaluate()
    trainer.close()
    results = {t: {m: flat[f"{t}/{m}"] for m in measured[t]} for t in measured}
    assert flat["delta_m"] == pytest.approx(delta_m(results, measured))
    # a task measured at 0 (e.g. odsF of an untrained edge model) cannot be a Δm reference: left out, exit 1
    real_evaluate = Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        flat = real_evaluate(self, *args, **kwargs)
        return {k: (0.0 if k == "depth/rmse" else v) for k, v in flat.items()}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    partial = tmp_path / "partial.yaml"
    assert main(["baseline", "--no-progress", "--resume", "--out", str(partial), *tiny]) == 1
    err = capsys.readouterr().err
    assert "left out of `metrics`" in err and "depth.rmse = 0.0" in err
    assert load_baseline(partial) == {t: m for t, m in measured.items() if t != "depth"}


def test_baseline_out_is_checked_before_the_runs_and_written_atomically(tmp_path, capsys, monkeypatch):
    """`mtlfast baseline --out` in a place that cannot hold it fails before any single-task run, naming --out (it
    failed after all of them, unnamed); the file is replaced atomically (a failed write keeps the earlier one)."""
    from mtlfast import _files
    from mtlfast.cli import main

    tiny = ["train.device=cpu", "data.num_train=4", "data.num_val=2", "data.batch_size=4", "data.train_size=[16, 16]",
            "data.tasks=[semseg]", "train.iterations=1", "train.eval_every=0", "train.eval_at_start=false",
            f"output_dir={tmp_path / 'runs'}"]
    (tmp_path / "file").write_text("")
    assert main(["baseline", "--no-progress", "--out", str(tmp_path / "file" / "b.yaml"), *tiny]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtlfast baseline: OSError: --out: cannot create the folder") and "file" in err, err
    assert not (tmp_path / "runs").exists()
    assert main(["baseline", "--no-progress", "--out", str(tmp_path), *tiny]) == 1
    assert "--out: " in capsys.readouterr().err and not (tmp_path / "runs").exists()
    out = tmp_path / "b.yaml"
    out.write_text("earlier\n")

    def failed(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "replace", failed)
    assert main(["baseline", "--no-progress", "--out", str(out), *tiny]) == 1
    err = capsys.readouterr().err
    assert "mtlfast baseline: OSError: disk full" in err, err  # the run's checkpoint (provenance files: reported)
    assert out.read_text() == "earlier\n" and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]
    monkeypatch.undo()
    code = main(["baseline", "--no-progress", "--resume", "--out", str(out), *tiny])
    assert code == 0, capsys.readouterr().err
    assert set(load_baseline(out)) == {"semseg"}
    # a run evaluated at its last iteration (train.eval_every) gives that evaluation's value, without a second one
    from mtlfast.engine.logs import RunLog
    from mtlfast.engine.trainer import Trainer

    calls = []
    real_evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: calls.append(self.iteration) or real_evaluate(
        self, *a, **k))
    assert main(["baseline", "--no-progress", "--out", str(out), *tiny[:-1], "train.eval_every=1",
                 f"output_dir={tmp_path / 'evaluated'}"]) == 0
    (row,) = RunLog(str(tmp_path / "evaluated" / "single_task" / "semseg")).read("eval")
    assert calls == [1] and load_baseline(out) == {"semseg": {"mIoU": float(row["semseg/mIoU"])}}
