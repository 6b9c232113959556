"""The ``mtlfast`` command: ``info``, ``bench`` (more subcommands arrive with the training pipeline)."""
from __future__ import annotations

import argparse
import os
import sys

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _cmd_info(args: argparse.Namespace) -> int:
    from mtlfast.info import info_text

    print(info_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from mtlfast.bench import harness

    benchmarks = harness.load_benchmarks()
    unknown = [op for op in args.ops if op not in benchmarks]
    if unknown:
        print(f"mtlfast bench: unknown op(s) {', '.join(unknown)}; available: {', '.join(sorted(benchmarks)) or 'none'}",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])
    if device == "cpu":
        print("mtlfast bench: no CUDA device, running the CPU providers only (the C++ CPU kernels, eager and "
              "torch.compile references); Triton kernels are not timed under the interpreter.")
    selected = args.ops or sorted(benchmarks)
    if not selected:
        print("mtlfast bench: no benchmarks registered yet")
        return 0
    peaks = harness.measure_peaks(device)
    modes = tuple(args.modes.split(","))
    for op in selected:
        result = harness.run_benchmark(benchmarks[op], device=device, dtype=dtype, modes=modes, peaks=peaks,
                                       quick=args.quick, case_filter=args.cases)
        print(harness.format_table(result))
        if args.out:
            print(f"wrote {harness.write_result(result, args.out, device)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, built extensions, devices, backend per op")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="microbenchmarks of the ops against eager, torch.compile, SDPA...")
    bench.add_argument("ops", nargs="*", help="ops to benchmark (default: all registered)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    bench.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    bench.add_argument("--cases", help="regular expression selecting case names")
    bench.add_argument("--out", default=os.path.join("bench", "results"),
                       help="results folder (<out>/<device>/<op>.json); '' to not write")
    bench.add_argument("--quick", action="store_true", help="few repetitions (smoke test, not for reporting)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
