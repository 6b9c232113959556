"""Saved predictions (``mtlfast eval --save-predictions``): each task's file read back by the dataset readers'
own decoders, cropped to the original size, written for every validation image by an evaluation, and scored again
(``mtlfast score``) to the evaluation's numbers."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mtlfast.data.nyud import NYUDv2
from mtlfast.data.pascal import PASCALContext
from mtlfast.data import DataError
from mtlfast.data.base import decode_normals
from mtlfast.engine.predictions import (PREDICTION_SUFFIX, encode_prediction, read_prediction, save_predictions,
                                        score_predictions)
from mtlfast.metrics import build_metrics

CHANNELS = {"semseg": 40, "parts": 7, "depth": 1, "normals": 3, "edge": 1, "sal": 1}


def _batch(tasks, shape, generator, semseg=40):
    out = {t: torch.randn(2, semseg if t == "semseg" else CHANNELS[t], *shape, generator=generator) * 3 for t in tasks}
    if "depth" in out:
        out["depth"] = out["depth"].abs() + 0.1
    return out


@pytest.mark.parametrize("dataset, tasks, classes", [("nyud", ("semseg", "depth", "normals", "edge"), 40),
                                                      ("pascal", ("semseg", "parts", "sal", "normals", "edge"), 21)])
def test_files_read_back_by_the_dataset_readers(tmp_path, dataset, tasks, classes):
    gen = torch.Generator().manual_seed(0)
    preds = _batch(tasks, (13, 17), gen, semseg=classes)  # padded batch: the images are 11x15 and 13x9
    metas = [{"name": "a_01", "size": (11, 15)}, {"name": "b_02", "size": (13, 9)}]
    save_predictions(preds, metas, tmp_path, dataset)
    reader = NYUDv2 if dataset == "nyud" else PASCALContext
    for i, meta in enumerate(metas):
        h, w = meta["size"]
        crop = {t: p[i, :, :h, :w] for t, p in preds.items()}
        files = {t: tmp_path / t / f"{meta['name']}{PREDICTION_SUFFIX[t]}" for t in tasks}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(tasks)
        # class ids through the reader (NYUD's files shift classes by one)
        assert np.array_equal(reader._semseg(files["semseg"]), crop["semseg"].argmax(0).numpy())
        if "parts" in tasks:
            assert np.array_equal(np.asarray(Image.open(files["parts"])), crop["parts"].argmax(0).numpy())
        if "depth" in tasks:
            assert np.array_equal(NYUDv2._depth(files["depth"]), crop["depth"][0].numpy())
        normals = NYUDv2._normals(files["normals"])  # both layouts: 2 v / 255 - 1; 8 bits: < 0.5 degrees off
        unit = torch.nn.functional.normalize(crop["normals"], dim=0).permute(1, 2, 0).numpy()
        angle = np.degrees(np.arccos(np.clip((normals * unit).sum(-1), -1, 1)))
        assert normals.shape == (h, w, 3) and angle.max() < 0.5
        for task in ("edge", "sal"):
            if task in tasks:
                stored = np.asarray(Image.open(files[task]))
                assert stored.dtype == np.uint8 and stored.shape == (h, w)
                assert np.abs(stored / 255.0 - torch.sigmoid(crop[task][0]).numpy()).max() <= 0.5 / 255 + 1e-7
        if dataset == "pascal":  # PASCAL's saliency files decode as v / 255 > 0.5
            expected = torch.sigmoid(crop["sal"][0]).numpy() > 0.5
            assert np.array_equal(PASCALContext._sal(files["sal"]) == 1, expected)


def test_bad_predictions_are_refused():
    with pytest.raises(ValueError, match=r"semseg: expected one image's prediction \(C, H, W\)"):
        encode_prediction("semseg", torch.zeros(1, 4, 5, 5), "nyud")
    with pytest.raises(ValueError, match="unknown task 'depths'"):
        encode_prediction("depths", torch.zeros(1, 5, 5), "nyud")
    with pytest.raises(ValueError, match="do not fit a uint8 PNG"):
        encode_prediction("semseg", torch.zeros(300, 2, 2).index_fill_(0, torch.tensor([299]), 1.0), "synthetic")


def test_evaluation_saves_every_validation_image(tmp_path):
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import Trainer

    tasks = ("semseg", "depth", "normals", "edge", "parts", "sal")
    # on the CPU on every machine: a GPU evaluation runs under bf16 autocast, the model call below would not
    config = load_config(None, ["train.device=cpu", f"output_dir={tmp_path / 'run'}", "data.num_train=4",
                                "data.num_val=3", "data.batch_size=2", "data.train_size=[24, 40]",
                                f"data.tasks=[{', '.join(tasks)}]", "train.iterations=1", "eval.edge_thresholds=3",
                                "eval.batch_size=1"])  # as the model call below: the same bits
    trainer = Trainer(config, progress=False, logs=False)
    try:
        metrics = trainer.evaluate(prediction_dir=str(tmp_path / "pred"))
        model = trainer.model.eval()
        for item in trainer.val_set:
            with torch.no_grad():
                out = model(item["image"][None])
            name, (h, w) = item["meta"]["name"], item["meta"]["size"]  # validation images are padded
            for task in tasks:
                path = tmp_path / "pred" / task / f"{name}{PREDICTION_SUFFIX[task]}"
                stored = np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path))
                want = encode_prediction(task, out[task][0, :, :h, :w], "synthetic")
                assert stored.shape[:2] == (h, w) and np.array_equal(stored, want), (name, task)
        # scored again from the files: class ids and depth as evaluated; normals, edge and saliency as the meters
        # score the model's outputs rounded to the files' 8 bits
        scores, per_class = score_predictions(tmp_path / "pred", trainer.val_set, tasks, edge_thresholds=3,
                                              baseline=trainer.baseline)
        rounded = build_metrics(tasks, "synthetic", edge_thresholds=3, from_logits=False)
        for item in trainer.val_set:
            with torch.no_grad():
                out = model(item["image"][None])
            h, w = item["meta"]["size"]
            out = {t: p[..., :h, :w] for t, p in out.items()}
            out.update({t: torch.sigmoid(out[t]).mul(255).round().double() / 255 for t in ("edge", "sal")})
            stored = encode_prediction("normals", out["normals"][0], "synthetic")
            out["normals"] = torch.from_numpy(decode_normals(stored, "-")).permute(2, 0, 1)[None]
            rounded.update(out, {t: item[t][None, ..., :h, :w] for t in tasks})
    finally:
        trainer.close()
    assert len(list((tmp_path / "pred" / "semseg").iterdir())) == 3 and not math.isnan(metrics["semseg/mIoU"])
    assert set(scores) == set(metrics)
    for key in ("semseg/mIoU", "semseg/pixel_acc", "parts/mIoU", "depth/rmse", "depth/abs_rel"):
        assert scores[key] == metrics[key], key
    assert scores == rounded.compute_flat(trainer.baseline)
    assert per_class == trainer.per_class_iou and set(per_class) == {"semseg", "parts"}
    assert abs(scores["normals/mean"] - metrics["normals/mean"]) < 0.5


def test_scoring_names_missing_and_misfit_files(tmp_path):
    from mtlfast.data import build_dataset

    val = build_dataset("synthetic", split="val", tasks=["semseg", "depth"], size=(16, 24), length=2)
    preds = {"semseg": torch.randn(2, 6, 16, 24), "depth": torch.rand(2, 1, 16, 24)}
    save_predictions(preds, [val.load(i)["meta"] for i in range(2)], tmp_path, "synthetic")
    (tmp_path / "depth" / "val_000001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth prediction: file not found: .*depth.val_000001\.npy"):
        score_predictions(tmp_path, val, ["semseg", "depth"])
    np.save(tmp_path / "depth" / "val_000001.npy", np.ones((16, 23), dtype=np.float32))
    with pytest.raises(ValueError, match=r"val_000001\.npy has size \(16, 23\), its label \(16, 24\)"):
        score_predictions(tmp_path, val, ["semseg", "depth"])
    assert set(score_predictions(tmp_path, val, ["semseg"]).metrics) == {"semseg/mIoU", "semseg/pixel_acc"}
    np.save(tmp_path / "depth" / "val_000001.npy", np.full((1, 16, 24), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match=r"depth prediction .*val_000001\.npy: holds NaN"):
        score_predictions(tmp_path, val, ["depth"])
    Image.fromarray(np.full((16, 24), 6, dtype=np.uint8)).save(tmp_path / "semseg" / "val_000000.png")
    with pytest.raises(DataError, match=r"semseg prediction .*val_000000\.png: values 6..6, expected class ids 0..5"):
        score_predictions(tmp_path, val, ["semseg"])


def test_image_ids_with_folders_and_nyud_class_ids(tmp_path):
    save_predictions({"semseg": torch.randn(1, 40, 5, 6)}, [{"name": "scene/0001", "size": (5, 6)}], tmp_path, "nyud")
    assert (tmp_path / "semseg" / "scene" / "0001.png").is_file()
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8)).save(tmp_path / "semseg" / "scene" / "0001.png")
    with pytest.raises(DataError, match=r"values 0..0, expected class ids 1..40"):  # 0 = NYUD's "unlabelled"
        read_prediction("semseg", tmp_path / "semseg" / "scene" / "0001.png", "nyud")


def test_score_command_with_edge_worker_processes(tmp_path, capsys):
    """`python -m mtlfast score` with eval.edge_workers=1: the spawned worker imports mtlfast.__main__'s package
    without running the command again, and the scores equal the in-process ones. A missing --predictions folder,
    and both --config and --checkpoint, are refused naming them."""
    import json
    import subprocess
    import sys

    from mtlfast.data import build_dataset

    overrides = ["data.tasks=[edge, sal]", "data.num_val=3", "data.train_size=[32, 40]", "eval.edge_thresholds=5",
                 "eval.baseline=null"]
    val = build_dataset("synthetic", split="val", tasks=["edge", "sal"], size=(32, 40), length=3, seed=0)
    gen = torch.Generator().manual_seed(5)
    metas = [val.load(i)["meta"] for i in range(3)]
    preds = {t: torch.randn(3, 1, 32, 40, generator=gen) * 3 for t in ("edge", "sal")}
    save_predictions(preds, metas, tmp_path, "synthetic")
    run = subprocess.run([sys.executable, "-m", "mtlfast", "score", "--predictions", str(tmp_path), "--out",
                          str(tmp_path / "s.json"), *overrides, "eval.edge_workers=1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("scores of the predictions") == 1
    scored = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert scored == score_predictions(tmp_path, val, ["edge", "sal"], edge_thresholds=5).metrics
    from mtlfast.cli import main

    assert main(["score", "--predictions", str(tmp_path / "missing"), *overrides]) == 1
    assert f"FileNotFoundError: --predictions: folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    assert main(["score", "--predictions", str(tmp_path), "--config", "c.yaml", "--checkpoint", "k.pt"]) == 1
    assert "pass --config or --checkpoint (whose config names the data), not both" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_real_layouts_save_and_score_every_task(tmp_path, dataset):
    """The miniature NYUD-v2 / PASCAL-Context layouts of the reader tests, end to end: an evaluation (PASCAL's
    images padded to 512x512 and cropped back) saves every task's files, which score to the evaluation's class-id
    and depth metrics exactly, every other metric present."""
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import Trainer

    if dataset == "nyud":
        from test_data_nyud import make_nyud as make
    else:
        from test_data_pascal import make_pascal as make
    make(tmp_path / "data")
    config = load_config(None, ["train.device=cpu", f"output_dir={tmp_path / 'run'}", f"data.dataset={dataset}",
                                f"data.root={tmp_path / 'data'}", "data.tasks=null", "data.batch_size=1",
                                "data.num_workers=0", "data.train_size=[8, 8]", "eval.baseline=null",
                                "eval.edge_thresholds=3", "eval.edge_workers=0", "eval.batch_size=1"])
    trainer = Trainer(config, progress=False, logs=False)
    try:
        metrics = trainer.evaluate(prediction_dir=str(tmp_path / "pred"))
    finally:
        trainer.close()
    scores, per_class = score_predictions(tmp_path / "pred", trainer.val_set, trainer.tasks, edge_thresholds=3)
    assert set(scores) == set(metrics) and len(trainer.tasks) == (4 if dataset == "nyud" else 5)
    exact = [k for k in metrics if k.split("/")[0] in ("semseg", "parts", "depth")]
    assert exact and all(scores[k] == metrics[k] for k in exact), {k: (scores[k], metrics[k]) for k in exact}
    assert per_class == trainer.per_class_iou and len(per_class["semseg"]) == (40 if dataset == "nyud" else 21)
    for item in trainer.val_set:  # files at the original size, not the evaluation's padded one
        name, size = item["meta"]["name"], item["meta"]["size"]
        assert np.asarray(Image.open(tmp_path / "pred" / "semseg" / f"{name}.png")).shape == size
