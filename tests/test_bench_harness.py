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
