"""Joint augmentations: flips, scaling (depth divided by the scale), crops/padding with invalid label values,
photometric distortion on the image only, collation and padding for evaluation."""
import math

import pytest
import torch

from mtlfast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Normalize, PadTo, PhotometricDistortion,
                                     RandomCrop, RandomScale, collate, flip_sample, pad_sample, train_transform,
                                     val_transform)


def _sample(h=9, w=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    normals[:, 0, 0] = 0.0  # one invalid normal
    depth = torch.rand(1, h, w, generator=g) * 5 + 0.5
    depth[0, 1, 1] = 0.0  # one invalid depth
    return {
        "image": torch.rand(3, h, w, generator=g) * 255,
        "meta": {"name": "x", "size": (h, w)},
        "semseg": torch.randint(0, 40, (h, w), generator=g),
        "parts": torch.randint(0, 7, (h, w), generator=g),
        "depth": depth,
        "normals": normals,
        "edge": (torch.rand(1, h, w, generator=g) > 0.8).float(),
        "sal": (torch.rand(1, h, w, generator=g) > 0.5).float(),
    }


def _tensors(sample):
    return {k: v for k, v in sample.items() if k != "meta"}


def test_flip_twice_is_identity_and_negates_normals_x():
    s = _sample()
    once, twice = flip_sample(s), flip_sample(flip_sample(s))
    for key, value in _tensors(s).items():
        assert torch.equal(twice[key], value), key
    assert torch.equal(once["image"], s["image"].flip(-1))
    assert torch.equal(once["semseg"], s["semseg"].flip(-1))
    assert torch.equal(once["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(once["normals"][1:], s["normals"][1:].flip(-1))
    assert once["meta"] is not s["meta"]  # inputs untouched


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_scale_divides_depth_and_keeps_labels_discrete(factor):
    s = _sample(8, 12)
    s["depth"] = torch.full((1, 8, 12), 3.0)
    out = RandomScale(factor, factor)(s)
    assert out["image"].shape[-2:] == (round(8 * factor), round(12 * factor))
    assert torch.allclose(out["depth"], torch.full_like(out["depth"], 3.0 / factor))
    assert out["meta"]["scale"] == factor
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert set(out["edge"].unique().tolist()) <= {0.0, 1.0}
    assert out["semseg"].dtype == torch.int64 and out["depth"].dtype == torch.float32
    norms = out["normals"].norm(dim=0)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))


def test_upscale_by_two_repeats_pixels_and_halves_depth():
    s = _sample(3, 4)
    out = RandomScale(2.0, 2.0)(s)
    expected = s["semseg"].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(out["semseg"], expected)
    expected_depth = s["depth"].repeat_interleave(2, 1).repeat_interleave(2, 2) / 2
    assert torch.allclose(out["depth"], expected_depth)


def test_train_transform_normals_unit_and_crop_size():
    g = torch.Generator().manual_seed(3)
    t = train_transform((11, 7), generator=g)
    for seed in range(6):
        out = t(_sample(9, 13, seed))
        assert out["image"].shape == (3, 11, 7)
        for task in ("semseg", "parts"):
            assert out[task].shape == (11, 7)
        norms = out["normals"].norm(dim=0)
        assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
        assert torch.all((out["depth"] == 0) | (out["depth"] > 0))


def test_crop_pads_small_samples_with_invalid_values():
    s = Normalize()(_sample(4, 5))
    out = RandomCrop((6, 8), generator=torch.Generator().manual_seed(0))(s)
    assert out["meta"]["crop"] == (0, 0)
    assert torch.equal(out["semseg"][:4, :5], s["semseg"])
    assert torch.all(out["semseg"][4:] == 255) and torch.all(out["semseg"][:, 5:] == 255)
    assert torch.all(out["edge"][:, 4:] == 255) and torch.all(out["sal"][:, :, 5:] == 255)
    assert torch.all(out["depth"][:, 4:] == 0) and torch.all(out["normals"][:, :, 5:] == 0)
    assert torch.all(out["image"][:, 4:] == 0)  # the mean colour after normalisation


def test_crop_without_person_parts_ignores_the_parts_label():
    """InvPT's training crops: a parts crop with only background (0) and ignored (255) pixels becomes all 255;
    a crop that keeps a part pixel is unchanged (crops of the full size, so the crop itself is the identity)."""
    s = _sample(6, 8)
    s["parts"] = torch.zeros(6, 8, dtype=torch.int64)
    s["parts"][5, :] = 255
    crop = RandomCrop((6, 8), generator=torch.Generator().manual_seed(0))
    assert torch.all(crop(s)["parts"] == 255)
    s["parts"][0, 0] = 3
    assert torch.equal(crop(s)["parts"], s["parts"])


def test_photometric_changes_only_the_image():
    s = _sample()
    out = PhotometricDistortion(generator=torch.Generator().manual_seed(1))(s)
    for key in ("semseg", "parts", "depth", "normals", "edge", "sal"):
        assert torch.equal(out[key], s[key])
    assert out["image"].min() >= 0 and out["image"].max() <= 255
    changed = [not torch.equal(PhotometricDistortion(generator=torch.Generator().manual_seed(k))(s)["image"],
                               s["image"]) for k in range(8)]
    assert any(changed)


def test_photometric_hue_rotation_keeps_grey_and_turns_colour(monkeypatch):
    """With every step forced on and the other steps neutral, the hue step alone: a grey pixel (no chroma) is
    unchanged and a coloured one is the documented rotation of its YIQ chroma plane by the drawn angle."""
    from mtlfast.data import transforms

    monkeypatch.setattr(transforms, "_chance", lambda p, generator: True)  # each step otherwise runs at p = 1/2
    monkeypatch.setattr(transforms, "_uniform", lambda lo, hi, generator: hi)  # the angle drawn: +18 degrees
    grey, colour = [100.0, 100.0, 100.0], [180.0, 90.0, 40.0]
    image = torch.tensor([grey, colour]).T.reshape(3, 1, 2)
    t = PhotometricDistortion(brightness=0.0, contrast=(1, 1), saturation=(1, 1), hue=18.0)
    out = t({"image": image, "meta": {}})["image"].reshape(3, 2).T
    assert torch.allclose(out[0], torch.tensor(grey), atol=1e-3)
    # NTSC YIQ: the luma y stays, the chroma (i, q) turns by +18 degrees, back to RGB
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
    y, i, q = (rgb2yiq @ torch.tensor(colour, dtype=torch.float64)).tolist()
    a = math.radians(18.0)
    turned = torch.tensor([y, i * math.cos(a) - q * math.sin(a), i * math.sin(a) + q * math.cos(a)],
                          dtype=torch.float64)
    want = torch.linalg.solve(rgb2yiq, turned)
    assert 0 < want.min() and want.max() < 255  # no clamping in play
    assert not torch.allclose(want, torch.tensor(colour, dtype=torch.float64), atol=1.0)  # the hue did move
    assert torch.allclose(out[1].double(), want, atol=1e-3)


def test_normalize_values():
    s = {"image": torch.full((3, 1, 1), 255.0), "meta": {}}
    out = Normalize()(s)["image"].flatten()
    expected = torch.tensor([(1 - m) / d for m, d in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out, expected)


def test_val_padding_and_crop_back():
    s = _sample(9, 13)
    out = val_transform()(s)
    assert out["image"].shape[-2:] == (32, 32)
    h, w = out["meta"]["size"]
    assert torch.equal(out["semseg"][:h, :w], s["semseg"])
    assert torch.all(out["semseg"][h:] == 255)
    fixed = val_transform((16, 16))(s)
    assert fixed["image"].shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="does not fit the evaluation pad size"):
        PadTo((8, 8))(s)


def test_collate_pads_to_common_size():
    batch = collate([val_transform(multiple=1)(_sample(5, 7)), val_transform(multiple=1)(_sample(6, 4, seed=1))])
    assert batch["image"].shape == (2, 3, 6, 7)
    assert batch["semseg"].shape == (2, 6, 7) and batch["normals"].shape == (2, 3, 6, 7)
    assert torch.all(batch["semseg"][0, 5] == 255) and torch.all(batch["semseg"][1, :, 4:] == 255)
    assert [m["size"] for m in batch["meta"]] == [(5, 7), (6, 4)]


def test_bad_arguments_name_what_is_wrong():
    for bad in (0, (5, 0), (5, 2.5), (True, 3), (1, 2, 3)):
        with pytest.raises(ValueError, match=r"size: expected \(height, width\) of positive integers"):
            RandomCrop(bad)
    assert RandomCrop(7).size == (7, 7)
    with pytest.raises(ValueError, match=r"scale range: expected 0 < low <= high, got \(2, 1\)"):
        RandomScale(2, 1)
    with pytest.raises(ValueError, match=r"x: image of size \(9, 13\) does not fit the evaluation pad size \(8, 13\)"):
        PadTo((8, 13))(_sample())
    with pytest.raises(ValueError, match=r"pad size \(9, 12\) is smaller than the sample \(9, 13\)"):
        pad_sample(_sample(), (9, 12))
    with pytest.raises(ValueError, match="collate: empty batch"):
        collate([])
    no_sal = {k: v for k, v in _sample(seed=1).items() if k != "sal"}
    with pytest.raises(ValueError, match="collate: samples have different keys"):
        collate([_sample(), no_sal])


def test_same_generator_seed_same_augmentation():
    s = _sample()
    a = train_transform((8, 8), generator=torch.Generator().manual_seed(5))(s)
    b = train_transform((8, 8), generator=torch.Generator().manual_seed(5))(s)
    for key, value in _tensors(a).items():
        assert torch.equal(value, b[key])
    assert math.isclose(a["meta"]["scale"], b["meta"]["scale"])
