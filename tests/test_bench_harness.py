"""The benchmark harness on CPU with a toy benchmark: rows, ratios, refusals and the result file."""
import json
import subprocess
import sys

import torch

from mtlfast.bench import harness


def _toy_benchmark():
    def cases(device):
        return [harness.Case("mm64", make=lambda device, dtype: {"a": torch.randn(64, 64, dtype=dtype),
                                                                  "b": torch.randn(64, 64, dtype=dtype)},
                             flops=2 * 64**3, params={"n": 64})]

    return harness.Benchmark("_toy_matmul", cases, [
        harness.Provider("mtlfast", lambda a, b: a @ b),
        harness.Provider("eager", lambda a, b: torch.matmul(a, b)),
        harness.Provider("gpu_only", lambda a, b: a @ b, devices=("cuda",)),
        harness.Provider("refusing", lambda a, b: a @ b, refuse=lambda inputs: "width over 32"),
        harness.Provider("broken", lambda a, b: a @ b.T[:3]),
    ])


def test_run_benchmark_on_cpu(tmp_path):
    result = harness.run_benchmark(_toy_benchmark(), device="cpu", dtype=torch.float32, quick=True)
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[("mtlfast", mode)]["ms"] > 0 and rows[("eager", mode)]["ms"] > 0
        assert rows[("gpu_only", mode)]["skipped"] == "gpu_only does not run on cpu"
        assert rows[("refusing", mode)]["skipped"] == "width over 32"
        assert rows[("broken", mode)]["error"].startswith("RuntimeError")
    assert rows[("eager", "fwd")]["tflops"] > 0
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU") and "commit" in env
    table = harness.format_table(result)
    assert "x mtlfast" in table and "width over 32" in table
    path = harness.write_result(result, str(tmp_path), "cpu")
    assert json.load(open(path))["op"] == "_toy_matmul"


def test_cli_bench_and_info_run():
    for args in (["info"], ["bench", "--quick", "--out", "", "--modes", "fwd", "--cases", "^$"]):
        result = subprocess.run([sys.executable, "-m", "mtlfast", *args], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "no_such_op"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown op(s) no_such_op" in result.stderr


def test_model_benchmark_runs_both_paths_on_cpu():
    """`mtlfast bench --models` code on a CPU-sized SEM (convnet_tiny, 64x64): both paths measured with the same
    weights, the per-block breakdown names the model's blocks, ratios computed; failures() reports a failing
    path unless it ran out of memory."""
    from mtlfast.bench import models

    setting = models.ModelSetting("sem", "convnet_tiny", "nyud", ("semseg", "depth"), size=(64, 64), batch=1,
                                  kwargs={"dim": 16, "num_bases": 8, "em_iters": 2})
    result = models.run_setting(setting, torch.device("cpu"), quick=True, find_max_batch=False)
    for path in models.PATHS:
        entry = result["paths"][path]
        assert "error" not in entry, entry
        assert entry["train_ms"] > 0 and entry["infer_ms"] > 0 and entry["train_images_per_s"] > 0
        assert {"HierarchyAdaptiveAttention", "EMInteraction"} <= {b["type"] for b in entry["blocks"]}
    assert result["train_ms_ratio_kernels_over_reference"] > 0
    assert models.failures([result]) == []
    result["paths"]["kernels"] = {"error": "RuntimeError: CUDA out of memory", "out_of_memory": True}
    result["paths"]["reference"] = {"error": "ValueError: bad", "out_of_memory": False}
    assert models.failures([result]) == ["sem-convnet_tiny-nyud/reference: ValueError: bad"]
