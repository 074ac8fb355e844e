#!/usr/bin/env bash
# `make gpu-check`: what a GPU machine should run, installing nothing (such machines may have no network;
# they bring their own torch, pytest, pytest-xdist and hypothesis):
#   1. build the extension for the local card, with every core;
#   2. python -m torch_cs231n check --device cuda;
#   3. the CUDA half of the tests (every test id with "cuda", and the libstdc++ link checks; not the
#      candidates' own), in parallel when pytest-xdist is there;
#   4. the GPU benchmark suite (benchmarks/cases_gpu.py: batch >= 64), float32 against float32, and the
#      convolutions again TF32 against TF32 (torch's default for convolutions);
#   5. while the 6 minutes allow (to LIMIT, 350 s: a step that could not end by then is skipped, one that
#      runs into it is cut short, neither a failure), in this order: the shared-memory kernels under
#      compute-sanitizer's racecheck (tools/sanitize_kernels.py); for each candidate kernel (CANDIDATES
#      below: new kernels that are not the default until they pass here), the tests of its layer with the
#      candidate switched on, then its benchmarks; where each kernel's time goes (benchmarks/profile_gpu.py),
#      the candidates' first.
# Every log goes to one folder (OUT, default gpu-check/), with summary.txt on top. Exit status: 0 when
# every step passed, 1 when one failed, 2 when there is no GPU.
# ONLY=candidates: a round for a short lease of a GPU, once the defaults have passed here: steps 2 and 3
# are left out, and step 4 times only the candidates' ops (the defaults' side of their comparison), so
# that the candidates' tests, benchmarks and profiles fit (raise LIMIT for more of them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
# Candidates, one per line: "name|environment settings|pytest -k expression|bench ops|profile cases" (the
# last three fields space-separated where there are several; a candidate's own tests have "candidate" in
# their names). The TF32 bench repeats the conv2d cases. The candidates share rounds, to keep the check
# under 6 minutes, unless one takes another's layers. Seven candidates have passed here on an H200 and
# became the defaults (docs/benchmarks.md): the implicit GEMM, the depthwise tiles, the flat pool backward and the fused
# running-statistics update (first session of 2026-11-30), then Winograd's F(2x2, 3x3), the depthwise tall
# tiles and one batch-norm block per channel where the channels fill the GPU (2026-11-30, late). Now:
#   TORCH_CS231N_CUDA_CONV_LOADS=async the implicit GEMM's float32 operands copied by cp.async, four stages
#                                      deep (cuda/conv2d_implicit_gemm.cuh): passed its layer's tests on the
#                                      H200 but measured faster only for some layers; its own bitwise test
#                                      has not yet run to its end there
#   TORCH_CS231N_CUDA_CONV=winograd    Winograd with TF32 on too (128+ channels), its GEMMs in TF32
#                                      (cuda/conv2d_winograd.h): the TF32 bench shows it (the float32 one is
#                                      the default there)
#   TORCH_CS231N_CUDA_POINTWISE_DW=samples  a 1x1 layer's d_W by samples, without transposed copies
#                                      (cuda/conv2d.cu): the pointwise case
#   TORCH_CS231N_CUDA_CONV_DW=winograd d_W of the 3x3 stride-1 layers by F(2x2, 3x3) too, in chunks of blocks
#                                      (cuda/conv2d_winograd.cuh), float32 and TF32: the conv3x3 cases
#   TORCH_CS231N_CUDA_CONV_DX=gather   d_x of layers of 1-4 channels gathered from dY, no column buffer
#                                      (cuda/conv2d_few_channels.cuh): the stem
# and in a round of its own, as it takes the same layers as two of those (the implicit GEMM's, and with
# CONV=implicit the 3x3 layers that Winograd would take):
#   TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc the implicit GEMM over channels-last copies, 4 channels a load
#                                      (cuda/conv2d_implicit_gemm_nhwc.cuh): the TF32 bench is its target
# Their tests: their own (ids with "candidate"), and the layer's comparisons with torch and gradchecks on
# CUDA, which take them wherever they fit.
CANDIDATES=(
  "new|TORCH_CS231N_CUDA_CONV_LOADS=async TORCH_CS231N_CUDA_CONV=winograd TORCH_CS231N_CUDA_POINTWISE_DW=samples TORCH_CS231N_CUDA_CONV_DW=winograd TORCH_CS231N_CUDA_CONV_DX=gather|candidate and not nhwc_candidate or conv2d and cuda and (matches_torch or gradcheck or routes)|conv2d|conv3x3 conv3x3_deep stem pointwise"
  "nhwc|TORCH_CS231N_CUDA_CONV=implicit TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc|nhwc_candidate or conv2d and cuda and (matches_torch or gradcheck or routes) and not candidate|conv2d|conv3x3 conv3x3_deep"
)
# The check must finish in 6 minutes: every step after the benchmarks starts only if it is expected to end
# by LIMIT seconds (fits, below), and is stopped there if it has not (a step cut short is reported so, and
# is not a failure: the proven kernels' verdict is in by then).
LIMIT=${LIMIT:-350}
ONLY=${ONLY:-}
case "$ONLY" in
  "" | candidates) ;;
  *)
    echo "gpu-check: ONLY=$ONLY: expected 'candidates' (or unset: the whole check)" >&2
    exit 2
    ;;
esac

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device is visible to $PY's torch: run this on a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
jobs=$(nproc)
summary="$OUT/summary.txt"
echo "gpu-check on $card (compute capability $arch), $jobs cores, $("$PY" -c 'import torch; print("torch", torch.__version__)')" | tee "$summary"

failed=0
# step NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log, and says how it went.
step() {
  local name=$1 start=$SECONDS rc
  shift
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s ($OUT/$name.log)" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}
# late_step NAME SECONDS COMMAND...: a step after the benchmarks, stopped after SECONDS (a hang: a failure)
# or at LIMIT, whichever comes first (and killed 10 s later); cut short at LIMIT, it is reported so and is
# no failure.
late_step() {
  local name=$1 seconds=$2 start=$SECONDS rc capped=0
  shift 2
  if [ $((SECONDS + seconds)) -gt "$LIMIT" ]; then
    seconds=$((LIMIT - SECONDS))
    capped=1
  fi
  timeout -k 10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] && [ "$capped" -eq 1 ]; then
    echo "$name: cut short at the ${LIMIT} s limit after $((SECONDS - start)) s, unfinished ($OUT/$name.log)" |
      tee -a "$summary"
    return "$rc"
  fi
  echo "$name: exit $rc after $((SECONDS - start)) s ($OUT/$name.log)" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" "$PY" setup.py build_ext --inplace || {
  tail -n 30 "$OUT/build.log"
  exit 1
}
# The toolchain's facts, for a crash report: which libstdc++ the compiler would link and which one torch
# loaded, and what the built library needs (an error message that crashes points here first).
{
  cxx=${CXX:-c++}
  echo "$cxx: $($cxx --version | head -n 1)"
  echo "it finds libstdc++.so at $($cxx -print-file-name=libstdc++.so), libstdc++.a at $($cxx -print-file-name=libstdc++.a)"
  "$PY" -c "import torch; from torch_cs231n import _build_config as c; print('torch loaded', c.runtime_libstdcxx())"
  library=$(ls torch_cs231n/_C*.so)
  readelf -d "$library" | grep NEEDED
  echo "std::ostream functions defined in $library: $(nm -D --defined-only "$library" | grep -c _M_insert)"
} >"$OUT/toolchain.log" 2>&1
cat "$OUT/toolchain.log" >>"$summary"
if [ -z "$ONLY" ]; then
  step check "$PY" -m torch_cs231n check --device cuda
  tail -n 15 "$OUT/check.log" >>"$summary"
fi
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n "$jobs")
# Tests of very unequal lengths (the > 2^31-element ones take many seconds): idle workers take pending
# tests from busy ones where pytest-xdist can (3.2 and later).
"$PY" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null &&
  parallel+=(--dist worksteal)
# The candidates' own tests (their names say "candidate") wait for the candidates' round, with its limits.
if [ -z "$ONLY" ]; then
  step pytest-cuda timeout -k 10 240 "$PY" -m pytest -q -k "(cuda or libstdcxx) and not candidate" "${parallel[@]}" \
    --durations=15
  sed -n '/slowest/,$p' "$OUT/pytest-cuda.log" | tail -n 25 >>"$summary"
fi
# One short round each (--quick: 0.2 s of timing a case, ample for kernels of milliseconds), so that the
# 6 minutes leave time for the candidates; `bench --rounds 3` firms up a ratio. With ONLY=candidates, the
# candidates' ops alone ($ops of each, split into words on purpose).
bench_ops=()
if [ -n "$ONLY" ]; then
  for candidate in "${CANDIDATES[@]}"; do
    IFS='|' read -r name setting tests ops cases <<<"$candidate"
    for op in $ops; do bench_ops+=(--op "$op"); done
  done
fi
step bench-gpu "$PY" -m torch_cs231n bench --device cuda --quick "${bench_ops[@]}" --json "$OUT/bench.json"
sed -n '/^op /,$p' "$OUT/bench-gpu.log" >>"$summary"
step bench-gpu-tf32 "$PY" -m torch_cs231n bench --device cuda --quick --op conv2d --tf32 --json "$OUT/bench-tf32.json"
sed -n '/^op /,$p' "$OUT/bench-gpu-tf32.log" >>"$summary"
# What follows is ordered by what it tells, and every step runs only if its expected time still fits in
# the 6 minutes (`fits`), and is cut short at LIMIT (`late_step`; its own time limit is wider): a racecheck
# of the default kernels (and the candidates'); the candidates' tests; their benchmarks; the profiles.
# $setting, $ops and $cases are split into words on purpose (several VAR=value for env, several ops). A
# candidate has never run on a GPU: its steps get a time limit (and a kill 10 s later), so that a kernel
# that hangs cannot hold the machine, and its tests run with CUDA_LAUNCH_BLOCKING=1, so that a fault names
# its kernel.
fits() {  # fits NAME SECONDS: whether a step expected to take that long ends by LIMIT; says so when not
  if [ $((SECONDS + $2)) -le "$LIMIT" ]; then return 0; fi
  echo "$1: skipped, it could end past ${LIMIT} s (the whole check must stay under 6 minutes)" | tee -a "$summary"
  return 1
}
# Shared-memory races, which the CPU emulation cannot show: each shared-memory kernel once on tiny inputs
# under compute-sanitizer's racecheck, when the toolkit has it.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$sanitizer" ]; then
  echo "racecheck: skipped (no compute-sanitizer)" | tee -a "$summary"
elif fits racecheck 45; then
  late_step racecheck 100 "$sanitizer" --tool racecheck --error-exitcode 1 "$PY" tools/sanitize_kernels.py
  tail -n 4 "$OUT/racecheck.log" >>"$summary"
fi
for candidate in "${CANDIDATES[@]}"; do
  IFS='|' read -r name setting tests ops cases <<<"$candidate"
  echo "candidate $name ($setting):" | tee -a "$summary"
  if fits "pytest-$name" 30; then
    late_step "pytest-$name" 150 env CUDA_LAUNCH_BLOCKING=1 $setting "$PY" -m pytest -q -k "$tests" \
      "${parallel[@]}"
    tail -n 3 "$OUT/pytest-$name.log" >>"$summary"
  fi
done
for candidate in "${CANDIDATES[@]}"; do
  IFS='|' read -r name setting tests ops cases <<<"$candidate"
  if fits "bench-$name" 40; then
    late_step "bench-$name" 90 env $setting "$PY" -m torch_cs231n bench --device cuda --quick \
      $(printf -- '--op %s ' $ops) --json "$OUT/bench-$name.json"
    sed -n '/^op /,$p' "$OUT/bench-$name.log" >>"$summary"
  fi
  if [[ " $ops " == *" conv2d "* ]] && fits "bench-$name-tf32" 25; then
    late_step "bench-$name-tf32" 60 env $setting "$PY" -m torch_cs231n bench --device cuda --quick \
      --op conv2d --tf32 --json "$OUT/bench-$name-tf32.json"
    sed -n '/^op /,$p' "$OUT/bench-$name-tf32.log" >>"$summary"
  fi
done
# The profiles explain; the candidates' first (the proven kernels' profile is in docs/benchmarks.md).
for candidate in "${CANDIDATES[@]}"; do
  IFS='|' read -r name setting tests ops cases <<<"$candidate"
  if fits "profile-$name" 30; then
    late_step "profile-$name" 60 env $setting "$PY" -m benchmarks.profile_gpu --steps 3 \
      $(printf -- '--case %s ' $cases)
  fi
done
if fits profile 30; then
  late_step profile 60 "$PY" -m benchmarks.profile_gpu
fi
echo "gpu-check: $([ "$failed" -eq 0 ] && echo "every step passed" || echo "a step failed"); see $summary"
exit "$failed"
