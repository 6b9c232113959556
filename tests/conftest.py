"""Shared fixtures. On a machine without CUDA, Triton runs through its interpreter: TRITON_INTERPRET=1
must be set before triton is imported, which is why it happens here, at conftest import time.

``MTLFAST_SIMULATE_GPU=1 pytest`` on a machine without a GPU: a rehearsal of the GPU machine's test run, since
GPU time is short. torch.cuda.is_available() answers True, so the tests and the library take their GPU-machine
branches (no interpreter, kernels and models on the CUDA device; the `gpu` tests, which need the device
itself, are skipped); a failure whose error only says that there is no GPU (torch's own messages) is reported
as skipped, and what fails is a test that would fail on the GPU machine for another reason (such a run found
five in session 5, e.g. shape limits asked of a backend that cannot run on CPU tensors there).
"""
import os
import re
import sys

import torch

SIMULATE_GPU = os.environ.get("MTLFAST_SIMULATE_GPU") == "1"
#: torch's errors for CUDA calls on a machine without a GPU (driver missing, or a CPU-only build)
_NO_GPU = re.compile(r"Found no NVIDIA driver|Torch not compiled with CUDA enabled|No CUDA GPUs are available|"
                     r"CUDA driver version is insufficient")
if SIMULATE_GPU:  # an H100's answers to the queries that need no device call
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.current_device = lambda: 0

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from mtlfast import testing  # noqa: E402
from mtlfast.testing import default_device, kernel_dtypes  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """The datasets' cache (mtlfast.data.base.cache_dir) in the test's temporary folder, never the user's."""
    monkeypatch.setenv("MTLFAST_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _test_seed(request):
    """One seed per test (MTLFAST_TEST_SEED or random), from which all its random draws derive."""
    request.node.mtlfast_seed = testing.begin_test()
    yield
    testing.end_test()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if SIMULATE_GPU and report.failed and _NO_GPU.search(str(report.longrepr)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], "MTLFAST_SIMULATE_GPU: needs the GPU")
        return
    seed = getattr(item, "mtlfast_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("mtlfast seed", f"MTLFAST_TEST_SEED={seed} reproduces this test"))


def pytest_collection_modifyitems(config, items):
    skips = {}
    if torch.cuda.is_available():  # the GPU tests compile and run every kernel: the compile-only checks are moot
        skips["compile_only"] = "compile-only check; the GPU tests compile and run the kernels here"
    else:
        skips["gpu"] = "needs a CUDA device; runs in bench/gpu_check.sh"
    if SIMULATE_GPU:  # the rehearsal runs the other tests' GPU-machine branches; these need the device itself
        skips["gpu"] = "MTLFAST_SIMULATE_GPU: a `gpu` test needs the device itself"
    for item in items:
        for marker, reason in skips.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else CPU (Triton through the interpreter)."""
    return default_device()


def pytest_generate_tests(metafunc):
    # `kernel_dtype`: every dtype the kernels support on this machine (float32 and float16 under the interpreter).
    if "kernel_dtype" in metafunc.fixturenames:
        metafunc.parametrize("kernel_dtype", kernel_dtypes(), ids=lambda d: str(d).replace("torch.", ""))
