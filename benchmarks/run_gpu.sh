#!/usr/bin/env bash
# The GPU validation run, in one device call of at most 9 minutes on a fresh H100 / H200, from the repository root:
#
#   bash benchmarks/run_gpu.sh              # every stage, results under $OUT (default ./gpu_out)
#   DRY_RUN=1 bash benchmarks/run_gpu.sh    # on the CPU: every stage at toy sizes (checks the plumbing)
#
# Stages, in order, each under its own `timeout` and each writing $OUT/<stage>.log (and its result files) before
# the next starts, so a stage that fails or hangs still leaves the others' results:
#   build      wheels carried in .whl/ (open_clip_torch, ftfy, wcwidth: fetched beforehand on a machine with a package index)
#              installed with --no-deps into .site/ (no pip resolution of test extras: the machine is offline and
#              its torch / Triton may be older than ours), then `python setup.py build_ext --inplace` with
#              FORCE_CUDA=1, MAX_JOBS=16 and TORCH_CUDA_ARCH_LIST of the visible GPU; env report.
#   ops        pytest -m gpu tests/ops -x -q -rfE (junit xml)
#   learners   pytest -m gpu tests/learners -x -q -rfE (junit xml)
#   profile    benchmarks/profile_gpu.py: CoCoOp B=32 x N=100 and CoOp N=1000, reference / fast / compiled: median
#              of 10 steps (CUDA events), top-30 kernels, host syncs (sync debug mode), peak memory (JSON)
#   floor      pytest benchmarks/test_bench_text_floor.py --benchmark-only (bench.json)
# steps.tsv lists each stage's exit status and seconds. Limits (seconds, sum <= 540 by default): T_BUILD T_OPS
# T_LEARNERS T_PROFILE T_FLOOR. STAGES="ops profile" runs a subset (e.g. on a warm machine already built).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
  # The limits are a GPU call's budget; a CPU dry run (toy sizes, maybe on a shared machine) only checks that
  # each stage runs and writes its files, so it gets generous ones.
  T_DEFAULT=600
else
  T_DEFAULT=
fi
T_BUILD=${T_BUILD:-${T_DEFAULT:-200}}
T_OPS=${T_OPS:-${T_DEFAULT:-80}}
T_LEARNERS=${T_LEARNERS:-${T_DEFAULT:-70}}
T_PROFILE=${T_PROFILE:-${T_DEFAULT:-120}}
T_FLOOR=${T_FLOOR:-${T_DEFAULT:-70}}
STAGES=${STAGES:-build ops learners profile floor}

export PYTHONPATH="$ROOT/.site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "$DRY_RUN" = 1 ]; then
  # Plumbing check on a CPU machine: no extension build (the checkout's own build is used), the GPU test
  # selections are collected (they skip without CUDA), the profile and floor benchmark run at toy sizes.
  PYTEST_DRY=(--co)
  PROFILE_ARGS=(--dry-run)
  FLOOR_K=(-k "coop-N1000")
else
  export FORCE_CUDA=1
  PYTEST_DRY=()
  PROFILE_ARGS=()
  FLOOR_K=()
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    [ -z "$arch" ] && arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST=${arch:-9.0}
  fi
fi

printf 'stage\tstatus\tseconds\n' > "$OUT/steps.tsv"

# stage NAME LIMIT COMMAND...: COMMAND under `timeout LIMIT`, output to $OUT/NAME.log, status to steps.tsv.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status
  echo "=== $name (limit ${limit}s)" > "$OUT/$name.log"
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  status=$?
  [ "$status" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s" >> "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "--- $name: status $status, $((SECONDS - start)) s"
  tail -n 4 "$OUT/$name.log"
  return 0
}

build() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || return 1
  else
    echo "no wheels in .whl/ (fetch open_clip_torch, ftfy and wcwidth wheels there first; using what is installed)"
  fi
  "$PY" -c 'import torch, open_clip; print("torch", torch.__version__, "cuda", torch.version.cuda, "open_clip", open_clip.__version__)' || return 1
  "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton not importable"
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY_RUN: no extension build"
  else
    nvidia-smi || true
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=$FORCE_CUDA MAX_JOBS=$MAX_JOBS"
    "$PY" setup.py build_ext --inplace -q || return 1
  fi
  "$PY" -m fastprompt.cli env
}

for s in $STAGES; do
  case $s in
    build) stage build "$T_BUILD" bash -c "$(declare -f build); PY='$PY'; DRY_RUN='$DRY_RUN'; build" ;;
    ops) stage ops "$T_OPS" "$PY" -m pytest -m gpu tests/ops -x -q -rfE -p no:cacheprovider \
           --junitxml="$OUT/junit-ops.xml" "${PYTEST_DRY[@]}" ;;
    learners) stage learners "$T_LEARNERS" "$PY" -m pytest -m gpu tests/learners -x -q -rfE -p no:cacheprovider \
                --junitxml="$OUT/junit-learners.xml" "${PYTEST_DRY[@]}" ;;
    profile) stage profile "$T_PROFILE" "$PY" benchmarks/profile_gpu.py --out "$OUT" "${PROFILE_ARGS[@]}" ;;
    floor) FASTPROMPT_BENCH_JSON="$OUT/bench.json" stage floor "$T_FLOOR" "$PY" -m pytest \
             benchmarks/test_bench_text_floor.py --benchmark-only -q -p no:cacheprovider "${FLOOR_K[@]}" ;;
    *) echo "unknown stage '$s' (choose from: build ops learners profile floor)" >&2; exit 2 ;;
  esac
done
cat "$OUT/steps.tsv"
