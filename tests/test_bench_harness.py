"""The benchmark harness on CPU with a toy benchmark: rows, ratios, refusals and the result file."""
import dataclasses
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import mtlfast
from mtlfast.bench import harness


def _toy_benchmark():
    def cases(device):
        return [harness.Case("mm64", make=lambda device, dtype: {"a": torch.randn(64, 64, dtype=dtype),
                                                                  "b": torch.randn(64, 64, dtype=dtype)},
                             flops=2 * 64**3, backward_factor=2.5, elements=3 * 64 * 64, params={"n": 64})]

    return harness.Benchmark("_toy_matmul", cases, [
        harness.Provider("mtlfast", lambda a, b: a @ b, resolve=lambda inputs: {"backend": f"n{len(inputs['a'])}"}),
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
    for (provider, mode), row in rows.items():  # rates from the case's FLOPs (backward 2.5x) and elements
        if "ms" not in row:
            continue
        lo, hi = row["ms_quartiles"]
        assert row["samples"] >= 3 and lo <= row["ms"] <= hi
        assert row["tflops"] == pytest.approx((1 if mode == "fwd" else 3.5) * 2 * 64**3 / row["ms"] / 1e9)
        assert row.get("gbs") == (pytest.approx(3 * 64 * 64 * 4 / row["ms"] / 1e6) if mode == "fwd" else None)
        assert row.get("resolved") == ({"backend": "n64"} if provider == "mtlfast" else None)
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU") and "commit" in env
    from mtlfast import _ext
    built = _ext.status()
    assert env["extension"] == (built.build_info if built.loaded else f"not loaded: {built.reason}")
    table = harness.format_table(result)
    assert "x mtlfast" in table and "width over 32" in table and "backend n64" in table
    path = harness.write_result(result, str(tmp_path), "cpu")
    assert json.load(open(path))["op"] == "_toy_matmul"


def _two_case_benchmark(calls, names=("a", "b"), killed_at=None):
    """Cases ``names``; ``calls`` counts the provider calls per case (to see what a resumed run measures); the
    case ``killed_at`` ends the run as a phase timeout would (KeyboardInterrupt)."""
    def make(name):
        def inputs(device, dtype):
            return {"x": torch.randn(8, 8, dtype=dtype), "tag": name}
        return inputs

    def double(x, tag):
        if tag == killed_at:
            raise KeyboardInterrupt(f"killed while measuring {tag}")
        calls[tag] = calls.get(tag, 0) + 1
        return 2 * x

    return harness.Benchmark("_toy_two", lambda device: [harness.Case(n, make(n)) for n in names],
                             [harness.Provider("mtlfast", double), harness.Provider("eager", double)])


def test_a_killed_resumed_run_keeps_the_earlier_cases_ahead_of_it():
    """gpu_check measures the first cases of every target, then resumes with all cases: a resumed run killed
    on its way (phase timeout, lost device) leaves the file of its last on_case, which must still hold the
    earlier run's cases that lie ahead (it held only the cases up to the kill) and name the others left."""
    calls, saved = {}, []
    first = harness.run_benchmark(_two_case_benchmark(calls, ("a", "b", "c")), device="cpu", dtype=torch.float32,
                                  quick=True, case_filter="^c$")
    first = json.loads(json.dumps({**first, "quick": False}))
    with pytest.raises(KeyboardInterrupt):
        harness.run_benchmark(_two_case_benchmark(calls, ("a", "b", "c"), killed_at="b"), device="cpu",
                              dtype=torch.float32, quick=True, previous=first, on_case=saved.append)
    (last,) = saved  # after "a"
    assert [r["case"] for r in last["rows"]] == ["a"] * 4 + ["c"] * 4 and last["cases_left"] == ["b"]
    assert [r for r in last["rows"] if r["case"] == "c"] == [r for r in first["rows"] if r["case"] == "c"]
    assert not last["complete"]


def test_saved_activation_bytes_counts_checkpoint_inputs_and_recomputations():
    """Two checkpointed segments (timm-style plain torch.utils.checkpoint, and checkpoint_stage) and one plain
    one: the count holds each checkpoint's input and the plain segment's saved tensors; ``recomputed`` gets what
    each segment saves when it runs again in the backward, equal to the segment's own count run plainly."""
    from mtlfast.nn.common import checkpoint_stage

    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(n, 2 * n), torch.nn.GELU(), torch.nn.Linear(2 * n, 8))
              for n in (8, 8, 8)]
    params = [p for layer in layers for p in layer.parameters()]

    def fn(x):
        a = torch.utils.checkpoint.checkpoint(layers[0], x, use_reentrant=False)
        b = checkpoint_stage(layers[1], a.tanh())
        return layers[2](b.tanh())

    x = torch.randn(5, 8, requires_grad=True)
    recomputed = []
    total = harness.saved_activation_bytes(fn, {"x": x}, exclude=params, recomputed=recomputed)
    plain = [harness.saved_activation_bytes(layer, {"input": torch.randn(5, 8)}, exclude=params) for layer in layers]
    assert recomputed == plain[:2] and all(plain)
    # kept: the two tanh outputs (5x8 float32; tanh's backward keeps them, the second checkpoint and the plain
    # segment take them as inputs: one storage each) and what the plain segment saves past its input
    assert total == 2 * 5 * 8 * 4 + plain[2], (total, plain)


def test_saved_activation_bytes_by_block():
    """``by_owner`` with models.summary.running_block: each storage counts under the innermost running part of
    the model when first kept (a pack hook, or the call of a checkpoint it is an input of), the model's own
    forward under OUTSIDE_BLOCKS; the counts add up to the total. breakdown_blocks: the model's children (a
    ModuleList's one by one), not the parts' own children."""
    from mtlfast.models.summary import OUTSIDE_BLOCKS, breakdown_blocks, running_block
    from mtlfast.nn.common import checkpoint_stage

    class Stage(torch.nn.Module):  # takes a checkpoint: its input (x * 2, saved by nothing else) counts here
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())

        def forward(self, x):
            return checkpoint_stage(self.inner, x * 2)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU()), Stage()])
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):  # tanh saves its output here; the head saves that same storage again
            return self.head(self.parts[1](self.parts[0](x)).tanh())

    model = Toy()
    assert set(breakdown_blocks(model)) == {"parts.0", "parts.1", "head"}
    counts: dict[str, int] = {}
    with running_block(model) as owner:
        total = harness.saved_activation_bytes(model, {"x": torch.randn(5, 8)}, exclude=list(model.parameters()),
                                               by_owner=(owner, counts))
    one = 5 * 16 * 4  # a (5, 16) float32 activation: GELU's input in parts.0, the checkpoint's input, tanh's output
    assert counts == {"parts.0": one, "parts.1": one, OUTSIDE_BLOCKS: one} and total == 3 * one, counts
    assert model.parts[0]._forward_pre_hooks == {} and model.parts[0]._forward_hooks == {}  # hooks removed


def test_time_budget_and_resume(monkeypatch):
    """A run whose deadline passes records the cases left as not run (incomplete, every provider and mode) and
    reports each measured case to on_case; a resumed run keeps the measured case's rows (with the run that
    measured them) and measures only the rest; an earlier result of other sources, dtype or modes is not
    resumed. (The deadline is on a fake clock: the run's first steps can take seconds on a loaded machine.)"""
    calls, seen = {}, []
    benchmark = _two_case_benchmark(calls)
    now, deadline = [0.0], 10.0
    clock = types.SimpleNamespace(perf_counter=time.perf_counter, monotonic=lambda: now[0])
    monkeypatch.setattr(harness, "time", clock)

    def on_case(result):  # "a" is measured before the deadline; "b" would start after it
        seen.append([r["case"] for r in result["rows"]])
        now[0] = deadline + 1

    first = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, quick=True, deadline=deadline,
                                  on_case=on_case)
    assert not first["complete"] and set(calls) == {"a"} and seen == [["a"] * 4]
    left = [r for r in first["rows"] if r["case"] == "b"]
    assert len(left) == 4 and all(r["skipped"] == harness.NOT_RUN for r in left)
    assert harness.check_targets(first, [harness.Target("t", "b", "speedup", against=("eager",), at_least=1.0,
                                                        device="cpu")])[0]["status"] == f"no data: {harness.NOT_RUN}"

    assert first["quick"] and harness.resumable(first, "_toy_two", torch.float32, ("fwd", "fwd+bwd"), "cpu") == (
        False, "the earlier result is a --quick smoke run")
    first = json.loads(json.dumps({**first, "quick": False}))  # as a full run's file would read back (quick: fast)
    ok, why = harness.resumable(first, "_toy_two", torch.float32, ("fwd", "fwd+bwd"), "cpu")
    assert ok, why
    calls.clear()
    second = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, quick=True, previous=first)
    assert second["complete"] and set(calls) == {"b"}
    assert [r for r in second["rows"] if r["case"] == "a"] == [r for r in first["rows"] if r["case"] == "a"]
    assert {r["run"] for r in second["rows"] if r["case"] == "b"} == {1} and len(second["runs"]) == 2
    assert all("ms" in r for r in second["rows"])
    calls.clear()  # a resumed run with a filter keeps the other measured cases too
    third = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, quick=True, case_filter="^b$",
                                  previous={**first, "rows": [r for r in first["rows"] if r["case"] == "a"]})
    assert set(calls) == {"b"} and [r["case"] for r in third["rows"]] == ["a"] * 4 + ["b"] * 4
    assert first["cases_left"] == ["b"] and second["cases_left"] == [] and third["complete"]
    calls.clear()  # a filtered run measures what it selects and is not complete: the report says which are left
    only_a = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, quick=True, case_filter="^a$")
    assert set(calls) == {"a"} and not only_a["complete"] and only_a["cases_left"] == ["b"]

    assert harness.resumable(None, "_toy_two", torch.float32, ("fwd",), "cpu") == (False, "no earlier result")
    for args, word in [((first, "_toy_two", torch.float16, ("fwd", "fwd+bwd")), "dtype"),
                       ((first, "_toy_two", torch.float32, ("fwd",)), "modes")]:
        ok, why = harness.resumable(*args, "cpu")
        assert not ok and why.startswith(f"earlier result has {word} "), why
    assert set(harness.RESUME_ENVIRONMENT) == {"device", "source", "extension", "torch", "triton", "cuda", "python"}
    for key in harness.RESUME_ENVIRONMENT:  # another device model, sources, extension build or version
        other = {**first, "environment": {**first["environment"], key: "other"}}
        ok, why = harness.resumable(other, "_toy_two", torch.float32, ("fwd", "fwd+bwd"), "cpu")
        assert not ok and why == f"earlier result has {key} 'other' (now {first['environment'][key]!r})", why


def test_source_fingerprint_follows_the_sources(tmp_path, monkeypatch):
    """The resume key changes when a source file of the packages changes, and not otherwise."""
    import mtlfast.kernels

    before = harness.source_fingerprint()
    assert harness.source_fingerprint() == before
    extra = tmp_path / "kernels_copy"
    extra.mkdir()
    (extra / "probe.py").write_text("x = 1\n")
    monkeypatch.setattr(mtlfast.kernels, "__path__", [*mtlfast.kernels.__path__, str(extra)])
    with_probe = harness.source_fingerprint()
    (extra / "probe.py").write_text("x = 2\n")
    assert len({before, with_probe, harness.source_fingerprint()}) == 3


def test_every_op_benchmark_records_what_auto_resolves_to():
    """The `mtlfast` provider (backend auto) of every op benchmark, on its first CPU case: the row's ``resolved``
    names the backend auto picks (iterative_fusion's mode too); where that is the reference (a CPU has no kernel
    for the Triton ops) the provider is refused with the reason, so that no row times the reference under the
    library's name."""
    from mtlfast import _ext

    benchmarks = harness.load_benchmarks()
    assert set(benchmarks) == {"attention", "tpp_attention", "lthd_attention", "iterative_fusion", "em_attention",
                               "deform_sample"}
    for op, benchmark in benchmarks.items():
        inputs = benchmark.cases("cpu")[0].make("cpu", torch.float32)
        (provider,) = [p for p in benchmark.providers if p.name == "mtlfast"]
        resolved = provider.resolve(inputs)
        kernel = "cpp" if op == "deform_sample" and _ext.status().loaded else None
        assert resolved["backend"] == (kernel or "reference"), op
        refusal = None if kernel else "auto resolves to the reference on cpu (no kernel there)"
        assert provider.refuse(inputs) == refusal, op
        assert ("mode" in resolved) == (op == "iterative_fusion"), op


def test_deform_sample_mixed_case():
    """The GPU's ``sem_c256_r2_mixed`` case (built on the CPU here): bfloat16 values with float32 points and
    weights; its eager provider samples float32 copies and returns bfloat16, as the op's reference backend; the
    issue's targets leave it out."""
    import re

    import mtlfast

    benchmark = harness.load_benchmarks()["deform_sample"]
    (case,) = [c for c in benchmark.cases("cuda") if c.name.endswith("_mixed")]
    inputs = case.make("cpu", torch.bfloat16)
    assert {v.dtype for v in inputs["values"]} == {torch.bfloat16}
    assert inputs["points"].dtype == inputs["weights"].dtype == torch.float32
    few = {"values": [v[:1, :8] for v in inputs["values"]], "points": inputs["points"][:1, :300],
           "weights": inputs["weights"][:1, :300]}
    (eager,) = [p for p in benchmark.providers if p.name == "eager"]
    out = eager.fn(**few)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, mtlfast.ops.deform_sample(**few, backend="reference"))
    assert all(not re.fullmatch(t.cases, case.name) for t in benchmark.targets)
    assert all(any(re.fullmatch(t.cases, c.name) for c in benchmark.cases("cuda")) for t in benchmark.targets
               if t.device != "cpu")


def test_cli_bench_budget_and_resume(tmp_path):
    """`mtlfast bench --budget 0` measures nothing, writes every case as not run and exits 3 (likewise with
    --models: no setting runs, models.json says incomplete); --resume needs --out."""
    out = tmp_path / "results"
    run = [sys.executable, "-m", "mtlfast", "bench", "deform_sample", "--quick", "--out", str(out)]
    result = subprocess.run(run + ["--budget", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 3 and "time budget spent" in result.stdout, result.stderr
    (path,) = out.glob("*/deform_sample.json")
    saved = json.loads(path.read_text())
    assert saved["complete"] is False and all(r["skipped"] == harness.NOT_RUN for r in saved["rows"])
    result = subprocess.run(run[:-2] + ["--out", "", "--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "--resume continues the result files under --out" in result.stderr
    from mtlfast.models.backbones import timm_unusable

    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "--models", "--budget", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    if timm_unusable():  # every model setting has a paper backbone: refused before anything runs or is written
        assert result.returncode == 1 and "mtlfast.models needs timm" in result.stderr, result.stderr
        assert not list(out.glob("*/models.json"))
    else:
        assert result.returncode == 3 and "not run: " in result.stdout, result.stderr
        (path,) = out.glob("*/models.json")
        assert json.loads(path.read_text())["complete"] is False


def test_cli_bench_keeps_the_files_it_has_nothing_new_for(tmp_path, monkeypatch, capsys):
    """A run replaces an op's result file only with something measured: an op none of whose cases --cases selects,
    and one the time budget did not reach, keep their files (a plain `bench --cases X` emptied every other op's);
    another dtype writes <op>.<dtype>.json beside the default dtype's file, whose targets it cannot judge; a
    --quick run does not resume a full one (its rows would sit beside full ones); --modes is checked."""
    from mtlfast import cli

    calls = {}
    toys = {"_toy_one": dataclasses.replace(_two_case_benchmark(calls, ("a", "b")), op="_toy_one"),
            "_toy_two": _two_case_benchmark(calls, ("c", "d"))}
    monkeypatch.setattr(harness, "load_benchmarks", lambda: toys)
    out = tmp_path / "results"

    def call(*args):
        status = cli.main(["bench", "--device", "cpu", "--out", str(out), *args])
        return status, capsys.readouterr()

    def files():
        return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*/*.json"))}

    assert call()[0] == 0
    before = files()
    assert list(before) == ["_toy_one.json", "_toy_two.json"] and all(f["complete"] for f in before.values())
    status, printed = call("--cases", "^a$")  # selects nothing of _toy_two
    assert status == 0 and files()["_toy_two.json"] == before["_toy_two.json"]
    assert files()["_toy_one.json"]["cases_left"] == ["b"]
    status, printed = call("_toy_two", "--budget", "0")  # nothing measured: the earlier file stays
    assert status == 3 and files()["_toy_two.json"] == before["_toy_two.json"]
    assert "_toy_two: no case measured; " in printed.out and "left as it was" in printed.out
    status, printed = call("_toy_two", "--dtype", "fp64")
    assert status == 0 and files()["_toy_two.json"] == before["_toy_two.json"]
    assert files()["_toy_two.float64.json"]["dtype"] == "float64"
    target = harness.Target("t", ".*", "speedup", against=("eager",), at_least=0.0, device="cpu")
    assert harness.check_targets(files()["_toy_two.float64.json"], [target]) == []  # not the cpu default, float32
    assert len(harness.check_targets(files()["_toy_two.json"], [target])) == 2
    toys["_toy_two"].targets.append(target)
    assert cli.main(["bench", "--report", str(next(out.glob("*")))]) == 0
    assert "_toy_two.float64.json: a float64 run; the targets are judged on float32 results" in capsys.readouterr().out
    status, printed = call("_toy_two", "--quick", "--resume")
    assert "not resuming, this is a --quick smoke run" in printed.out
    assert cli.main(["bench", "--device", "cpu", "--modes", "bwd", "--out", ""]) == 1
    assert "--modes: expected a comma list of fwd, fwd+bwd (each once), got 'bwd'" in capsys.readouterr().err


def test_the_mtlfast_provider_runs_auto_whatever_backend_is_in_force():
    """The "mtlfast" rows record what auto resolves to; the call asks for auto too, so that a use_backend scope or
    MTLFAST_BACKEND around the run cannot time another backend under that label."""
    from mtlfast.ops import deform_sample

    seen = []
    mtlfast_provider = harness.standard_providers("deform_sample", lambda **kw: seen.append(kw["backend"]),
                                                  deform_sample, compile=False)[0]
    with mtlfast.use_backend("reference"):
        mtlfast_provider.fn(values=[], points=None, weights=None)
    assert seen == ["auto"]


def test_a_stale_extension_is_named_and_refused_by_bench(monkeypatch, capsys):
    """The extension's build_info carries the digest of the csrc/ it was built from (setup.py, mtlfast._sources);
    an extension built from other sources than the tree's (csrc edited, not rebuilt) is named by `mtlfast info`
    and refused by `mtlfast bench`, whose results would credit this tree with another build's numbers."""
    from mtlfast import _ext, cli
    from mtlfast._sources import csrc_digest
    from mtlfast.info import info_text

    if not _ext.status().loaded:
        pytest.skip("compiled extension missing")
    tree = csrc_digest(os.path.join(os.path.dirname(os.path.dirname(mtlfast.__file__)), "csrc"))
    assert f"sources={tree}" in _ext.status().build_info and _ext.stale_reason() is None
    monkeypatch.setattr(_ext, "_STATUS", dataclasses.replace(
        _ext.status(), build_info=_ext.status().build_info.replace(f"sources={tree}", "sources=0123456789abcdef")))
    why = "mtlfast._C was built from other C++/CUDA sources (sources=0123456789abcdef) than this tree's csrc/"
    assert _ext.stale_reason().startswith(why) and f"STALE: {why}" in info_text()
    for args in (["deform_sample", "--out", ""], ["--models", "--out", ""]):
        assert cli.main(["bench", "--device", "cpu", *args]) == 1
        assert f"mtlfast bench: RuntimeError: bench: {why}" in capsys.readouterr().err


def test_cli_bench_models_runs_saves_and_resumes(tmp_path, monkeypatch, capsys):
    """`mtlfast bench --models --device cpu` end to end, on convnet_tiny settings standing in for the papers' (which
    need timm; a CPU run is a quick check at 128x128, batch 1): each setting's tables printed, models.json and
    models.png written; a later call of the same sources, build and versions with other --cases keeps the earlier
    setting, each result with the environment it was measured in; a spent
    budget exits 3 listing the settings left, a failing model 1 naming it (its other paths still run)."""
    from mtlfast import cli
    from mtlfast.bench import models

    tasks = ("semseg", "depth")
    sem = models.ModelSetting("sem", "convnet_tiny", "nyud", tasks, batch=2,
                              kwargs={"dim": 16, "num_bases": 8, "em_iters": 2})
    baseline = models.ModelSetting("baseline", "convnet_tiny", "nyud", tasks, batch=2)
    monkeypatch.setattr(models, "SETTINGS", [sem, baseline])
    out = tmp_path / "results"

    def call(*args):
        status = cli.main(["bench", "--models", "--device", "cpu", "--out", str(out), *args])
        (path,) = out.glob("*/models.json")
        return status, capsys.readouterr(), json.loads(path.read_text())

    status, printed, saved = call("--cases", "^sem-")
    assert status == 0, printed.err
    assert f"-- {sem.name} (128, 128) batch 1" in printed.out and "baseline" not in printed.out, printed.out
    assert "kernels/reference: train_ms" in printed.out and f"{sem.name}: time per block" in printed.out, printed.out
    assert "EMInteraction" in {b["type"] for b in saved["results"][0]["paths"]["kernels"]["blocks"]}
    assert saved["quick"] is True and saved["complete"] is True and saved["settings_left"] == []
    assert [r["setting"] for r in saved["results"]] == [sem.name]
    assert (out / harness.device_slug("cpu") / "models.png").stat().st_size > 0
    status, printed, saved = call("--cases", "^baseline-")
    assert status == 0 and [r["setting"] for r in saved["results"]] == [sem.name, baseline.name]
    status, printed, saved = call("--budget", "0")
    assert status == 3 and f"time budget spent; not run: {sem.name}, {baseline.name}" in printed.out
    assert saved["complete"] is False and saved["settings_left"] == [sem.name, baseline.name]
    assert [r["setting"] for r in saved["results"]] == [sem.name, baseline.name]  # kept from the earlier calls
    assert all(r["environment"]["source"] == saved["environment"]["source"] and "date" in r["environment"]
               for r in saved["results"])  # each with its own
    # results of another torch (or extension build, device, ...: harness.RESUME_ENVIRONMENT) are not kept
    (path,) = out.glob("*/models.json")
    path.write_text(json.dumps({**saved, "environment": {**saved["environment"], "torch": "0.0"}}))
    status, printed, saved = call("--budget", "0")
    assert "are not kept (another torch)" in printed.out and saved["results"] == []
    monkeypatch.setattr(models, "SETTINGS", [dataclasses.replace(sem, kwargs={"no_such_option": 1})])
    status, printed, saved = call()
    assert status == 1 and "failed (not out of memory):" in printed.err
    for path in models.PATHS:  # each path tried and recorded
        assert f"{sem.name}/{path}: ValueError: create_model('sem'" in printed.err
        assert "no_such_option" in saved["results"][-1]["paths"][path]["error"]


def test_host_overhead_script_measures_every_op(tmp_path):
    """bench/host_overhead.py (gpu_check.sh's `host` phase; its stubs stay registered, so it runs in its own
    process): both ways, forward+backward and inference, of every op, written with the environment."""
    from mtlfast.bench import host_overhead

    result = subprocess.run([sys.executable, "-m", "mtlfast.bench.host_overhead", "--out", str(tmp_path), "--rounds",
                             "1", "--calls", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "host_overhead").glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["unit"] == "us" and saved["environment"]["torch"] == torch.__version__
    keys = {f"{way} {mode}" for way in ("eager", "library") for mode in ("fwd+bwd", "inference")}
    assert set(saved["ops"]) == set(host_overhead.OPS)
    assert all(set(row) == keys and all(v > 0 for v in row.values()) for row in saved["ops"].values())


def test_cli_bench_and_info_run():
    result = subprocess.run([sys.executable, "-m", "mtlfast", "info"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "--quick", "--modes", "fwd", "--cases", "^$"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "--cases '^$' matches no case of" in result.stderr, result.stderr
    assert "a quick check writes no result file unless --out is given" in result.stdout
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "no_such_op"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown op(s) no_such_op" in result.stderr
    result = subprocess.run([sys.executable, "-m", "mtlfast", "info", "--out", "table.json"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "--out writes the --models table; give --models" in result.stderr
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "attention", "--compile"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "--max-batch and --compile go with --models" in result.stderr


def test_model_benchmark_runs_every_path_on_cpu(tmp_path):
    """`mtlfast bench --models` code on a CPU-sized SEM (convnet_tiny, 64x64): every path (kernels, reference,
    kernels with the decoder checkpointed) measured with the same weights, the per-block breakdown names the
    model's blocks, ratios to the reference computed, table and plot made; failures() reports a failing path
    unless it ran out of memory."""
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
    assert result["train_ms_ratio_kernels_checkpointed_over_reference"] > 0
    assert "kernels_checkpointed/reference: train_ms" in models.format_models_table([result])
    for path, entry in result["paths"].items():
        rows = {b["block"]: b for b in entry["blocks"]}
        assert {models.OUTSIDE_BLOCKS, models.LOSS, models.OPTIMIZER} <= set(rows)
        assert rows[models.OPTIMIZER]["train_opt_ms"] > 0 and rows["backbone"]["train_bwd_ms"] > 0
        assert sum(b["train_bwd_ms"] for b in entry["blocks"] if b["type"] == "EMInteraction") > 0
        recomputed = sum(b["train_recompute_ms"] for b in entry["blocks"])
        assert recomputed > 0 if path == "kernels_checkpointed" else recomputed == 0
    table = models.format_block_breakdown(result, top=len(result["paths"]["reference"]["blocks"])).splitlines()
    assert "backbone (Backbone)" in "\n".join(table) and table[-2].startswith("sum")
    assert table[-1].startswith("median step without hooks") and len({len(line) for line in table[1:]}) == 1
    models.plot_models([result], str(tmp_path / "models.png"))
    assert (tmp_path / "models.png").stat().st_size > 0
    assert models.failures([result]) == []
    result["paths"]["kernels"] = {"error": "RuntimeError: CUDA out of memory", "out_of_memory": True}
    result["paths"]["reference"] = {"error": "ValueError: bad", "out_of_memory": False}
    assert models.failures([result]) == ["sem-convnet_tiny-nyud/reference: ValueError: bad"]


def test_model_benchmark_compiled_paths(monkeypatch):
    """`mtlfast bench --models --compile`: the reference and kernel paths also under torch.compile(fullgraph=True)
    with the same weights (here with AOTAutograd's eager backend in place of Inductor, to keep CPU time short;
    Inductor on these models: test_train and test_models), each time and first call recorded, neither given a
    per-block breakdown, their ratios to the eager reference printed, and the targets judged on the kernel paths
    only. Dynamo's caches are reset per compiled model: with the recompilation limit at one, the second compiled
    path would otherwise fail (its backend scope is guarded; fullgraph makes the limit an error)."""
    from mtlfast.bench import models

    compiles = []

    def compile_eagerly(fn, **kwargs):
        compiles.append(kwargs)
        return torch._dynamo.optimize("aot_eager", nopython=kwargs["fullgraph"])(fn)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    setting = models.ModelSetting("tpim", "convnet_tiny", "nyud", ("semseg", "depth"), size=(64, 64), batch=1,
                                  kwargs={"channels": 16, "dim": 8, "n_iter": 2})
    with torch._dynamo.config.patch(recompile_limit=1):
        result = models.run_setting(setting, torch.device("cpu"), quick=True, find_max_batch=False, compiled=True)
    assert list(result["paths"]) == list(models.PATHS) + list(models.COMPILED_PATHS)
    assert models.failures([result]) == []
    assert compiles == [{"fullgraph": True}] * 4  # the training and the inference forward per compiled path
    for path, entry in result["paths"].items():
        assert entry["train_ms"] > 0 and entry["infer_ms"] > 0 and entry["train_first_s"] > 0
        assert ("blocks" in entry) == (path not in models.COMPILED_PATHS), path
        if path in models.COMPILED_PATHS:
            assert entry["blocks_skipped"].startswith("compiled") and result[f"train_ms_ratio_{path}_over_reference"]
    table = models.format_models_markdown([result])
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table.splitlines()[2:]]
    verdicts = {row[1]: row[-1] for row in cells}
    assert verdicts["reference_compiled"] == "" and "time <= 0.8x" in verdicts["kernels_compiled"]
    # the compiled kernel path is judged against the compiled reference (what Inductor alone gains is not the kernels')
    ratio = result["train_ms_ratio_kernels_compiled_over_reference_compiled"]
    assert ratio == result["paths"]["kernels_compiled"]["train_ms"] / result["paths"]["reference_compiled"]["train_ms"]
    assert [row[7] for row in cells if row[1] == "kernels_compiled"] == [f"{ratio:.2f}"]
    text = models.format_models_table([result])
    assert "kernels_compiled/reference: train_ms" in text and "kernels_compiled/reference_compiled: train_ms" in text


@pytest.mark.parametrize("checkpointed", [False, True])
def test_block_breakdown_charges_each_block_its_own_work(monkeypatch, checkpointed):
    """block_breakdown on a toy model whose blocks (one inside another, with work of the outer one after the inner
    one) advance a fake clock by known amounts in their forward, backward and gradient accumulation: every phase of
    every block, the loss and the optimiser step get exactly their own work (exclusive of inner blocks; backward
    nodes charged to the block that created them, accumulation to the block holding the parameter; a module that is
    no block charged to the block holding it); with the outer block, and that module inside the other block, under
    a (non-reentrant) activation checkpoint, their forwards run again in the backward, charged as the recomputation
    of their blocks, and nothing else moves."""
    from mtlfast.bench import models
    from mtlfast.models import summary

    clock = [0.0]

    def spend(seconds):
        clock[0] += seconds

    class Work(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, forward_s, backward_s):
            spend(forward_s)
            ctx.backward_s = backward_s
            ctx.save_for_backward(x)  # saved tensors: what a checkpoint recomputes
            return x * 1.0

        @staticmethod
        def backward(ctx, grad):
            ctx.saved_tensors  # under a checkpoint, the first node to read them recomputes, before its own work
            spend(ctx.backward_s)
            return grad, None, None

    class Plain(torch.nn.Module):  # a module that is no block of the breakdown (as a timm backbone's blocks)
        def forward(self, x):
            return Work.apply(x, 0.25, 0.375)

    class Block(torch.nn.Module):
        def __init__(self, forward_s, backward_s, accumulate_s, inner=None, after=(0.0, 0.0), plain=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))
            self.cost, self.inner, self.after, self.plain = (forward_s, backward_s), inner, after, plain
            self.weight.register_post_accumulate_grad_hook(lambda p: spend(accumulate_s))

        def forward(self, x):
            x = Work.apply(x * self.weight, *self.cost)
            if self.plain is not None:  # checkpointed within the block, as timm's checkpoint_seq
                x = (torch.utils.checkpoint.checkpoint(self.plain, x, use_reentrant=False)
                     if checkpointed and torch.is_grad_enabled() else self.plain(x))
            return x if self.inner is None else Work.apply(self.inner(x), *self.after)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Block(1.0, 2.0, 0.125, plain=Plain())
            self.b = Block(3.0, 4.0, 0.0625, inner=Block(5.0, 6.0, 0.03125), after=(0.5, 0.75))

        def forward(self, images):
            x = self.a(images)
            if checkpointed and torch.is_grad_enabled():
                return {"t": torch.utils.checkpoint.checkpoint(self.b, x, use_reentrant=False)}
            return {"t": self.b(x)}

        def forward_train(self, images):
            return self.forward(images), {}

    class Step(torch.optim.SGD):
        def step(self):
            spend(7.0)
            return super().step()

    def loss(preds, labels, aux):
        return Work.apply(preds["t"].sum(), 0.5, 0.25), {}

    model = Toy()
    runner = type("Runner", (), dict(model=model, device=torch.device("cpu"), loss=staticmethod(loss),
                                     optimizer=Step(model.parameters(), lr=0.0),
                                     autocast=torch.autocast("cpu", enabled=False)))
    monkeypatch.setattr(models._Timeline, "clock", staticmethod(lambda: clock[0]))
    for module in (models, summary):  # the toy's blocks, for the breakdown and for running_block's hooks
        monkeypatch.setattr(module, "breakdown_blocks", lambda m: {"a": m.a, "b": m.b, "b.inner": m.b.inner})
    rows = {r["block"]: r for r in models.block_breakdown(runner, torch.randn(2, 3), {}, reps=2)}
    phases = {name: tuple(row[p] / 1e3 for p in models.BREAKDOWN_PHASES) for name, row in rows.items()}
    recompute = 1.0 if checkpointed else 0.0
    # (inference, forward, backward, recomputation, optimiser step)
    assert phases == {"a": (1.25, 1.25, 2.5, 0.25 * recompute, 0), "b": (3.5, 3.5, 4.8125, 3.5 * recompute, 0),
                      "b.inner": (5, 5, 6.03125, 5 * recompute, 0), models.OUTSIDE_BLOCKS: (0, 0, 0, 0, 0),
                      models.LOSS: (0, 0.5, 0.25, 0, 0), models.OPTIMIZER: (0, 0, 0, 0, 7)}
    assert rows["b.inner"]["type"] == "Block" and rows["a"]["infer_mem_increase_bytes"] is None


def _result_with_rows():
    def row(case, provider, mode="fwd+bwd", **values):
        return {"case": case, "provider": provider, "mode": mode, "params": {"saved_ratio": 0.7}, **values}

    rows = [row("wide_a", "mtlfast", ms=1.0, peak_mem_bytes=10), row("wide_a", "eager", ms=4.0, peak_mem_bytes=100),
            row("wide_a", "compile", ms=2.0, peak_mem_bytes=90), row("wide_a", "sdpa_flash", ms=0.8),
            row("wide_a", "sdpa_math", skipped="refused"),
            row("wide_b", "mtlfast", skipped="T·H=32 over the kernel's limit"), row("wide_b", "eager", ms=3.0),
            row("other", "mtlfast", ms=1.0), row("other", "broken", error="OutOfMemoryError: CUDA out of memory")]
    return {"op": "toy", "device_type": "cuda", "environment": {"cuda": "13.0"}, "rows": rows}


class _FakeCuda:
    """torch.cuda's events and synchronize, and the harness's host clock, on a fake clock that only :meth:`spend`
    advances (timings exact, whatever the machine's load), for the CUDA timing code on a CPU; ``log`` gets "sync"
    (torch.cuda.synchronize), "record" and "wait" (an event's record and synchronize)."""

    def __init__(self, monkeypatch):
        log = self.log = []
        now = self.now = [0.0]  # milliseconds

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                log.append("record")
                self.t = now[0]

            def synchronize(self):
                log.append("wait")

            def elapsed_time(self, end):
                assert log[-1] == "wait", "elapsed_time before the end event was waited for"
                return end.t - self.t

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
        monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: now[0] / 1e3))

    def spend(self, ms: float) -> None:
        self.now[0] += ms


def test_cuda_timing_records_both_times(monkeypatch):
    """On a GPU each row gets do_bench's median, sample count and quartiles, and the back-to-back time per call:
    loops of calls (grads reset before each) timed by events, divided by the calls. Events and host on one fake
    clock here: a call that takes 2 ms takes 2 ms per call back to back, whatever do_bench said."""
    import triton.testing

    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setattr(triton.testing, "do_bench", lambda run, **kw: [1.0, 3.0, 2.0, 2.0, 5.0])
    leaf = torch.zeros(2, requires_grad=True)
    grads_at_call = []

    def run():
        grads_at_call.append(leaf.grad)
        cuda.log.append("call")
        leaf.grad = torch.ones(2)
        cuda.spend(2.0)

    timing = harness._time_cuda(run, [leaf], quick=True)
    assert (timing["ms"], timing["samples"], timing["ms_quartiles"]) == (2.0, 5, [2.0, 3.0])
    assert timing["ms_back_to_back"] == pytest.approx(2.0), timing
    # 3 loops of 5 ms / 2 ms -> 2 calls, nothing waits for the device between the calls of a loop
    assert cuda.log == ["sync", "record", "call", "call", "record", "wait"] * 3
    assert all(g is None for g in grads_at_call)
    assert harness._summary([40.0, 50.0])["ms_quartiles"] == [42.5, 47.5]  # within the samples
    calls = []

    def call(ms):
        calls.append(ms)
        cuda.spend(ms)
    assert harness.time_back_to_back(lambda: call(1.0), [], estimate_ms=0.5) == pytest.approx(1.0)
    assert 3 * 20 <= len(calls) <= 3 * 21  # 20 ms loops (the last call may start at 19.999... ms)
    calls.clear()  # a call longer than half a loop is timed once
    assert harness.time_back_to_back(lambda: call(12.0), [], estimate_ms=12.0) == pytest.approx(12.0)
    assert len(calls) == 1
    calls.clear()  # host-bound: 1 ms of host per call against an estimate of 0.01 ms of device time
    assert harness.time_back_to_back(lambda: call(1.0), [], estimate_ms=0.01) == pytest.approx(1.0)
    assert 3 * 20 <= len(calls) <= 3 * 21  # each loop stops once the host spent its 20 ms (not 1000 calls)


def test_a_choice_that_changes_while_timed_is_recorded():
    """What resolve() says before timing is the row's ``resolved``; where it says otherwise after (e.g. an auto
    mode that reads free memory while the allocator's cache grew), ``resolved_after_timing`` too, shown in the
    table."""
    calls = []

    def mode(inputs):
        return {"mode": "materialize" if len(calls) < 3 else "recompute"}

    benchmark = harness.Benchmark("_toy_mode", lambda device: [harness.Case("c", lambda device, dtype: {
        "x": torch.randn(4, dtype=dtype)})], [harness.Provider("mtlfast", lambda x: calls.append(1) or 2 * x,
                                                               resolve=mode)])
    result = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, modes=("fwd",), quick=True)
    (row,) = result["rows"]
    assert row["resolved"] == {"mode": "materialize"} and row["resolved_after_timing"] == {"mode": "recompute"}
    assert "mode materialize (then recompute)" in harness.format_table(result)


def test_flop_counts_are_the_formulas():
    """Case.flops is the literal reference's forward count (torch's FlopCounterMode on the reference), and
    backward_factor its backward's, plus the recomputed QKᵀ for the flash-style attention family (FA2's count):
    attention at Dqk != Dv, lthd_attention (the formula's products, not its widened rewrite's), iterative_fusion,
    em_attention in both gradient modes."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtlfast.bench import bench_attention, bench_em_attention, bench_iterative_fusion, bench_lthd_attention
    from mtlfast.reference.attention import attention
    from mtlfast.reference.lthd_attention import lthd_attention
    from mtlfast.reference.em_attention import em_attention
    from mtlfast.reference.iterative_fusion import iterative_fusion

    def counted(fn, case, grads):
        inputs = case.make("cpu", torch.float64)
        for name in grads:
            inputs[name].requires_grad_()
        with FlopCounterMode(display=False) as forward:
            out = fn(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        with FlopCounterMode(display=False) as backward:
            out.backward(torch.randn_like(out))
        return forward.get_total_flops(), backward.get_total_flops()

    att = bench_attention._attention_case("t", 2, 3, 11, 13, 7, 5)
    fwd, bwd = counted(attention, att, "qkv")
    assert fwd == att.flops and bwd + 2 * 2 * 3 * 11 * 13 * 7 == pytest.approx(att.backward_factor * att.flops)
    lthd = bench_lthd_attention._case("t", 2, (4, 5), (2, 3), 6, 7)  # the formula's, not the widened rewrite's
    fwd, bwd = counted(lthd_attention, lthd, ("q_fine", "k_fine", "q_coarse", "k_coarse", "v"))
    assert fwd == lthd.flops == 2 * 2 * (20 * 20 * (6 + 7) + 6 * 6 * 6)
    assert bwd + 2 * 2 * (20 * 20 + 6 * 6) * 6 == pytest.approx(lthd.backward_factor * lthd.flops)
    fusion = bench_iterative_fusion._case("t", B=2, N=13, c=6, d=5, n_iter=4)
    assert counted(iterative_fusion, fusion, "qkv") == (fusion.flops, fusion.backward_factor * fusion.flops)
    for detach in (False, True):
        em = bench_em_attention._case("t", 2, 37, 24, 5, 3, detach)
        assert counted(em_attention, em, ("x", "mu")) == (em.flops, pytest.approx(em.backward_factor * em.flops))


def test_check_targets():
    """Each metric on a hand-made result: the ratio against the best matching provider, met / MISSED, and
    'no data' with the reason where mtlfast did not run or nothing to compare with ran; targets of another
    device are left out."""
    from mtlfast.bench.harness import Target, check_targets, format_targets

    targets = [Target(">= 3x eager", r"wide_.", "speedup", against=("eager",), at_least=3.0),
               Target(">= 1.3x SDPA", r"wide_a", "speedup", against=("sdpa_.*",), at_least=1.3),
               Target("<= 1/5 of eager's memory", r"wide_a", "memory", against=("eager", "compile"), at_most=0.2),
               Target("saved <= 1/2", r"wide_a", "param:saved_ratio", at_most=0.5),
               Target("forward >= 50% of matmul", r"wide_a", "pct_matmul_peak", mode="fwd", at_least=50.0),
               Target("compile >= 1.5x eager", r"wide_a", "speedup", against=("eager",), at_least=1.5,
                      provider="compile"),
               Target("big one runs", r"wide_.", "runs", provider="eager", against=("mtlfast", "sdpa_math"),
                      at_least=1.0),
               Target("broken one runs", r"other", "runs", provider="broken", at_least=1.0),
               Target("cpu only", r".*", "speedup", against=("eager",), at_least=1.0, device="cpu")]
    checks = check_targets(_result_with_rows(), targets)
    got = [(c["goal"], c["case"], c["value"] and round(c["value"], 3), c["compared"], c["status"]) for c in checks]
    assert got == [(">= 3x eager", "wide_a", 4.0, "eager", "met"),
                   (">= 3x eager", "wide_b", None, None, "no data: T·H=32 over the kernel's limit"),
                   (">= 1.3x SDPA", "wide_a", 0.8, "sdpa_flash", "MISSED"),
                   ("<= 1/5 of eager's memory", "wide_a", 0.111, "compile", "met"),
                   ("saved <= 1/2", "wide_a", 0.7, None, "MISSED"),
                   ("forward >= 50% of matmul", "wide_a", None, None, "no data: no mtlfast row in fwd"),
                   ("compile >= 1.5x eager", "wide_a", 2.0, "eager", "met"),
                   ("big one runs", "wide_a", 1.0, "mtlfast ran; sdpa_math refused", "met"),
                   ("big one runs", "wide_b", 1.0, "mtlfast T·H=32 over the kernel's limit", "met"),
                   ("broken one runs", "other", 0.0, None, "MISSED")]
    table = format_targets(checks)
    assert table.splitlines()[0].startswith("| op | goal |")
    assert "| toy | >= 1.3x SDPA | wide_a | fwd+bwd | 0.8 |" in table


def test_target_declarations():
    """Bad declarations are refused; every registered target selects at least one case of its device (a typo in
    a case pattern would otherwise leave a target silently unchecked)."""
    import re

    from mtlfast.bench.harness import Target, load_benchmarks

    with pytest.raises(ValueError, match="Target.metric: expected one of"):
        Target("x", ".*", "speed", against=("eager",), at_least=1.0)
    with pytest.raises(ValueError, match="give exactly one of at_least / at_most"):
        Target("x", ".*", "speedup", against=("eager",))
    with pytest.raises(ValueError, match="needs the providers to compare against"):
        Target("x", ".*", "memory", at_most=1.0)
    benchmarks = load_benchmarks()
    assert {op for op, b in benchmarks.items() if b.targets} >= {"attention", "tpp_attention", "lthd_attention",
                                                                  "iterative_fusion", "em_attention", "deform_sample"}
    for op, benchmark in benchmarks.items():
        names = {device: [c.name for c in benchmark.cases(device)] for device in ("cuda", "cpu")}
        providers = {p.name for p in benchmark.providers}
        for target in benchmark.targets:
            assert any(re.fullmatch(target.cases, n) for n in names[target.device]), (op, target.goal)
            assert target.provider in providers, (op, target.goal)
            if target.against:  # (xformers is a provider only where it is installed)
                assert any(re.fullmatch(a, p) for a in target.against for p in providers), (op, target.goal)


def test_memory_targets_counted_on_meta_tensors_hold():
    """The ``param:`` targets (saved activation bytes counted on meta tensors at the GPU shapes: exact and device
    independent) hold now: tpp and iterative_fusion vs eager, lthd's growth x4 for 4x the tokens (eager's x16),
    em_attention within one N x K and one K x C map per iteration."""
    from mtlfast.bench.harness import check_targets, load_benchmarks

    checked = set()
    for op, benchmark in load_benchmarks().items():
        targets = [t for t in benchmark.targets if t.metric.startswith("param:")]
        rows = [{"case": c.name, "provider": t.provider, "mode": t.mode, "params": dict(c.params)}
                for c in benchmark.cases("cuda") for t in targets]
        for check in check_targets({"op": op, "device_type": "cuda", "rows": rows}, targets):
            assert check["status"] == "met", check
            checked.add(op)
    assert checked == {"tpp_attention", "lthd_attention", "iterative_fusion", "em_attention"}
    (lthd,) = [c for c in load_benchmarks()["lthd_attention"].cases("cuda") if c.name == "lthd_sweep_112x144"]
    assert lthd.params["saved_growth_mtlfast"] == pytest.approx(4.0, rel=0.01)
    assert lthd.params["saved_growth_eager"] > 15


def test_cli_bench_report(tmp_path):
    """`mtlfast bench --report DIR`: the targets of the result files in DIR as a Markdown table (the committed
    CPU deform_sample result meets its CPU target); a folder without result files is an error."""
    import shutil

    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "cpu-2-cores", "deform_sample.json"),
                tmp_path)
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "--report", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| deform_sample | >= 3x the reference on the 2-core CPU | cpu_c256_n4096 | fwd+bwd |" in result.stdout
    assert result.stdout.rstrip().endswith("| eager | met |") and "smoke run" not in result.stdout
    quick = json.loads((tmp_path / "deform_sample.json").read_text())
    (tmp_path / "deform_sample.json").write_text(json.dumps({**quick, "quick": True}))
    result = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "--report", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert "deform_sample.json: a --quick smoke run, not for reporting" in result.stdout, result.stderr
    empty = subprocess.run([sys.executable, "-m", "mtlfast", "bench", "--report", str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=600)
    assert empty.returncode == 1 and "--report: no op result files" in empty.stderr


def test_corrupt_result_files_name_the_path(tmp_path, capsys):
    """A truncated result file (a disk filled mid-copy) fails `bench --resume` (read_result) and `bench --report`
    with an error naming the file, not the JSON decoder's bare position."""
    from mtlfast.cli import main

    path = harness.result_path(str(tmp_path), "cpu", "deform_sample")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"op": "deform_sample", "rows": [')
    with pytest.raises(ValueError, match=f"{path}: not a readable JSON file"):
        harness.read_result(str(tmp_path), "cpu", "deform_sample")
    assert main(["bench", "--report", os.path.dirname(path)]) == 1
    assert f"ValueError: {path}: not a readable JSON file" in capsys.readouterr().err
    os.remove(path)
    with open(os.path.join(os.path.dirname(path), "models.json"), "wb") as f:
        f.write(b"\xff{}")
    assert main(["bench", "--report", os.path.dirname(path)]) == 1
    assert "models.json: not a readable JSON file" in capsys.readouterr().err


def test_gpu_check_first_cases_exist():
    """gpu_check.sh's first benchmark pass names one case per target: every name is a registered GPU case and
    every op with GPU targets has one (a typo would silently measure nothing first)."""
    import re

    from mtlfast.bench.harness import load_benchmarks

    script = open(os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")).read()
    (pattern,) = re.findall(r"first='\^\(([^)]*)\)\$'", script)
    names = pattern.split("|")
    cases = {op: [c.name for c in b.cases("cuda")] for op, b in load_benchmarks().items()}
    assert all(any(n in cs for cs in cases.values()) for n in names), names
    with_gpu_targets = {op for op, b in load_benchmarks().items() if any(t.device == "cuda" for t in b.targets)}
    assert {op for op, cs in cases.items() if set(cs) & set(names)} == with_gpu_targets


def test_compile_provider_compiles_every_case():
    """Each case starts with an empty Dynamo cache: a torch.compile provider run over more shapes than Dynamo's
    recompile limit (8) still compiles every case (without the reset, the later ones ran eagerly, timed as
    "compile")."""
    from torch._dynamo.utils import counters

    def cases(device):
        return [harness.Case(f"n{n}", make=lambda device, dtype, n=n: {"x": torch.randn(n, 3, dtype=dtype)})
                for n in range(1, 11)]

    compiled = torch.compile(lambda x: (2 * x).sin(), backend="eager", dynamic=False)
    benchmark = harness.Benchmark("_toy_compile", cases, [harness.Provider("compile", compiled)])
    counters.clear()
    result = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, modes=("fwd",), quick=True)
    errors = [r.get("error") for r in result["rows"] if "ms" not in r]
    assert not errors and len(result["rows"]) == 10, errors
    assert counters["stats"]["unique_graphs"] == 10, dict(counters["stats"])
    assert not any("recompile" in key for key in counters["unimplemented"]), dict(counters["unimplemented"])


def test_case_errors_are_rows_and_a_lost_cuda_context_stops_the_run(monkeypatch):
    """An input maker or a refuse() that raises gives error rows and the other cases still run (an unattended GPU
    call must not lose every later op to one case); an error after which CUDA cannot synchronise (illegal address:
    every later call fails) stops the run, naming where it happened."""
    def bad_make(device, dtype):
        raise RuntimeError("out of memory at this size")

    def cases(device):
        return [harness.Case("bad", bad_make),
                harness.Case("good", lambda device, dtype: {"x": torch.randn(4, dtype=dtype)})]

    def refuse(inputs):
        raise ValueError("cannot tell")

    benchmark = harness.Benchmark("_toy_errors", cases, [harness.Provider("mtlfast", lambda x: 2 * x),
                                                          harness.Provider("picky", lambda x: x, refuse=refuse)])
    result = harness.run_benchmark(benchmark, device="cpu", dtype=torch.float32, quick=True)
    rows = {(r["case"], r["provider"], r["mode"]): r for r in result["rows"]}
    assert len(rows) == 8 and result["complete"]
    assert {rows[("bad", p, m)]["error"] for p in ("mtlfast", "picky") for m in ("fwd", "fwd+bwd")} == {
        "RuntimeError: out of memory at this size"}
    assert rows[("good", "mtlfast", "fwd+bwd")]["ms"] > 0
    assert rows[("good", "picky", "fwd")]["error"] == "ValueError: cannot tell"

    def lost():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", lost)
    crash = harness.Benchmark("_toy_crash", cases, [harness.Provider("mtlfast", lambda x: x[100])])
    with pytest.raises(RuntimeError, match=r"^good / mtlfast / fwd: IndexError: .*the CUDA context is lost"):
        harness._measure_case(crash, cases("cpu")[1], "cuda", torch.float32, ("fwd",), {}, True, harness._time_cpu, 0)


def test_gpu_check_script_flow(tmp_path):
    """bench/gpu_check.sh with a stand-in python (records its calls, answers at once): a phase that needs the
    install runs build first where mtlfast is not importable, TRITON_INTERPRET is not passed on, the build is for
    sm_90 whatever TORCH_CUDA_ARCH_LIST the image sets, every phase gets a summary line, and $OUT holds exactly
    summary.txt and the tarball of the logs and results."""
    import tarfile

    calls = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "TRITON_INTERPRET=${{TRITON_INTERPRET:-}} ARCH=${{TORCH_CUDA_ARCH_LIST:-}} $*" >>{calls}
case "$1 $2" in
  "-c "*"import mtlfast.bench"*|"-c "*"import xdist"*|"-c "*"import pytest_timeout"*) exit 1 ;;
  "-c "*) exec {sys.executable} "$@" ;;
  "-m mtlfast") [[ $3 == bench && $* != *--report* ]] && exit 3 ;;
esac
exit 0
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_BUDGET": "200", "TRITON_INTERPRET": "1", "MTLFAST_COMMIT": "0" * 40,
           "TORCH_CUDA_ARCH_LIST": "5.2 6.0 7.0 8.0 9.0+PTX"}
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
    result = subprocess.run(["bash", script, "bench"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr  # bench exit 3: cases left
    log = calls.read_text()
    assert "ARCH=9.0 -m pip install --no-deps --no-build-isolation --no-index -e ." in log
    assert "TRITON_INTERPRET=1" not in log
    assert log.index("-m pip install") < log.index("-m mtlfast bench --out bench/results --resume")
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary[:4]] == ["build", "info", "bench", "report"], summary
    assert "incomplete: time budget spent" in summary[2] and summary[-1] == "FAILED or not run: bench"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/build.log", "logs/bench.log", "logs/summary.txt", "results/cpu-2-cores/deform_sample.json"} <= set(
        names)


class _FakeRunner:
    """A stand-in for bench/models.py's runner: a training step of more than ``fits`` images runs out of memory
    (or raises ``error``)."""

    def __init__(self, fits: int, error: Exception | None = None):
        self.fits, self.error, self.tried = fits, error, []
        self.device = torch.device("cpu")
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def batch(self, n):
        return n, None

    def train_step(self, n, labels):
        self.tried.append(n)
        if n > self.fits:
            raise self.error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")


@pytest.mark.parametrize("fits", [0, 1, 3, 100, 255, 256, 1000])
def test_max_batch_search(fits):
    """Doubling then bisection finds the largest batch that fits (OOM above it); 256 is a cap, flagged as a lower
    bound; a passed deadline stops the search with a lower bound; cuBLAS's allocation failure counts as OOM, any
    other error propagates (run_setting records it beside the timings)."""
    from mtlfast.bench import models

    runner = _FakeRunner(fits)
    found = models.max_batch(runner)
    assert found == {"max_train_batch": min(fits, 256), "max_train_batch_capped": fits >= 256,
                     "max_train_batch_complete": True}
    assert len(runner.tried) <= 2 * 9 + 1
    stopped = models.max_batch(_FakeRunner(fits), deadline=time.monotonic() - 1)
    assert stopped == {"max_train_batch": 0, "max_train_batch_capped": False, "max_train_batch_complete": False}
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert models.max_batch(_FakeRunner(fits, cublas))["max_train_batch"] == min(fits, 256)
    if fits < 256:
        with pytest.raises(ValueError, match="bad"):
            models.max_batch(_FakeRunner(fits, ValueError("bad")))


def test_models_results_merge_and_markdown_report(tmp_path, capsys):
    """A run's results replace an earlier run's setting by setting and keep the others; `mtlfast bench --report`
    on a folder with models.json prints the README table with the issue's targets (met / MISSED) on the whole
    peak training memory, and a max batch that is a lower bound shows as >=."""
    from mtlfast.bench import models
    from mtlfast.cli import main

    def result(name, method, train_ms, peak, max_batch=None, capped=False):
        paths = {}
        for path, scale in (("reference", 1.0), ("kernels", 0.7), ("kernels_checkpointed", 0.5)):
            paths[path] = {"train_ms": train_ms * (1 if path == "reference" else 0.75), "train_images_per_s": 1.0,
                           "train_peak_bytes": int(peak * scale), "infer_ms": 1.0}
            if max_batch is not None:
                paths[path].update(max_train_batch=max_batch, max_train_batch_capped=capped,
                                   max_train_batch_complete=True)
        res = {"setting": name, "method": method, "paths": paths}
        for path in ("kernels", "kernels_checkpointed"):
            for key in ("train_ms", "train_peak_bytes"):
                res[f"{key}_ratio_{path}_over_reference"] = paths[path][key] / paths["reference"][key]
        return res

    earlier = [result("tif-swin_t-nyud", "tif", 100, 2**30), result("mtinet-hrnet-nyud", "mtinet", 50, 2**30)]
    merged = models.merge_results(earlier, [result("tif-swin_t-nyud", "tif", 80, 2**31, max_batch=256, capped=True)])
    assert [r["setting"] for r in merged] == ["mtinet-hrnet-nyud", "tif-swin_t-nyud"]
    assert merged[1]["paths"]["reference"]["train_ms"] == 80
    folder = tmp_path / "dev"
    folder.mkdir()
    environment = {"device": "GPU", "torch": "2", "commit": "abc", "date": "today", "source": "x"}
    (folder / "models.json").write_text(json.dumps({"environment": environment, "complete": False,
                                                    "settings_left": ["sem-vit_b-nyud"], "results": merged}))
    assert main(["bench", "--report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "not run yet: sem-vit_b-nyud" in out
    tif_kernels = next(line for line in out.splitlines() if line.startswith("| tif-swin_t-nyud | kernels |"))
    assert "| >= 256 |" in tif_kernels and "time <= 0.8x met" in tif_kernels and "memory <= 0.6x MISSED" in tif_kernels
    checkpointed = next(line for line in out.splitlines() if line.startswith("| tif-swin_t-nyud | kernels_check"))
    assert "memory <= 0.6x met" in checkpointed
    mtinet = next(line for line in out.splitlines() if line.startswith("| mtinet-hrnet-nyud | kernels |"))
    assert "no slower met" in mtinet and "0.6x" not in mtinet
