"""Backend selection rules (DESIGN.md §2) on a toy op, so they are tested independently of any kernel."""
import pytest
import torch

import mtlfast
from mtlfast.backends import OPS, BackendError, Op, current_backend, use_backend


@pytest.fixture
def toy_op():
    op = Op("_toy_double", auto_order={"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")})
    op.register("reference", lambda x: ("reference", 2 * x), devices=("cpu", "cuda"), dtypes=mtlfast.backends.FLOAT_DTYPES)
    op.register("cpp", lambda x: ("cpp", 2 * x), devices=("cpu",), dtypes=(torch.float32,),
                limits=lambda x: [f"at most 8 elements (got {x.numel()})"] if x.numel() > 8 else [])
    op.register("triton", lambda x: ("triton", 2 * x), devices=("cuda",), dtypes=(torch.float32,),
                available=lambda device: "no triton on this test machine")
    yield op
    del OPS["_toy_double"]


def call(op, x, backend=None):
    return op.select(backend, x.device, x.dtype, (x,)).fn(x)[0]


def test_auto_picks_first_supported_in_order(toy_op):
    assert call(toy_op, torch.ones(4)) == "cpp"
    assert call(toy_op, torch.ones(16)) == "reference"  # cpp's shape limit refuses, auto moves on
    assert call(toy_op, torch.ones(4, dtype=torch.float64)) == "reference"


def test_explicit_backend_never_falls_back(toy_op):
    with pytest.raises(BackendError, match=r"(?s)'cpp' cannot serve.*at most 8 elements \(got 16\)"):
        call(toy_op, torch.ones(16), "cpp")
    with pytest.raises(BackendError, match=r"dtype float64 not supported \(supports float32\)"):
        call(toy_op, torch.ones(2, dtype=torch.float64), "cpp")
    with pytest.raises(BackendError, match=r"(?s)triton:.*device 'cpu' not supported"):
        call(toy_op, torch.ones(2), "triton")
    with pytest.raises(BackendError, match=r"has no cuda implementation"):
        call(toy_op, torch.ones(2), "cuda")


def test_precedence_call_then_context_then_env(toy_op, monkeypatch):
    monkeypatch.setenv("MTLFAST_BACKEND", "reference")
    assert current_backend() == "reference"
    assert call(toy_op, torch.ones(2)) == "reference"
    with use_backend("cpp"):
        assert call(toy_op, torch.ones(2)) == "cpp"
        with use_backend("reference"):
            assert call(toy_op, torch.ones(2)) == "reference"
        assert call(toy_op, torch.ones(2), backend="reference") == "reference"
        assert current_backend() == "cpp"
    assert current_backend() == "reference"
    monkeypatch.delenv("MTLFAST_BACKEND")
    assert current_backend() == "auto"


def test_unknown_backend_names_are_rejected(toy_op, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call(toy_op, torch.ones(2), "fast")
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv("MTLFAST_BACKEND", "Triton")
    with pytest.raises(ValueError, match="MTLFAST_BACKEND: unknown backend 'Triton'"):
        current_backend()


def test_auto_with_no_candidate_lists_every_reason(toy_op):
    toy_op.auto_order["cpu"] = ("cpp",)
    with pytest.raises(BackendError, match=r"(?s)'auto' cannot serve.*cpp: at most 8 elements"):
        call(toy_op, torch.ones(9))


def test_duplicate_op_name_is_an_error(toy_op):
    with pytest.raises(ValueError, match="already registered"):
        Op("_toy_double")


def test_info_lists_each_op_with_its_choice(toy_op):
    from mtlfast.info import info_text

    text = info_text()
    assert "_toy_double" in text and "auto -> cpp" in text
    assert "triton: device 'cpu' not supported" in text
