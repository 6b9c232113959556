#!/usr/bin/env bash
# The GPU check for a lent H100/H200 (no network; torch + CUDA + triton preinstalled): builds the extension
# with CUDA, compile-checks and unit-tests the C++ core, runs the GPU tests (bf16/fp16/fp32 kernel tests) and
# the rest of the test-suite on the GPU, runs the op benchmarks and the model benchmark, and writes logs and
# result JSON to $OUT, packed into $OUT/gpu_check.tar.gz (the device tool returns few files).
#
#   bash bench/gpu_check.sh [PHASE ...]        PHASE: build test-gpu test bench models, or all (default)
#
# all = build test-gpu test bench: the phases in the order of what matters most. A device call may run 600 s,
# so the phases share a time budget (GPU_CHECK_BUDGET seconds, default 560): each runs under `timeout` with
# what is left, a phase that no longer fits is reported "not run (budget)", and the tarball is written in any
# case. Tests run in GPU_CHECK_WORKERS (default 8) processes where pytest-xdist is installed. The build stays in
# the tree of a warm machine, so the next call goes on with the phases left, e.g.
# `bash bench/gpu_check.sh test bench` or `bash bench/gpu_check.sh models`. BENCH_ARGS passes arguments to
# `mtlfast bench` (e.g. BENCH_ARGS="attention tpp_attention"). After a run, unpack the tarball here and commit
# results/<device>/*.json under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
phases=("$@")
if ((${#phases[@]} == 0)) || [[ ${phases[*]} == all ]]; then
  phases=(build test-gpu test bench)
fi
for p in "${phases[@]}"; do
  case $p in build | test-gpu | test | bench | models) ;;
    *) echo "gpu_check.sh: unknown phase '$p' (build, test-gpu, test, bench, models, all)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-560}))
summary=()
failed=()

run_phase() {  # name, command...: logs to $OUT/logs/<name>.log under the remaining budget
  local name=$1
  shift
  local left=$((deadline - SECONDS - 15))  # keep time to pack the tarball
  if ((left < 30)); then
    summary+=("$(printf '%-10s not run (budget)' "$name")")
    failed+=("$name")
    return
  fi
  echo "== $name (<= ${left} s): $*"
  local start=$SECONDS status
  timeout --kill-after=10 "$left" "$@" >"$OUT/logs/$name.log" 2>&1
  status=$?
  if ((status == 0)); then
    summary+=("$(printf '%-10s ok %6d s' "$name" $((SECONDS - start)))")
  else
    ((status == 124 || status == 137)) && status="timed out"
    summary+=("$(printf '%-10s FAILED (%s) %6d s, see logs/%s.log' "$name" "$status" $((SECONDS - start)) "$name")")
    failed+=("$name")
    tail -n 25 "$OUT/logs/$name.log" | sed 's/^/   | /'
  fi
}

# The GPU image has pytest-xdist and pytest-timeout: tests in parallel processes (they share the GPU; Triton's
# compilations are CPU work), and a hung test fails alone instead of using up the call.
pytest_opts=()
$PY -c "import xdist" 2>/dev/null && pytest_opts+=(-n "${GPU_CHECK_WORKERS:-8}")
$PY -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout=300)

pytest_phase() {  # name, marker expression
  run_phase "$1" $PY -m pytest tests -q -rs -m "$2" --durations=15 --junitxml="$OUT/logs/junit-$1.xml" "${pytest_opts[@]}"
  [[ -f $OUT/logs/$1.log ]] && tail -n 3 "$OUT/logs/$1.log"
}

for phase in "${phases[@]}"; do
  case $phase in
    build)
      { nvidia-smi; $PY -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/logs/environment.log" 2>&1
      run_phase build env MTLFAST_BUILD_CUDA=1 MTLFAST_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        $PY -m pip install --no-deps --no-build-isolation --no-index -e .
      run_phase cmake bash -c "cmake -S . -B build/cmake -G Ninja -DMTLFAST_CUDA=ON && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure"
      run_phase info $PY -m mtlfast info
      ;;
    test-gpu) pytest_phase test-gpu gpu ;;
    test) pytest_phase test "not gpu" ;;
    bench)
      run_phase bench $PY -m mtlfast bench --out "$OUT/results" ${BENCH_ARGS:-}
      # the issues' targets checked on the results (also in bench.log after each op): the README table
      run_phase report bash -c 'for d in "$1"/results/*/; do "$2" -m mtlfast bench --report "$d" || exit 1; done' _ "$OUT" "$PY"
      ;;
    models) run_phase models $PY -m mtlfast bench --models --max-batch --out "$OUT/results" ;;
  esac
done

tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs results
echo "wrote $OUT/gpu_check.tar.gz"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "FAILED or not run: ${failed[*]}"
  exit 1
fi
echo "all phases passed"
