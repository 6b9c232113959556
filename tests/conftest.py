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

from mtlfast import testing  # noqa: E402
from mtlfast.testing import default_device, kernel_dtypes  # noqa: E402


@pytest.fixture(autouse=True)
def _test_seed(request):
    """One seed per test (MTLFAST_TEST_SEED or random), from which all its random draws derive."""
    request.node.mtlfast_seed = testing.begin_test()
    yield
    testing.end_test()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "mtlfast_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("mtlfast seed", f"MTLFAST_TEST_SEED={seed} reproduces this test"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():  # the GPU tests compile and run every kernel: the compile-only checks are moot
        skip = pytest.mark.skip(reason="compile-only check; the GPU tests compile and run the kernels here")
        marker = "compile_only"
    else:
        skip = pytest.mark.skip(reason="needs a CUDA device; runs in bench/gpu_check.sh")
        marker = "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else CPU (Triton through the interpreter)."""
    return default_device()


def pytest_generate_tests(metafunc):
    # `kernel_dtype`: every dtype the kernels support on this machine (float32 and float16 under the interpreter).
    if "kernel_dtype" in metafunc.fixturenames:
        metafunc.parametrize("kernel_dtype", kernel_dtypes(), ids=lambda d: str(d).replace("torch.", ""))
