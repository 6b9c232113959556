"""Task losses and MultiTaskLoss on hand-computed cases."""
import math

import pytest
import torch

from mtlfast.losses import (LOSS_WEIGHTS, MultiTaskLoss, balanced_bce_loss, cross_entropy_loss, depth_loss,
                            normals_loss, task_loss)

LN2, LN3 = math.log(2), math.log(3)


def _img(values, channels=1):
    """(1, C, 1, N) tensor from a list of N pixels (scalars or C-vectors)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.reshape(1, 1, 1, -1) if channels == 1 else t.T.reshape(1, channels, 1, -1)


def test_standard_weights():
    assert LOSS_WEIGHTS == {"semseg": 1.0, "parts": 2.0, "sal": 5.0, "normals": 10.0, "depth": 1.0, "edge": 50.0}


def test_cross_entropy_ignores_255():
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0], [5.0, -5.0]], dtype=torch.float64).T.reshape(1, 2, 1, 3)
    label = torch.tensor([[[1, 1, 255]]])
    # pixel 0: p(1) = 3/4; pixel 1: p(1) = 1/4; pixel 2 ignored
    expected = (-math.log(3 / 4) - math.log(1 / 4)) / 2
    assert math.isclose(cross_entropy_loss(logits, label).item(), expected, rel_tol=1e-12)
    assert task_loss("parts", logits, label).item() == pytest.approx(expected, rel=1e-12)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = cross_entropy_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
    pred = torch.randn(1, 1, 2, 2, requires_grad=True)
    for fn in (lambda p: balanced_bce_loss(p, torch.full((1, 1, 2, 2), 255.0)),
               lambda p: depth_loss(p, torch.zeros(1, 1, 2, 2))):
        loss = fn(pred)
        loss.backward()
        assert loss.item() == 0 and torch.all(pred.grad == 0)


def test_saliency_balanced_bce_weight_from_labels():
    # labels 1, 0, 0, ignored: w = #neg / #valid = 2/3; logits 0 -> each term ln 2
    pred = _img([0.0, 0.0, 0.0, 7.0])
    label = _img([1.0, 0.0, 0.0, 255.0])
    w = 2 / 3
    assert task_loss("sal", pred, label).item() == pytest.approx((w * LN2 + (1 - w) * 2 * LN2) / 3, rel=1e-12)
    # logit ln3 on a positive: -log σ = log(4/3); logit -ln3 on a negative: -log(1 - σ) = log(4/3)
    pred = _img([LN3, -LN3, 0.0])
    label = _img([1.0, 0.0, 0.0])
    expected = (w * math.log(4 / 3) + (1 - w) * (math.log(4 / 3) + LN2)) / 3
    assert task_loss("sal", pred, label).item() == pytest.approx(expected, rel=1e-12)


def test_edge_bce_fixed_positive_weight():
    pred = _img([0.0, 0.0, 0.0, -3.0])
    label = _img([1.0, 0.0, 0.0, 255.0])
    assert task_loss("edge", pred, label).item() == pytest.approx((0.95 * LN2 + 0.05 * 2 * LN2) / 3, rel=1e-12)


def test_normals_l1_on_normalised_prediction():
    pred = _img([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]], channels=3)
    label = _img([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], channels=3)  # last: invalid
    # pixel 0: exact; pixel 1: |0-1| + |1-0| = 2; mean over the 6 valid entries
    assert normals_loss(pred, label).item() == pytest.approx(2 / 6, rel=1e-12)
    # InvPT / ATRC: divided by the 2 valid pixels
    assert normals_loss(pred, label, "pixel").item() == pytest.approx(2 / 2, rel=1e-12)
    total, _ = MultiTaskLoss(["normals"], normals_reduction="pixel")({"normals": pred}, {"normals": label})
    assert total.item() == pytest.approx(10 * 2 / 2, rel=1e-12)
    with pytest.raises(ValueError, match="normals_reduction: expected one of element, pixel, got 'mean'"):
        MultiTaskLoss(["normals"], normals_reduction="mean")


def test_models_declare_their_code_base_normals_reduction():
    from mtlfast.models.bridgenet import BridgeNet
    from mtlfast.models.mtinet import MTINet
    from mtlfast.models.padnet import PADNet
    from mtlfast.models.sem import SEM
    from mtlfast.models.tif import TIF

    assert [m.normals_loss_reduction for m in (BridgeNet, SEM, TIF)] == ["pixel"] * 3
    assert [m.normals_loss_reduction for m in (MTINet, PADNet)] == ["element"] * 2


def test_depth_l1_masked_and_nan_safe():
    pred = _img([1.0, 2.0, 3.0, 4.0]).requires_grad_()
    label = _img([2.0, 0.0, float("nan"), 3.0])
    loss = depth_loss(pred, label)
    assert loss.item() == pytest.approx(1.0, rel=1e-12)
    loss.backward()
    assert pred.grad.flatten().tolist() == [-0.5, 0.0, 0.0, 0.5]


def test_shape_errors_name_the_task():
    with pytest.raises(ValueError, match="depth: expected 1 prediction channel"):
        depth_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"normals: label of shape \(1, 3, 3, 4\) does not fit"):
        normals_loss(torch.zeros(1, 3, 3, 3), torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match="unknown task 'segm'"):
        task_loss("segm", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))


def _batch():
    g = torch.Generator().manual_seed(0)
    labels = {"semseg": torch.randint(0, 5, (2, 6, 8), generator=g),
              "depth": torch.rand(2, 1, 6, 8, generator=g) + 0.5,
              "edge": (torch.rand(2, 1, 6, 8, generator=g) > 0.8).float(), "meta": [{}, {}]}
    preds = {"semseg": torch.randn(2, 5, 6, 8, generator=g), "depth": torch.randn(2, 1, 6, 8, generator=g),
             "edge": torch.randn(2, 1, 6, 8, generator=g)}
    return preds, labels


def test_multitask_loss_weighted_sum():
    preds, labels = _batch()
    total, losses = MultiTaskLoss(["semseg", "depth", "edge"])(preds, labels)
    expected = sum(LOSS_WEIGHTS[t] * task_loss(t, preds[t], labels[t]) for t in ("semseg", "depth", "edge"))
    assert set(losses) == {"semseg", "depth", "edge"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total, _ = MultiTaskLoss(["semseg", "depth"], weights={"depth": 3.0})(preds, labels)
    assert total.item() == pytest.approx(losses["semseg"].item() + 3 * losses["depth"].item(), rel=1e-6)


def test_deep_supervision_upsampled_and_weighted():
    preds, labels = _batch()
    # constant low-resolution outputs upsample (bilinear) to the same constants at label size
    const = {"semseg": torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5]).view(1, 5, 1, 1).expand(2, 5, 6, 8),
             "depth": torch.full((2, 1, 6, 8), 0.7)}
    low = {"semseg": const["semseg"][:, :, :3, :4].contiguous(), "depth": const["depth"][:, :, :2, :2]}
    criterion = MultiTaskLoss(["semseg", "depth"], stage_weights={"scale_8": 0.5})
    total, losses = criterion(const, labels, aux={"scale_4": low, "scale_8": {"depth": low["depth"]}})
    assert set(losses) == {"semseg", "depth", "scale_4/semseg", "scale_4/depth", "scale_8/depth"}
    for key in ("scale_4/semseg", "scale_4/depth", "scale_8/depth"):
        assert losses[key].item() == pytest.approx(losses[key.split("/")[1]].item(), rel=1e-6)
    final = losses["semseg"] + losses["depth"]
    assert total.item() == pytest.approx((2 * final + 0.5 * losses["depth"]).item(), rel=1e-6)


def test_multitask_loss_errors():
    preds, labels = _batch()
    criterion = MultiTaskLoss(["semseg", "depth"])
    with pytest.raises(KeyError, match="no prediction for task 'depth'"):
        criterion({"semseg": preds["semseg"]}, labels)
    with pytest.raises(ValueError, match="final predictions must be at label resolution"):
        criterion({"semseg": preds["semseg"][..., :4], "depth": preds["depth"]}, labels)
    with pytest.raises(KeyError, match="task 'edge' is not one of the loss's tasks"):
        criterion(preds, labels, aux={"s": {"edge": preds["edge"]}})
    with pytest.raises(KeyError, match="no 'normals' label"):
        MultiTaskLoss(["normals"])({"normals": torch.zeros(2, 3, 6, 8)}, labels)
    with pytest.raises(ValueError, match="tasks: unknown task 'segm'"):
        MultiTaskLoss(["semseg", "segm"])
    with pytest.raises(ValueError, match="weights: 'edge' is not one of the tasks"):
        MultiTaskLoss(["semseg"], weights={"edge": 1.0})
    with pytest.raises(ValueError, match="tasks: expected at least one task"):
        MultiTaskLoss([])


def _every_task_batch(B, seed):
    """float64 labels of all six tasks with ignored / invalid entries in varying numbers per image, predictions,
    and deep-supervision outputs at half resolution."""
    g = torch.Generator().manual_seed(seed)
    H, W = 6, 8

    def ignored(label, share, value):
        return torch.where(torch.rand(label.shape, generator=g, dtype=torch.float64) < share, value, label)

    shares = torch.linspace(0.05, 0.6, B, dtype=torch.float64).view(B, 1, 1, 1)  # per image: unequal counts
    normals = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g, dtype=torch.float64), dim=1)
    labels = {"semseg": ignored(torch.randint(0, 5, (B, 1, H, W), generator=g), shares, 255)[:, 0],
              "parts": ignored(torch.randint(0, 3, (B, 1, H, W), generator=g), shares, 255)[:, 0],
              "sal": ignored((torch.rand(B, 1, H, W, generator=g) > shares).double(), shares / 2, 255.0),
              "edge": ignored((torch.rand(B, 1, H, W, generator=g) > 0.8).double(), shares, 255.0),
              "normals": torch.where(torch.rand(B, 1, H, W, generator=g) < shares, 0.0, normals),
              "depth": ignored(torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) + 0.5, shares, 0.0)}
    channels = {"semseg": 5, "parts": 3, "sal": 1, "edge": 1, "normals": 3, "depth": 1}
    preds = {t: torch.randn(B, c, H, W, generator=g, dtype=torch.float64) for t, c in channels.items()}
    aux = {"scale_2": {t: torch.randn(B, c, H // 2, W // 2, generator=g, dtype=torch.float64)
                       for t, c in channels.items()}}
    return preds, labels, aux


@pytest.mark.parametrize("reduction", ["element", "pixel"])
def test_micro_batches_normalised_by_their_sum_add_up_to_the_whole_batch(reduction):
    """Every task (saliency's class balance included), deep supervision and an auxiliary task: the losses of
    micro-batches of 1, 2 and 1 images, each normalised by MultiTaskLoss.normalisers of all three, add up to the
    loss of the batch of 4, total and per task, and so do their gradients; normalised within themselves they do
    not (the counts differ per image: the test can tell)."""
    preds, labels, aux = _every_task_batch(4, seed=3)
    del preds["edge"]  # auxiliary: predicted in the front-end only
    criterion = MultiTaskLoss(["semseg", "parts", "sal", "normals", "depth"], aux_tasks=["edge"],
                              normals_reduction=reduction)
    leaves = [t.requires_grad_() for t in [*preds.values(), *aux["scale_2"].values()]]
    total, losses = criterion(preds, labels, aux)
    grads = torch.autograd.grad(total, leaves)
    splits = [slice(0, 1), slice(1, 3), slice(3, 4)]

    def part(tree, i):
        return {k: part(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}

    norms = criterion.normalisers([part(labels, i) for i in splits])
    parts = [criterion(part(preds, i), part(labels, i), part(aux, i), norms) for i in splits]
    assert sum(p[0] for p in parts).item() == pytest.approx(total.item(), rel=1e-12)
    for key, loss in losses.items():
        assert sum(p[1][key] for p in parts).item() == pytest.approx(loss.item(), rel=1e-12), key
    micro_grads = torch.autograd.grad(sum(p[0] for p in parts), leaves)
    for got, want in zip(micro_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    own = sum(criterion(part(preds, i), part(labels, i), part(aux, i))[0] * (i.stop - i.start) / 4 for i in splits)
    assert abs(own.item() - total.item()) > 1e-3 * abs(total.item())
    with pytest.raises(KeyError, match="normalised_by: no normaliser for task 'sal'"):
        criterion(preds, labels, aux, {t: n for t, n in norms.items() if t != "sal"})
    with pytest.raises(ValueError, match="count= and negatives= go together"):  # w = negatives / count of one batch
        task_loss("sal", preds["sal"], labels["sal"], normalised_by={"count": norms["sal"]["count"]})


def test_balanced_bce_refuses_labels_other_than_0_1_and_ignored():
    """A soft or 0/255-scaled edge/saliency map is an error: those entries were silently left out of the loss
    (an all-0.7 map gave loss 0 and no gradient)."""
    pred = _img([0.0, 0.0, 0.0, 0.0])
    for bad in ([0.7, 0.7, 0.7, 0.7], [0.0, 0.5, 1.0, 255.0], [0.0, 255.0, 2.0, 1.0]):
        with pytest.raises(ValueError, match=r"label values must be 0, 1 or 255 \(ignored\); got e.g. \["):
            balanced_bce_loss(pred, _img(bad))
    balanced_bce_loss(pred, _img([0.0, 1.0, 255.0, 1.0]))


def test_multitask_loss_checks_binary_labels_once_per_batch(monkeypatch):
    """MultiTaskLoss checks the edge/sal labels of a batch once (one device sync), naming the task, not again in
    every deep-supervision stage's term."""
    import mtlfast.losses as losses

    preds, labels = _batch()
    criterion = MultiTaskLoss(["semseg", "edge"])
    aux = {"s0": {"edge": preds["edge"]}, "s1": {"edge": preds["edge"]}}
    calls, check = [], losses.check_binary_labels

    def counted(labels, *args):
        calls.append(sorted(labels))
        check(labels, *args)

    monkeypatch.setattr(losses, "check_binary_labels", counted)
    criterion({"semseg": preds["semseg"], "edge": preds["edge"]}, labels, aux)
    assert calls == [["edge"]]
    soft = {**labels, "edge": labels["edge"] * 0.5}
    with pytest.raises(ValueError, match=r"^edge: label values must be 0, 1 or 255"):
        criterion({"semseg": preds["semseg"], "edge": preds["edge"]}, soft, aux)


def test_low_precision_predictions_scored_in_float32():
    preds, labels = _batch()
    total32, _ = MultiTaskLoss(["semseg", "depth", "edge"])(preds, labels)
    total16, _ = MultiTaskLoss(["semseg", "depth", "edge"])({k: v.bfloat16() for k, v in preds.items()}, labels)
    assert total16.dtype == torch.float32
    assert total16.item() == pytest.approx(total32.item(), rel=2e-2)


def test_auxiliary_tasks_scored_in_deep_supervision_only():
    """aux_tasks (MTI-Net / PAD-Net front-end-only tasks): no final prediction, every deep-supervision output
    scored with the task's standard weight times the stage weight; a stage output of an undeclared task is
    still an error, and so are overlapping or unknown auxiliary tasks."""
    preds, labels = _batch()
    main = {"semseg": preds["semseg"], "depth": preds["depth"]}
    low_edge = preds["edge"][..., ::2, ::2]
    criterion = MultiTaskLoss(["semseg", "depth"], aux_tasks=["edge"], stage_weights={"scale_1": 0.5})
    aux = {"scale_0": {"semseg": preds["semseg"], "edge": preds["edge"]}, "scale_1": {"edge": low_edge}}
    total, losses = criterion(main, labels, aux)
    assert set(losses) == {"semseg", "depth", "scale_0/semseg", "scale_0/edge", "scale_1/edge"}
    up = torch.nn.functional.interpolate(low_edge, size=labels["edge"].shape[-2:], mode="bilinear", align_corners=False)
    edge0, edge1 = task_loss("edge", preds["edge"], labels["edge"]), task_loss("edge", up, labels["edge"])
    assert losses["scale_0/edge"].item() == pytest.approx(edge0.item(), rel=1e-6)
    assert losses["scale_1/edge"].item() == pytest.approx(edge1.item(), rel=1e-6)
    expected = (2 * losses["semseg"] + losses["depth"] + LOSS_WEIGHTS["edge"] * (edge0 + 0.5 * edge1))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    heavier, _ = MultiTaskLoss(["semseg", "depth"], aux_tasks=["edge"], weights={"edge": 1.0})(main, labels, aux)
    assert heavier.item() == pytest.approx((2 * losses["semseg"] + losses["depth"] + edge0 + edge1).item(), rel=1e-6)
    with pytest.raises(KeyError, match=r"task 'normals' is not one of the loss's tasks \['semseg', 'depth'\] "
                                       r"or auxiliary tasks \['edge'\]"):
        criterion(main, labels, {"scale_0": {"normals": torch.zeros(2, 3, 6, 8)}})
    with pytest.raises(KeyError, match="no 'edge' label"):
        criterion(main, {k: v for k, v in labels.items() if k != "edge"}, aux)
    with pytest.raises(ValueError, match=r"aux_tasks: \['depth'\] are already main tasks"):
        MultiTaskLoss(["semseg", "depth"], aux_tasks=["depth"])
    with pytest.raises(ValueError, match="unknown task 'edges'"):
        MultiTaskLoss(["semseg"], aux_tasks=["edges"])


def test_loss_for_model_takes_the_model_auxiliary_tasks():
    """MultiTaskLoss.for_model scores a model's front-end-only tasks (PAD-Net's aux_tasks) without being told."""
    from mtlfast.models import create_model

    model = create_model("padnet", ["semseg", "depth"], backbone="convnet_tiny", dataset="nyud", aux_tasks=["edge"])
    assert MultiTaskLoss.for_model(model).aux_tasks == ("edge",)
    assert MultiTaskLoss.for_model(model, aux_tasks=()).aux_tasks == ()
