"""Host time per call of the kernel ops' Python layers: the eager way in against the torch.library way.

Every kernel function (:class:`mtlfast.ops._kernel_op.KernelFunction`) is replaced by its fake implementation
(empty outputs of the right shapes) for CPU tensors, so what is timed is the op's checks, backend selection,
torch's dispatcher and autograd: the host time a GPU call spends around its kernel launches, which decides
the small shapes of the benchmarks. It is not kernel speed. The kernel functions' own host work (the key
centring, the launchers) is the same on both ways and not included.

Both ways run in one process, interleaved, each op forward+backward and inference forward (no_grad) on tiny
CPU tensors; the minimum over rounds of the mean per call. The library way is forced as a traced call would
take it (:func:`~mtlfast.ops._kernel_op.library_op_needed` answering True)::

    python -m mtlfast.bench.host_overhead [--out bench/results] [--rounds 7] [--calls 400]

writes ``<out>/host_overhead/cpu-<cores>-cores.json`` (device, versions, commit recorded); bench/gpu_check.sh
runs it on the GPU machine's host CPU too (phase ``host``). The stubs stay registered for the rest of the
process: run it on its own.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

import mtlfast
from mtlfast.bench.harness import device_slug, environment, write_json
from mtlfast.ops import _kernel_op

OPS = ("attention", "tpp_attention", "lthd_attention", "iterative_fusion", "em_attention", "deform_sample")


def stub_kernel_functions() -> int:
    """Every KernelFunction of the ops runs its fake implementation on CPU tensors, on both ways, and the Triton
    backends accept CPU tensors without the interpreter (nothing is computed); returns how many were stubbed."""
    import dataclasses
    import sys

    from mtlfast.backends import OPS as registry

    stubbed = set()  # by identity: lthd_attention's module also holds attention's kernel functions
    for name in OPS:
        for obj in vars(sys.modules[f"mtlfast.ops.{name}"]).values():
            if isinstance(obj, _kernel_op.KernelFunction) and id(obj) not in stubbed:
                obj.fn = obj.fake
                obj.op.register_kernel("cpu", obj.fake)
                stubbed.add(id(obj))
        triton = registry[name].implementations["triton"]
        registry[name].implementations["triton"] = dataclasses.replace(triton, available=lambda device, dtype: None)
    return len(stubbed)


def op_calls() -> dict[str, Callable[[], torch.Tensor]]:
    """Each op's Triton path on tiny CPU tensors that require grad (the sizes do not matter: nothing is computed)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    q, tq, x, mu, values = r(1, 2, 16, 16), r(1, 2, 2, 16, 16), r(1, 16, 16), r(1, 4, 16), r(1, 4, 5, 5)
    coarse = r(1, 4, 16)  # lthd: a 4x4 fine grid (x) and a 2x2 coarse one
    w, alpha, points, weights = r(2, 2, 4), torch.tensor(0.3, requires_grad=True), r(1, 9, 2), r(1, 9, 2)
    ops = mtlfast.ops
    return {
        "attention": lambda: ops.attention(q, q, q, backend="triton"),
        "tpp_attention": lambda: ops.tpp_attention(tq, tq, tq, w, backend="triton"),
        "lthd_attention": lambda: ops.lthd_attention(x, x, coarse, coarse, x, (4, 4), (2, 2), backend="triton"),
        "iterative_fusion": lambda: ops.iterative_fusion(x, x, x, alpha, 4, backend="triton"),
        "em_attention": lambda: ops.em_attention(x, mu, 3, backend="triton")[0],
        "deform_sample": lambda: ops.deform_sample([values, values], points, weights, backend="triton"),
    }


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(rounds: int = 7, calls: int = 400) -> dict[str, dict[str, float]]:
    """op -> {"<way> <mode>": µs per call}, way eager / library, mode fwd+bwd / inference."""
    needed = _kernel_op.library_op_needed
    ways = {"eager": needed, "library": lambda args: True}

    def forward_backward(fn):
        out = fn()
        out.backward(torch.ones_like(out))

    def inference(fn):
        with torch.no_grad():
            fn()

    results = {}
    try:
        for name, fn in op_calls().items():
            runs = {f"{way} {mode}": (rule, runner) for way, rule in ways.items()
                    for mode, runner in (("fwd+bwd", forward_backward), ("inference", inference))}
            best = dict.fromkeys(runs, float("inf"))
            for round_ in range(rounds + 1):  # round 0 warms up
                for key, (rule, runner) in runs.items():
                    _kernel_op.library_op_needed = rule
                    took = _per_call_us(lambda: runner(fn), calls)
                    if round_:
                        best[key] = min(best[key], took)
            results[name] = {key: round(value, 1) for key, value in best.items()}
    finally:
        _kernel_op.library_op_needed = needed
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    stub_kernel_functions()
    result = {"what": "host time per call, kernel functions stubbed (not kernel speed)", "unit": "us",
              "environment": environment("cpu"), "rounds": args.rounds, "calls": args.calls,
              "ops": measure(args.rounds, args.calls)}
    path = write_json(os.path.join(args.out, "host_overhead", f"{device_slug('cpu')}.json"), result)
    for name, row in result["ops"].items():
        print(f"{name:17s} " + "  ".join(f"{key} {value:6.1f}" for key, value in row.items()))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
