#!/usr/bin/env bash
# One command for a GPU machine (H100/H200, no network; torch + CUDA + triton preinstalled):
# builds the extension with CUDA, compile-checks and unit-tests the C++ core, runs the whole test-suite on
# the GPU (bf16/fp16/fp32 kernel tests included), prints `mtlfast info`, runs the benchmarks, and writes
# logs + result JSON to $OUT, packed into $OUT/gpu_check.tar.gz (the device tool returns few files).
#
#   bash bench/gpu_check.sh [all|build|test|bench] [extra args for `mtlfast bench`]
#
# Phases can be run in separate calls on a warm machine (the build stays in the tree). After a run, unpack
# the tarball here and commit results/<device>/*.json under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
shift || true
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=()

run_phase() {  # name, command...: logs to $OUT/logs/<name>.log, remembers failures
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT/logs/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s), last lines:"
    tail -n 25 "$OUT/logs/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

if [[ $phase == all || $phase == build ]]; then
  { nvidia-smi; $PY -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/logs/environment.log" 2>&1
  run_phase build env MTLFAST_BUILD_CUDA=1 MTLFAST_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    $PY -m pip install --no-deps --no-build-isolation --no-index -e .
  run_phase cmake bash -c "cmake -S . -B build/cmake -G Ninja -DMTLFAST_CUDA=ON && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure"
  run_phase info $PY -m mtlfast info
fi
if [[ $phase == all || $phase == test ]]; then
  run_phase tests $PY -m pytest tests -q -rs --durations=25 --junitxml="$OUT/logs/junit.xml"
  tail -n 3 "$OUT/logs/tests.log"
fi
if [[ $phase == all || $phase == bench ]]; then
  run_phase bench $PY -m mtlfast bench --out "$OUT/results" "$@"
fi

tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs results
echo "wrote $OUT/gpu_check.tar.gz"
if ((${#failed[@]})); then
  echo "FAILED phases: ${failed[*]}"
  exit 1
fi
echo "all phases passed"
