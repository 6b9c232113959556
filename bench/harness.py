"""Microbenchmark harness behind ``mtlfast bench`` (DESIGN.md §6).

An op plugs in with a module ``bench/bench_<op>.py`` (installed as ``mtlfast.bench.bench_<op>``) that
registers one :class:`Benchmark`::

    from mtlfast.bench.harness import Benchmark, Case, Provider, register, standard_providers

    def cases(device):            # shapes per device: paper shapes on a GPU, small ones on a CPU
        return [Case("bfe_s16", make=lambda device, dtype: {"q": ..., "k": ..., "v": ...}, flops=...)]

    register(Benchmark("attention", cases,
                       standard_providers("attention", mtlfast.ops.attention, reference.attention)
                       + [Provider("sdpa_flash", sdpa_flash, devices=("cuda",), refuse=lambda inputs: ...)]))

For every case, provider and mode (``fwd``: forward under no_grad; ``fwd+bwd``: forward and backward of
all floating inputs with a fixed random cotangent) the harness records the median time, the peak memory
above the inputs (CUDA: ``torch.cuda.max_memory_allocated`` around the measured call) and, where the case
gives its FLOPs or elements moved, TFLOP/s and GB/s as a share of the matmul and copy rates measured in the
same run. A provider that resolves a choice at run time (mtlfast's backend ``auto``, iterative_fusion's mode)
records what it resolved to in the row's ``resolved`` (:class:`Provider`).

Timing on a GPU, two numbers per row:

- ``ms``: ``triton.testing.do_bench``'s median after warm-up (``samples`` calls, ``ms_quartiles``): the L2
  cache is flushed before every call, and while the GPU runs the flush the host queues the call's launches,
  which hides host time up to the flush's duration (tens of µs): device time. Targets are checked on it.
- ``ms_back_to_back``: the median over a few loops of calls issued back to back (no flush) of the time per
  call: what a model's eager forward sees, where the Python layers' host time shows when it exceeds the
  kernels' (small shapes). Reported beside ``ms``, not gated: compiled or CUDA-graphed models do not pay it.

On a CPU a median of ``time.perf_counter`` repetitions after warm-up (host and compute alike), CPU providers
only (Triton's interpreter is never timed). Results go to ``<out>/<device>/<op>.json`` with the device,
torch/triton/CUDA versions, the compiled extension's build and the commit.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

Inputs = dict[str, object]


@dataclass
class Case:
    """One input configuration: ``make(device, dtype)`` builds the op's keyword arguments."""

    name: str
    make: Callable[[str, torch.dtype], Inputs]
    #: forward FLOPs of the formula (what a kernel recomputes on purpose is not counted)
    flops: float | None = None
    #: backward FLOPs as a multiple of ``flops``: 2 where each forward product has two in the backward (the usual
    #: 3x for forward + backward). By FlashAttention-2's convention the attention family counts its backward's
    #: recomputed QKᵀ too (:func:`mtlfast.bench.bench_attention.flash_backward_factor`)
    backward_factor: float = 2.0
    #: forward tensor elements read and written, for memory-bound ops: GB/s uses the run dtype's element size
    elements: float | None = None
    params: Mapping[str, object] = field(default_factory=dict)  # shape facts recorded in the JSON


@dataclass
class Provider:
    """A way to compute the op. ``refuse(inputs)`` returns why it cannot run these inputs, or None;
    ``resolve(inputs)``, what a run-time choice of the provider resolves to on them, e.g. ``{"backend": "triton",
    "mode": "recompute"}``: recorded in the row's ``resolved`` just before it is timed (on a GPU after emptying
    the allocator's cache), and in ``resolved_after_timing`` too where it differs after."""

    name: str
    fn: Callable[..., object]
    devices: tuple[str, ...] = ("cuda", "cpu")
    refuse: Callable[[Inputs], str | None] = lambda inputs: None
    backward: bool = True
    resolve: Callable[[Inputs], Mapping[str, object]] | None = None


@dataclass(frozen=True)
class Target:
    """One goal of the op's issue, checked on a result of :func:`run_benchmark` by :func:`check_targets`.

    ``metric``: "speedup" — the best time among the providers whose name fully matches one of the regular
    expressions ``against``, over mtlfast's (> 1: mtlfast faster); "memory" — mtlfast's peak memory over
    the least of theirs; "pct_matmul_peak" / "pct_copy_peak" — mtlfast's rate as a share of the peak
    measured in the same run; "param:<name>" — a number the case records in its params (e.g. saved
    activation bytes counted on meta tensors); "runs" — 1 when the provider was timed, 0 when it failed
    (e.g. out of memory), with the outcome of the ``against`` providers in ``compared``. Checked on the cases
    whose name fully matches ``cases``, in
    ``mode``, on results of ``device`` ("cuda": the issues' H100/H200 targets) in the device's default dtype
    (:data:`DEFAULT_DTYPES`: the issues' bf16 on a GPU), for ``provider`` ("mtlfast", the op's ``auto`` choice,
    unless a goal concerns another of our paths, e.g. "mtlfast_triton").
    """

    goal: str
    cases: str
    metric: str
    mode: str = "fwd+bwd"
    provider: str = "mtlfast"
    against: tuple[str, ...] = ()
    at_least: float | None = None
    at_most: float | None = None
    device: str = "cuda"

    def __post_init__(self) -> None:
        known = ("speedup", "memory", "pct_matmul_peak", "pct_copy_peak", "runs")
        if self.metric not in known and not self.metric.startswith("param:"):
            raise ValueError(f"Target.metric: expected one of {', '.join(known)} or param:<name>, got {self.metric!r}")
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError(f"Target {self.goal!r}: give exactly one of at_least / at_most")
        if self.metric in ("speedup", "memory") and not self.against:
            raise ValueError(f"Target {self.goal!r}: metric {self.metric} needs the providers to compare against")


@dataclass
class Benchmark:
    op: str
    cases: Callable[[str], list[Case]]
    providers: list[Provider]
    targets: list[Target] = field(default_factory=list)


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.op] = benchmark
    return benchmark


def load_benchmarks() -> dict[str, Benchmark]:
    """Imports every ``mtlfast.bench.bench_*`` module (each registers its benchmark)."""
    import mtlfast.bench

    for module in pkgutil.iter_modules(mtlfast.bench.__path__):
        if module.name.startswith("bench_"):
            importlib.import_module(f"mtlfast.bench.{module.name}")
    return BENCHMARKS


def standard_providers(op_name: str, op_fn: Callable, reference_fn: Callable, *, compile: bool = True,
                       resolve: Callable[[Inputs], Mapping[str, object]] | None = None) -> list[Provider]:
    """mtlfast (backend ``auto``; its rows record the backend it resolved to, and what ``resolve(inputs)``
    adds), eager reference, and torch.compile of the reference."""
    from mtlfast.backends import OPS

    def auto_backend(inputs: Inputs) -> str:
        tensor = next(t for t in _tensors(inputs))
        return OPS[op_name].select("auto", tensor.device, tensor.dtype, check_limits=False).backend

    def mtlfast_refuse(inputs: Inputs) -> str | None:
        if auto_backend(inputs) == "reference":
            device = next(t for t in _tensors(inputs)).device.type
            return f"auto resolves to the reference on {device} (no kernel there)"
        return None

    def mtlfast_resolve(inputs: Inputs) -> dict[str, object]:
        return {"backend": auto_backend(inputs), **(resolve(inputs) if resolve is not None else {})}

    # backend="auto" given: a use_backend scope or MTLFAST_BACKEND would otherwise time another backend than the
    # rows record
    providers = [Provider("mtlfast", functools.partial(op_fn, backend="auto"), refuse=mtlfast_refuse,
                          resolve=mtlfast_resolve),
                 Provider("eager", reference_fn)]
    if compile:
        providers.append(Provider("compile", torch.compile(reference_fn, dynamic=False)))
    return providers


# --- measurement ----------------------------------------------------------------------------------------

def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _with_grad(inputs: Inputs) -> Inputs:
    def leaf(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().requires_grad_(True)
        if isinstance(v, (list, tuple)):
            return type(v)(leaf(x) for x in v)
        return v

    return {k: leaf(v) for k, v in inputs.items()}


def _callable_for(provider: Provider, inputs: Inputs, mode: str) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """A zero-argument closure timing one call in ``mode``, and the leaves whose grads must be reset."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                provider.fn(**inputs)
        return run, []
    grad_inputs = _with_grad(inputs)
    leaves = [t for t in _tensors(grad_inputs) if t.requires_grad]
    outs = [o for o in _tensors(provider.fn(**grad_inputs)) if o.requires_grad]
    cotangents = [torch.randn_like(o) for o in outs]

    def run():
        results = [o for o in _tensors(provider.fn(**grad_inputs)) if o.requires_grad]
        torch.autograd.backward(results, cotangents)
    return run, leaves


def _summary(times: Sequence[float]) -> dict[str, object]:
    """``ms`` (median), ``samples`` and ``ms_quartiles`` of per-call times."""
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"ms": statistics.median(times), "samples": len(times),
            "ms_quartiles": [quartiles[0], quartiles[2]]}


def _time_cpu(run: Callable[[], None], leaves: list[torch.Tensor], quick: bool) -> dict[str, object]:
    """:func:`_summary` of repeated calls after warm-up (CPU, host clock)."""
    warmup, budget_s, max_reps = (1, 0.05, 3) if quick else (3, 1.0, 50)
    for _ in range(warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _time_cuda(run: Callable[[], None], leaves: list[torch.Tensor], quick: bool) -> dict[str, object]:
    """do_bench's per-call device times (L2 flushed before each call; module docstring) and the back-to-back
    time per call."""
    from triton.testing import do_bench

    times = do_bench(run, warmup=5 if quick else 25, rep=20 if quick else 100, grad_to_none=leaves or None,
                     return_mode="all")
    timing = _summary(times)
    timing["ms_back_to_back"] = time_back_to_back(run, leaves, timing["ms"], quick)
    return timing


def time_back_to_back(run: Callable[[], None], leaves: Sequence[torch.Tensor], estimate_ms: float,
                      quick: bool = False) -> float:
    """Median over loops of calls issued back to back, without cache flush or synchronisation between them, of
    the milliseconds per call (CUDA events around each loop): the larger of the host's and the device's time
    per call. Each of 3 loops runs about 20 ms (5 ms in ``quick``; about half of do_bench's time): as many calls
    as ``estimate_ms`` (the device time of one) fits, up to 1000, and no more calls once the host has spent the
    loop's time (a host-bound call takes longer than the estimate); a call of more than half a loop (whose host
    time hardly counts) is timed once. Grads of ``leaves`` are reset before each call, as do_bench does."""
    loop_ms, loops = (5.0, 3) if quick else (20.0, 3)
    calls = min(1000, int(loop_ms / max(estimate_ms, 1e-3)))
    if calls < 2:
        calls, loops = 1, 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(loops):
        torch.cuda.synchronize()
        start.record()
        began, done = time.perf_counter(), 0
        while done < calls and (done == 0 or time.perf_counter() - began < loop_ms / 1e3):
            for t in leaves:
                t.grad = None
            run()
            done += 1
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / done)
    return statistics.median(per_call)


def cuda_peak_and_start(run: Callable[[], None], leaves: Sequence[torch.Tensor] = ()) -> tuple[int, int]:
    """(peak CUDA memory allocated during ``run()``, what was allocated before it), grads of ``leaves`` reset first."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), start


def peak_memory_cuda(run: Callable[[], None], leaves: Sequence[torch.Tensor] = ()) -> int:
    """Peak CUDA memory allocated during ``run()`` above what was allocated before it (grads reset first)."""
    peak, start = cuda_peak_and_start(run, leaves)
    return peak - start


def saved_activation_bytes(fn, inputs, exclude: Sequence[torch.Tensor] = (),
                           recomputed: list[int] | None = None,
                           by_owner: tuple[Callable[[], str], dict[str, int]] | None = None) -> int:
    """Bytes of the distinct storages kept for the backward when ``fn(**inputs)`` returns: what autograd saved
    (pack hooks) for the graphs still alive (a graph dropped inside ``fn``, such as an unused output's, keeps
    nothing) and the inputs of activation checkpoints (``torch.utils.checkpoint``, e.g.
    mtlfast.nn.common.checkpoint_stage: kept for the recomputation; no pack hook sees them). The inputs' own
    storages and those of ``exclude`` (e.g. a model's parameters and buffers) are not counted. Works on meta
    tensors. ``recomputed``: a list that gets, per checkpoint taken, the bytes its recomputation saves in the
    backward, on top of the returned count while that checkpoint's backward runs (its function run again on its
    inputs: meant for meta tensors, since on real ones a second forward updates buffers such as BatchNorm's).
    ``by_owner = (owner, counts)``: ``counts[owner()]`` gets the bytes of each storage under the name ``owner()``
    returns when the storage is first kept (a pack hook, or the call of the checkpoint it is an input of), e.g.
    the innermost running block (:func:`mtlfast.models.summary.running_block`); the counts add up to the total."""
    from mtlfast.nn.common import record_checkpoints

    own = {t.untyped_storage()._cdata for t in [*inputs.values(), *exclude] if isinstance(t, torch.Tensor)}

    class Packed:
        """What a pack hook hands autograd: the graph holds it, so it dies with a graph that is dropped."""
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    def recorder(records: list, attributed=None, held: list | None = None):
        """A pack hook noting (weak ref to what the graph holds, storage, bytes, owner) of each saved tensor;
        with ``held``, a hook for tensors kept whatever the graphs hold (held there, so that no later storage
        reuses their addresses)."""
        def pack(t):
            packed, storage = Packed(t), t.untyped_storage()
            name = attributed[0]() if attributed is not None else None
            if held is not None:
                held.append(packed)
            records.append((weakref.ref(packed), storage._cdata, storage.nbytes(), name))
            return packed
        return pack

    def live_bytes(records: list, skip: set[int], counts: dict[str, int] | None = None) -> int:
        """Bytes of the distinct storages the graphs still hold: a graph dropped inside the forward (an output
        discarded, as SEM's reconstruction in the reference em_attention) kept nothing for the backward. A live
        record's storage is alive, so no other live record reuses its address."""
        seen: set[int] = set(skip)
        total = 0
        for ref, key, nbytes, name in records:
            if ref() is not None and key not in seen:
                seen.add(key)
                total += nbytes
                if counts is not None:
                    counts[name] = counts.get(name, 0) + nbytes
        return total

    def tensors_of(args) -> list[torch.Tensor]:
        return [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]

    records: list = []
    pack = recorder(records, by_owner)
    held: list = []  # the checkpoints' inputs: kept for the recomputation
    keep = recorder(records, by_owner, held)

    def keep_checkpoint_inputs(function, args, kwargs) -> None:
        for t in tensors_of(args):
            keep(t)

    with (record_checkpoints(on_call=keep_checkpoint_inputs) as calls,
          torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed.tensor)):
        out = fn(**inputs)
    total = live_bytes(records, own, by_owner[1] if by_owner is not None else None)
    del out
    for function, args, kwargs in calls if recomputed is not None else ():
        kept = {t.untyped_storage()._cdata for t in tensors_of(args)}
        inner: list = []
        with torch.autograd.graph.saved_tensors_hooks(recorder(inner), lambda packed: packed.tensor):
            result = function(*args, **kwargs)
        recomputed.append(live_bytes(inner, own | kept))
        del result
    return total


def saved_bytes_eager_vs_kernel(eager: Callable, kernel: Callable, shapes: Mapping[str, Sequence[int]],
                                dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """:func:`saved_activation_bytes` of the literal reference ``eager(**inputs)`` and of the kernel path
    ``kernel(**inputs)`` (its custom ops' fake implementations) on meta tensors of ``shapes`` ({name: shape}) in
    ``dtype`` that require grad: exact and device independent. -> ``saved_bytes_eager``, ``saved_bytes_mtlfast``
    and their ``saved_ratio``, the params the benchmarks' saved-memory targets read."""
    inputs = {name: torch.empty(shape, device="meta", dtype=dtype).requires_grad_() for name, shape in shapes.items()}
    eager_bytes, ours = saved_activation_bytes(eager, inputs), saved_activation_bytes(kernel, inputs)
    return {"saved_bytes_eager": eager_bytes, "saved_bytes_mtlfast": ours, "saved_ratio": ours / eager_bytes}


def measure_peaks(device: str) -> dict[str, float]:
    """The device's bf16 matmul rate (TFLOP/s) and copy bandwidth (GB/s, read+write), measured now."""
    if device != "cuda":
        return {}
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    src = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return {"matmul_bf16_tflops": 2 * n**3 / ms / 1e9, "copy_gbs": 2 * src.numel() * 2 / copy_ms / 1e6}


def environment(device: str) -> dict[str, object]:
    """Device, versions and commit recorded in every result file."""
    env: dict[str, object] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "source": source_fingerprint(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "extension": _extension_build(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda":
        env["driver"] = _nvidia_driver()
    return env


def _extension_build() -> str:
    """``torch.ops.mtlfast.build_info()`` of the compiled extension (OpenMP, compiler, CUDA runtime and arches,
    and OpenMP's thread count when it loaded), or why it is not loaded."""
    from mtlfast import _ext

    status = _ext.status()
    return status.build_info if status.loaded else f"not loaded: {status.reason}"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    """Folder name under bench/results: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-2-cores``."""
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{os.cpu_count()}-cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MTLFAST_COMMIT")
    return commit + ("+dirty" if dirty else "")


def _nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


#: ``skipped`` reason of the rows of a case that a run with a time budget did not get to (resumable).
NOT_RUN = "not run: the time budget was spent"


def source_fingerprint() -> str:
    """SHA-256 over the sources that decide a measurement: the Python files of mtlfast and its kernels,
    models and bench packages, and the C++/CUDA sources next to an editable install. Results and docs are
    not part of it, so a commit that only adds result files keeps it (unlike the commit hash), and it needs
    no git checkout (the GPU machine gets a copy of the tree)."""
    import hashlib

    import mtlfast

    root = os.path.dirname(os.path.abspath(mtlfast.__file__))
    folders = [root] + [p for name in ("kernels", "models", "bench")
                        for p in importlib.import_module(f"mtlfast.{name}").__path__]
    csrc = os.path.join(os.path.dirname(root), "csrc")
    folders += [csrc] if os.path.isdir(csrc) else []
    files = sorted({os.path.join(d, f) for folder in folders for d, _, names in os.walk(folder) for f in names
                    if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh"))})
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, os.path.dirname(root)).encode())
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


#: What a resumed run's environment must share with the earlier run's (besides op, dtype and modes).
RESUME_ENVIRONMENT = ("device", "source", "extension", "torch", "triton", "cuda", "python")


def resumable(previous: Mapping[str, object] | None, op: str, dtype: torch.dtype, modes: Sequence[str],
              device: str, quick: bool = False) -> tuple[bool, str]:
    """Whether ``run_benchmark(..., previous=previous)`` on ``device`` may keep ``previous``'s measured cases:
    the same op, dtype and modes as this run, the same device model, :func:`source_fingerprint`, compiled
    extension and versions (:data:`RESUME_ENVIRONMENT`), and neither run a ``quick`` smoke run. Returns (ok, why
    not)."""
    if previous is None:
        return False, "no earlier result"
    if previous.get("quick") or quick:
        return False, "the earlier result is a --quick smoke run" if previous.get("quick") else (
            "this is a --quick smoke run (its rows would be kept beside full ones)")
    now = environment(device)
    earlier = previous.get("environment", {})
    wanted = {"op": op, "dtype": dtype_name(dtype), "modes": list(modes),
              **{key: now[key] for key in RESUME_ENVIRONMENT}}
    found = {"op": previous.get("op"), "dtype": previous.get("dtype"), "modes": previous.get("modes"),
             **{key: earlier.get(key) for key in RESUME_ENVIRONMENT}}
    differ = [f"{key} {found[key]!r} (now {wanted[key]!r})" for key in wanted if found[key] != wanted[key]]
    return not differ, ("earlier result has " + ", ".join(differ)) if differ else ""


def run_benchmark(benchmark: Benchmark, *, device: str, dtype: torch.dtype, modes=("fwd", "fwd+bwd"),
                  peaks: Mapping[str, float] | None = None, quick: bool = False,
                  case_filter: str | None = None, deadline: float | None = None,
                  previous: Mapping[str, object] | None = None,
                  on_case: Callable[[dict[str, object]], None] | None = None) -> dict[str, object]:
    """Measures every case x provider x mode; returns the JSON-ready result (rows + environment).

    A GPU lease is short, so a run can be split: with ``deadline`` (a ``time.monotonic()`` value) no case
    starts after it, and the rows of the cases left carry ``skipped == NOT_RUN``; ``complete`` says whether
    every case of the benchmark has rows measured, ``cases_left`` names the others (left by the deadline or
    by ``case_filter``);
    ``on_case(result)`` is called after every case (the CLI writes the file then, so a killed run keeps what it
    measured); ``previous``, an earlier result that :func:`resumable` accepts, contributes its measured cases
    unchanged (also those ``case_filter`` leaves out), and only the others run. All providers of one case are
    always measured in the same run, so every ratio is a same-run ratio; ``runs`` lists each run's environment
    and peaks, and each row's ``run`` indexes it.
    """
    peaks = dict(peaks or {})
    runs = list(previous.get("runs") or [{"environment": previous["environment"], "peaks": previous.get("peaks", {})}]
                ) if previous else []
    kept = {} if previous is None else {
        case: [r for r in previous["rows"] if r["case"] == case]
        for case in dict.fromkeys(r["case"] for r in previous["rows"])
        if not any(r.get("skipped") == NOT_RUN for r in previous["rows"] if r["case"] == case)}
    run_index = len(runs)
    runs.append({"environment": environment(device), "peaks": peaks})
    rows: list[dict[str, object]] = []
    result = {"op": benchmark.op, "dtype": dtype_name(dtype), "device_type": device,
              "modes": list(modes), "environment": runs[-1]["environment"], "peaks": peaks, "runs": runs,
              "quick": quick, "complete": False, "cases_left": [], "rows": rows}
    time_fn = _time_cuda if device == "cuda" else _time_cpu
    cases = list(benchmark.cases(device))

    def snapshot(position: int) -> dict[str, object]:
        """The result as a file may hold it after case ``position``: the kept rows of the cases still ahead
        (a run killed from here on must not lose them) and those cases' names in cases_left otherwise."""
        ahead = [c.name for c in cases[position + 1:]]
        return {**result, "rows": rows + [{"run": 0, **r} for name in ahead if name in kept for r in kept[name]],
                "cases_left": result["cases_left"] + [name for name in ahead if name not in kept]}

    for position, case in enumerate(cases):
        if case.name in kept:  # also where case_filter leaves it out: runs of different filters add up
            rows += [{"run": 0, **r} for r in kept[case.name]]
            continue
        if case_filter and not re.search(case_filter, case.name):
            result["cases_left"].append(case.name)
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows += [{"case": case.name, "provider": p.name, "mode": mode, "params": dict(case.params),
                      "skipped": NOT_RUN} for p in benchmark.providers for mode in modes]
            result["cases_left"].append(case.name)
            continue
        rows += _measure_case(benchmark, case, device, dtype, modes, peaks, quick, time_fn, run_index)
        if on_case is not None:
            on_case(snapshot(position))
    result["complete"] = not result["cases_left"]
    return result


def measured_now(result: Mapping[str, object]) -> bool:
    """Whether :func:`run_benchmark`'s run measured a case (rows of its own run, not kept from an earlier one,
    and not left by the time budget)."""
    run = len(result["runs"]) - 1
    return any(r.get("run") == run and r.get("skipped") != NOT_RUN for r in result["rows"])


def _measure_case(benchmark: Benchmark, case: Case, device: str, dtype: torch.dtype, modes: Sequence[str],
                  peaks: Mapping[str, float], quick: bool, time_fn, run_index: int) -> list[dict[str, object]]:
    """The rows of one case: every provider in every mode (or why it was skipped / what went wrong)."""
    # Dynamo keeps the graphs of all cases on the reference's code object and, past its recompile limit (8),
    # runs new shapes eagerly with only a warning: the "compile" rows of later cases would time eager code.
    torch._dynamo.reset()
    rows = []
    try:
        inputs = case.make(device, dtype)
    except Exception as exc:  # e.g. out of memory at this size: an error row each, the other cases still run
        error = _error_text(exc)
        _stop_if_cuda_lost(device, f"{case.name} (making the inputs)", error)
        return [{"case": case.name, "provider": p.name, "mode": mode, "run": run_index, "params": dict(case.params),
                 "error": error} for p in benchmark.providers for mode in modes]
    for provider in benchmark.providers:
        for mode in modes:
            row = {"case": case.name, "provider": provider.name, "mode": mode, "run": run_index,
                   "params": dict(case.params)}
            reason = None
            if device not in provider.devices:
                reason = f"{provider.name} does not run on {device}"
            elif mode == "fwd+bwd" and not provider.backward:
                reason = f"{provider.name} has no backward"
            try:  # a refuse() that raises is that provider's error, not the end of the run
                reason = reason or provider.refuse(inputs)
                if reason:
                    rows.append({**row, "skipped": reason})
                    continue
                if device == "cuda":  # run-time choices (resolve, iterative_fusion's auto mode) read free memory:
                    torch.cuda.empty_cache()  # not what earlier rows and cases (or their errors) left cached
                if provider.resolve is not None:
                    row["resolved"] = dict(provider.resolve(inputs))
                run, leaves = _callable_for(provider, inputs, mode)
                row.update(time_fn(run, leaves, quick))
                after = dict(provider.resolve(inputs)) if provider.resolve is not None else None
                if after is not None and after != row["resolved"]:  # e.g. the allocator's cache grew meanwhile
                    row["resolved_after_timing"] = after
                ms = row["ms"]
                if device == "cuda":
                    row["peak_mem_bytes"] = peak_memory_cuda(run, leaves)
                if case.flops:
                    row["tflops"] = (1 if mode == "fwd" else 1 + case.backward_factor) * case.flops / ms / 1e9
                    if "matmul_bf16_tflops" in peaks:
                        row["pct_matmul_peak"] = 100 * row["tflops"] / peaks["matmul_bf16_tflops"]
                if case.elements and mode == "fwd":
                    row["gbs"] = case.elements * dtype.itemsize / ms / 1e6
                    if "copy_gbs" in peaks:
                        row["pct_copy_peak"] = 100 * row["gbs"] / peaks["copy_gbs"]
            except Exception as exc:  # OOM, compile failure...: recorded, the run goes on
                row["error"] = _error_text(exc)
                _stop_if_cuda_lost(device, f"{case.name} / {provider.name} / {mode}", row["error"])
            rows.append(row)
    return rows


def _error_text(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _stop_if_cuda_lost(device: str, where: str, error: str) -> None:
    """Raises when an error left the CUDA context unusable (illegal address, device-side assert): every later
    call in this process would fail, and their rows (kept by --resume) would carry this error under other
    providers' and cases' names. The run stops naming the culprit; the cases measured before it are saved."""
    if device != "cuda":
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        raise RuntimeError(f"{where}: {error}; the CUDA context is lost, nothing more can run in this process "
                           f"({_error_text(exc)})") from exc


def format_table(result: Mapping[str, object]) -> str:
    """Times per case and mode, with each provider's ratio to mtlfast (>1: mtlfast faster), same run; the
    back-to-back time per call (GPU) beside do_bench's, and what mtlfast's run-time choices resolved to."""
    rows = [r for r in result["rows"] if "ms" in r or "error" in r or "skipped" in r]
    lines = [f"== {result['op']} ({result['dtype']}, {result['environment']['device']}) =="]
    b2b = any("ms_back_to_back" in r for r in rows)  # GPU results only
    lines.append(f"{'case':<22} {'mode':<8} {'provider':<16} {'ms':>10} {'x mtlfast':>10} "
                 + (f"{'b2b ms':>10} " if b2b else "") + f"{'peak MiB':>10}  note")
    for case in dict.fromkeys(r["case"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows if r["case"] == case):
            group = [r for r in rows if r["case"] == case and r["mode"] == mode]
            ours = next((r.get("ms") for r in group if r["provider"] == "mtlfast" and "ms" in r), None)
            for r in group:
                ms = r.get("ms")
                ratio = f"{ms / ours:.2f}" if ms and ours else ""
                back_to_back = f"{r['ms_back_to_back']:.3f}" if r.get("ms_back_to_back") is not None else ""
                back_to_back = f"{back_to_back:>10} " if b2b else ""
                mem = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else ""
                notes = [f"{r['pct_matmul_peak']:.0f}% of matmul peak"] if "pct_matmul_peak" in r else []
                after = r.get("resolved_after_timing", {})
                notes += [f"{key} {value}" + (f" (then {after[key]})" if after.get(key, value) != value else "")
                          for key, value in r.get("resolved", {}).items()]
                note = r.get("skipped") or r.get("error") or ", ".join(notes)
                lines.append(f"{case:<22} {mode:<8} {r['provider']:<16} {ms or float('nan'):>10.3f} "
                             f"{ratio:>10} {back_to_back}{mem:>10}  {note}")
    return "\n".join(lines)


def result_device(result: Mapping[str, object]) -> str:
    """"cuda" or "cpu": the kind of device a result file was measured on."""
    return result.get("device_type") or ("cpu" if result["environment"].get("cuda") is None else "cuda")


def check_targets(result: Mapping[str, object], targets: Sequence[Target]) -> list[dict[str, object]]:
    """Every (target, matching case) of a result: ``value`` (None when it cannot be computed), ``status``
    "met", "MISSED" or "no data: <why>", ``compared`` (the provider that set the comparison). Targets of
    another device than the result's are left out, and every target where the result is not in its device's default
    dtype (a float32 run on a GPU is no evidence on the bfloat16 targets)."""
    rows = result["rows"]
    checks = []
    device = result_device(result)
    if result.get("dtype", DEFAULT_DTYPES[device]) != DEFAULT_DTYPES[device]:
        return checks
    for target in (t for t in targets if t.device == device):
        for case in dict.fromkeys(r["case"] for r in rows if re.fullmatch(target.cases, r["case"])):
            group = [r for r in rows if r["case"] == case and r["mode"] == target.mode]
            ours = next((r for r in group if r["provider"] == target.provider), None)
            check = {"op": result["op"], "goal": target.goal, "case": case, "mode": target.mode, "value": None,
                     "compared": None}
            key = {"speedup": "ms", "memory": "peak_mem_bytes"}.get(target.metric, target.metric)
            if target.metric == "runs" and ours is not None and ("ms" in ours or "error" in ours):
                check["value"] = 1.0 if "ms" in ours else 0.0
                check["compared"] = "; ".join(
                    f"{r['provider']} " + ("ran" if "ms" in r else r.get("error") or r.get("skipped", "?"))
                    for r in group if any(re.fullmatch(a, r["provider"]) for a in target.against)) or None
            elif ours is None or ("ms" not in ours and not target.metric.startswith("param:")):
                why = ours.get("skipped") or ours.get("error") if ours else f"no {target.provider} row in {target.mode}"
                check["status"] = f"no data: {why}"
            elif target.metric.startswith("param:"):
                check["value"] = ours["params"].get(target.metric[len("param:"):])
            elif target.metric in ("speedup", "memory"):
                theirs = [r for r in group if r.get(key) is not None
                          and any(re.fullmatch(a, r["provider"]) for a in target.against)]
                if ours.get(key) is None or not theirs:
                    what = target.provider if ours.get(key) is None else f"no provider of {'|'.join(target.against)}"
                    check["status"] = f"no data: {what} has no {key}"
                else:
                    best = min(theirs, key=lambda r: r[key])
                    ratio = best[key] / ours[key] if target.metric == "speedup" else ours[key] / best[key]
                    check["value"], check["compared"] = ratio, best["provider"]
            else:
                check["value"] = ours.get(key)
            if "status" not in check:
                if check["value"] is None:
                    check["status"] = f"no data: {target.provider} has no {key}"
                else:
                    ok = (target.at_least is None or check["value"] >= target.at_least) and (
                        target.at_most is None or check["value"] <= target.at_most)
                    check["status"] = "met" if ok else "MISSED"
            check["bound"] = f">= {target.at_least:g}" if target.at_least is not None else f"<= {target.at_most:g}"
            checks.append(check)
    return checks


def format_targets(checks: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table of :func:`check_targets` rows (for the README's benchmark table)."""
    lines = ["| op | goal | case | mode | measured | target | vs | status |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        value = "" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(f"| {c['op']} | {c['goal']} | {c['case']} | {c['mode']} | {value} | {c['bound']} | "
                     f"{c['compared'] or ''} | {c['status']} |")
    return "\n".join(lines)


#: The dtype the op benchmarks run in by default on each device type, in which the targets are judged.
DEFAULT_DTYPES = {"cuda": "bfloat16", "cpu": "float32"}


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def result_path(out_dir: str, device: str, op: str, dtype: torch.dtype | str | None = None) -> str:
    """``<out_dir>/<device slug>/<op>.json`` in the device's default dtype (:data:`DEFAULT_DTYPES`), else
    ``<op>.<dtype>.json``: a float32 run on a GPU does not replace the bfloat16 results the targets are judged on."""
    name = dtype_name(dtype) if dtype is not None else DEFAULT_DTYPES[device]
    stem = op if name == DEFAULT_DTYPES[device] else f"{op}.{name}"
    return os.path.join(out_dir, device_slug(device), f"{stem}.json")


def read_result(out_dir: str, device: str, op: str, dtype: torch.dtype | str | None = None
                ) -> dict[str, object] | None:
    """The result file :func:`write_result` wrote for ``op`` in ``dtype`` on this device, or None if there is
    none."""
    from mtlfast._files import read_json

    path = result_path(out_dir, device, op, dtype)
    return read_json(path) if os.path.exists(path) else None


def write_json(path: str, data: object) -> str:
    """Writes ``data`` as JSON to ``path`` atomically (:func:`mtlfast._files.write_json_atomically`)."""
    from mtlfast._files import write_json_atomically

    return write_json_atomically(path, data)


def write_result(result: Mapping[str, object], out_dir: str, device: str) -> str:
    return write_json(result_path(out_dir, device, result["op"], result["dtype"]), result)
