"""Shared fixtures. On a machine without CUDA, Triton runs through its interpreter: TRITON_INTERPRET=1
must be set before triton is imported, which is why it happens here, at conftest import time."""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from mtlfast.testing import default_device, kernel_dtypes  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else CPU (Triton through the interpreter)."""
    return default_device()


def pytest_generate_tests(metafunc):
    # `kernel_dtype`: every dtype the kernels support on this machine (float32 and float16 under the interpreter).
    if "kernel_dtype" in metafunc.fixturenames:
        metafunc.parametrize("kernel_dtype", kernel_dtypes(), ids=lambda d: str(d).replace("torch.", ""))
