#!/usr/bin/env bash
# The GPU check for a lent H100/H200 (no network; torch + CUDA + triton preinstalled). A lease is 15 minutes of
# device time in all, so one call (<= 600 s) runs the phases in the order of what matters most, under one time
# budget, and a second call goes on where the first stopped:
#
#   MTLFAST_COMMIT=<sha of the clean HEAD> bash bench/gpu_check.sh [PHASE ...]
#
#   build   extension with CUDA (sm_90), `mtlfast info`                              (~1 min, needed by the rest;
#           if the CUDA build fails, a pure-Python install follows so that the Triton ops still run)
#   ops     the op test files on the GPU: every kernel vs its reference in fp32/fp16/bf16
#   bench   `mtlfast bench --resume --budget ...` into bench/results: cases measured by an earlier call of the
#           same sources are kept, the rest measured until the budget is spent (exit 3: cases left)
#   host    host time per op call around the kernels (bench/host_overhead.py on this machine's CPU, ~15 s): what
#           the small benchmark shapes pay besides the kernels
#   test    the rest of the test-suite on the GPU (models, nn blocks, training under bf16 autocast, SyncBN)
#   models  `mtlfast bench --models --max-batch` (model-level memory/throughput)
#   cmake   the torch-free C++ core with nvcc + ctest (CI does this on every push; here only on request)
#   all     = build ops bench host test (the default)
#
# Every phase runs under `timeout` with what is left of GPU_CHECK_BUDGET (default 560 s); `ops` at most
# GPU_CHECK_OPS_MAX (default 270 s) so that the benchmarks get time in the same call. A phase that no longer
# fits is reported "not run (budget)". Logs, junit XML and every result JSON under bench/results are packed
# into $OUT/gpu_check.tar.gz, next to $OUT/summary.txt (the device tool returns at most 8 files, so nothing
# else is written under $OUT; the work folder is GPU_CHECK_WORK, default a temporary one). Both are refreshed
# while the phases run (the tarball every 15 s), so a call stopped from outside (its limit can be under
# timeout_s when little device time is left: then set GPU_CHECK_BUDGET below it) still returns what it did.
# Phases other than build/cmake on a machine without the install (a fresh one) run build first. Copy the JSON back
# into bench/results/ here: uncommitted, the next call's `bench` resumes them; committed, any later session's
# does as long as the sources, the extension build and the versions are unchanged (harness.resumable: the key is
# harness.source_fingerprint(), not the commit).
# The extension is built for GPU_CHECK_CUDA_ARCH (default 9.0: H100 and H200), whatever TORCH_CUDA_ARCH_LIST says.
# Tests run in GPU_CHECK_WORKERS (default 12) pytest-xdist processes; BENCH_ARGS is passed to `mtlfast bench`
# (e.g. BENCH_ARGS="attention tpp_attention"), MODELS_ARGS to `mtlfast bench --models` (e.g. MODELS_ARGS="--cases tif",
# MODELS_ARGS="--compile": also both paths under torch.compile).
# MTLFAST_COMMIT is recorded in the results where the tree that travelled has no .git.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# The GPU runs the compiled Triton kernels through the `auto` backend: the CPU interpreter, the CPU rehearsal or
# a pinned backend left in the environment would time something else under the "mtlfast" name.
unset TRITON_INTERPRET MTLFAST_SIMULATE_GPU MTLFAST_BACKEND
phases=("$@")
if ((${#phases[@]} == 0)) || [[ ${phases[*]} == all ]]; then
  phases=(build ops bench host test)
fi
for p in "${phases[@]}"; do
  case $p in build | ops | bench | host | test | models | cmake) ;;
    *) echo "gpu_check.sh: unknown phase '$p' (build, ops, bench, host, test, models, cmake, all)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/bench/out}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Installing needs a writable site-packages. Where the image's is not (a non-root user; GPU_CHECK_VENV=1 forces
# this), a venv in the work folder takes the install and sees the image's packages (torch, triton, timm, pip)
# through a .pth file that adds the image's site folders (their own .pth files included): the image's python is
# itself a venv, whose packages --system-site-packages would not show.
if [[ ${GPU_CHECK_VENV:-0} == 1 ]] || ! $PY -c "import os, sys, sysconfig; sys.exit(not os.access(sysconfig.get_paths()['purelib'], os.W_OK))"; then
  if [[ ! -x $WORK/venv/bin/python ]]; then
    $PY -m venv --without-pip "$WORK/venv" || exit 1
    venv_site=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || exit 1
    $PY -c "import sysconfig; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in dict.fromkeys(
      sysconfig.get_paths()[k] for k in ('purelib', 'platlib'))))" >"$venv_site/gpu_check_image.pth" || exit 1
  fi
  PY=$WORK/venv/bin/python
  echo "gpu_check.sh: installing into $WORK/venv, which sees the image's packages"
fi
if ! git rev-parse HEAD >/dev/null 2>&1 && [[ -z ${MTLFAST_COMMIT:-} ]]; then
  echo "gpu_check.sh: no .git here and MTLFAST_COMMIT unset: results will not name their commit" >&2
fi
if [[ " ${phases[*]} " != *" build "* && " ${phases[*]} " =~ \ (ops|bench|host|test|models)\  ]] &&
  ! $PY -c "import mtlfast.bench.harness" 2>/dev/null; then  # a fresh machine: nothing installed yet
  phases=(build "${phases[@]}")
fi
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-560}))
summary=()
failed=()

write_summary() {  # the phases so far (and a line for the one running) -> $OUT/summary.txt
  printf '%s\n' "${summary[@]}" "$@" >"$WORK/logs/summary.txt"
  cp "$WORK/logs/summary.txt" "$OUT/summary.txt"
}
pack() {  # part name: logs + results -> $OUT/gpu_check.tar.gz, renamed into place (a stop mid-write keeps the last)
  cp -r bench/results/. "$WORK/results/" 2>/dev/null
  tar czf "$OUT/gpu_check.$1.tar.gz" -C "$WORK" logs results 2>/dev/null
  (($? <= 1)) && mv -f "$OUT/gpu_check.$1.tar.gz" "$OUT/gpu_check.tar.gz"  # 1: a log grew while read
}
write_summary "(no phase finished yet)"
# Its own part name: a tar left running when it is killed writes no other; no stdout: its last sleep must not hold
# the call's output open.
(while sleep 15; do pack bg; done) </dev/null >/dev/null 2>&1 &
packer=$!

run_phase() {  # name, max seconds (0: no cap), command...: logs to $WORK/logs/<name>.log under the budget
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - SECONDS - 15))  # keep time to pack the tarball
  ((cap > 0 && cap < left)) && left=$cap
  if ((left < 30)); then
    summary+=("$(printf '%-7s not run (budget)' "$name")")
    failed+=("$name")
    return
  fi
  echo "== $name (<= ${left} s): $*"
  write_summary "$(printf '%-7s running (if this is the last line, the call was stopped during it)' "$name")"
  local start=$SECONDS status
  PHASE_SECONDS=$left timeout --kill-after=10 "$left" "$@" >"$WORK/logs/$name.log" 2>&1
  status=$?
  if ((status == 0)); then
    summary+=("$(printf '%-7s ok %6d s' "$name" $((SECONDS - start)))")
    write_summary
    return
  fi
  case $status in
    124 | 137) status="timed out" ;;
    3) [[ $name == bench ]] && status="incomplete: time budget spent, the next call's bench resumes"
       [[ $name == models ]] && status="incomplete: time budget spent, settings left (see the log)" ;;
  esac
  summary+=("$(printf '%-7s FAILED (%s) %6d s, see logs/%s.log' "$name" "$status" $((SECONDS - start)) "$name")")
  failed+=("$name")
  write_summary
  tail -n 25 "$WORK/logs/$name.log" | sed 's/^/   | /'
}

# The GPU image has pytest-xdist and pytest-timeout: tests in parallel processes (they share the GPU; Triton's
# compilations are CPU work: the op tests launch ~500 distinct kernel specialisations in fp32/fp16 on the CPU,
# so ~750 with bf16, at ~0.6 s of one core each for sm_90), and a hung test fails alone instead of using up
# the call. -v lists every test's outcome as it ends, so a phase stopped by its time limit still says what passed.
pytest_opts=(-v -rs --durations=15)
$PY -c "import xdist" 2>/dev/null && pytest_opts+=(-n "${GPU_CHECK_WORKERS:-12}")
$PY -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout=240)
op_tests=(tests/test_attention.py tests/test_tpp_attention.py tests/test_lthd_attention.py
  tests/test_iterative_fusion.py tests/test_em_attention.py tests/test_deform_sample.py tests/test_backends.py)

pytest_phase() {  # name, max seconds, pytest arguments...
  local name=$1 cap=$2
  shift 2
  # one Inductor compile process per xdist worker (its default pool per worker would start ~16 each)
  run_phase "$name" "$cap" env TORCHINDUCTOR_COMPILE_THREADS=1 \
    $PY -m pytest "$@" --junitxml="$WORK/logs/junit-$name.xml" "${pytest_opts[@]}"
  [[ -f $WORK/logs/$name.log ]] && tail -n 2 "$WORK/logs/$name.log"
}

for phase in "${phases[@]}"; do
  case $phase in
    build)
      { nvidia-smi; $PY -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$WORK/logs/environment.log" 2>&1
      # torch's cpp_extension takes CUDA_HOME, else the folder above nvcc's bin/, which for a wrapper script such as
      # /usr/local/bin/nvcc (seen on the CPU machines) is /usr/local, with no CUDA headers: name a toolkit that has them.
      if [[ -z ${CUDA_HOME:-} ]]; then
        for dir in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" /usr/local/cuda; do
          [[ -f $dir/include/cuda_runtime_api.h ]] && { export CUDA_HOME=$dir; break; }
        done
      fi
      # capped: a hung compile must leave time for the pure-Python install and the phases after it. The arch is set
      # here, not taken from the environment: images often set TORCH_CUDA_ARCH_LIST to a list from sm_50 up, which
      # would compile every arch (time) and fail on those nvcc 13 no longer supports (< sm_75).
      run_phase build "${GPU_CHECK_BUILD_MAX:-240}" env MTLFAST_BUILD_CUDA=1 MTLFAST_STRICT_BUILD=1 \
        TORCH_CUDA_ARCH_LIST="${GPU_CHECK_CUDA_ARCH:-9.0}" \
        $PY -m pip install --no-deps --no-build-isolation --no-index -e .
      if [[ ${failed[*]} == *build* ]]; then  # the Triton ops need no extension: keep the rest of the call useful
        rm -f mtlfast/_C.*.so  # an extension left by an earlier call would not be what failed to build now
        run_phase pure 0 env MTLFAST_NO_EXTENSION=1 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
      fi
      run_phase info 0 $PY -m mtlfast info
      ;;
    ops) pytest_phase ops "${GPU_CHECK_OPS_MAX:-270}" "${op_tests[@]}" ;;
    test) pytest_phase test 0 tests "${op_tests[@]/#/--ignore=}" ;;
    bench)
      # First one case per issue target (so that a short lease measures every op a little), then the rest; both
      # resume, so the second pass skips what the first measured. The budget stops new cases ~90 s before the
      # phase's limit (one case with torch.compile takes about that). The first pass takes the 16k-token fusion
      # case of 2 tasks: the batch-48 one (18 steps at B=48, N=16384, 5 providers, two compiles) can take minutes.
      first='^(bfe_s32|bfe_s16|sweep_n4096_w128|sweep_w1024_n4096|tpp_nyud_s16|tpp_sweep_n4096|lthd_nyud_d64|lthd_sweep_112x144|n28x36_T2|n56x72_T4|n16k_T2|em_n4096_r3|sem_c256_r8421)$'
      run_phase bench 0 bash -c 'start=$SECONDS; b() { "$1" -m mtlfast bench --out bench/results --resume \
          --budget $((PHASE_SECONDS - 90 - SECONDS + start)) "${@:2}"; }
        b "$1" --cases "$2" ${3:-}; s=$?; ((s == 0 || s == 3)) || exit $s; b "$1" ${3:-}' \
        _ "$PY" "$first" "${BENCH_ARGS:-}"
      # the issues' targets checked on the results (also in bench.log after each op): the README table
      run_phase report 0 bash -c 'for d in bench/results/*/; do [[ $d == */activations/ || $d == */host_overhead/ ]] && continue
        "$1" -m mtlfast bench --report "$d" || exit 1; done' _ "$PY"
      ;;
    host) run_phase host 0 $PY -m mtlfast.bench.host_overhead --out bench/results ;;
    models)  # the budget stops new settings ~120 s before the phase's limit (a setting with its batch search)
      run_phase models 0 bash -c '"$1" -m mtlfast bench --models --max-batch --out bench/results --budget $((PHASE_SECONDS - 120)) ${2:-}' \
        _ "$PY" "${MODELS_ARGS:-}"
      ;;
    cmake)
      run_phase cmake 0 bash -c "cmake -S . -B build/cmake -G Ninja -DMTLFAST_CUDA=ON && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure"
      ;;
  esac
done

kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
if ((${#failed[@]})); then
  summary+=("FAILED or not run: ${failed[*]}")
else
  summary+=("all phases passed")
fi
write_summary
cat "$OUT/summary.txt"
pack final
rm -f "$OUT/gpu_check.bg.tar.gz"
echo "wrote $OUT/gpu_check.tar.gz"
((${#failed[@]} == 0))
