#!/usr/bin/env bash
# Everything the GPU session does, in one call from the repository root of a GPU machine:
#
#   bash benchmarks/run_gpu.sh                 # all steps: setup env tests bench (fits one 600 s device call)
#   bash benchmarks/run_gpu.sh setup env tests # or split over two calls on the warm machine (carry .whl):
#   T_BENCH=570 bash benchmarks/run_gpu.sh bench   # ... the second one gives the benchmarks the whole call
#
# Steps (each under its own time limit, so one failing or hanging step still leaves the others' results):
#   setup  install the wheels carried in .whl/ into .site/ (see /work/shared/gpu/prepare.sh: the machine is
#          offline, torch/triton/pytest/timm are there, open_clip_torch + ftfy + wcwidth come as wheels), then
#          `pip install --no-build-isolation -e ".[test]"` with FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST of the
#          visible GPU (falls back to `--no-deps`, then to `setup.py build_ext --inplace`)
#   env    nvidia-smi and `fastprompt env` (what is built, which backends run)
#   tests  pytest tests -m gpu (junit xml)
#   bench  pytest benchmarks --benchmark-only with FASTPROMPT_BENCH_JSON=$OUT/bench.json
#
# Results go to $OUT (default ./gpu_out): one log per step, steps.tsv (step, exit status, seconds),
# junit-gpu.xml, bench.json. The device tool kills a command after 600 s, so the default limits add up to less
# than that; override with T_SETUP / T_ENV / T_TESTS / T_BENCH (seconds). BENCH_FILES (default: every
# benchmarks/test_bench_*.py, text_floor and training_step first)
# and TEST_ARGS / BENCH_ARGS (extra pytest arguments) narrow a run.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T_SETUP=${T_SETUP:-240}
T_ENV=${T_ENV:-30}
T_TESTS=${T_TESTS:-150}
T_BENCH=${T_BENCH:-150}
# The GPU issues' own measurements first (text engine vs its floor, whole training steps), then the rest: a run cut
# short by its time limit keeps those (bench.json is rewritten after every row).
PRIORITY_BENCH="benchmarks/test_bench_text_floor.py benchmarks/test_bench_training_step.py"
OTHER_BENCH=$(ls benchmarks/test_bench_*.py | grep -v -e test_bench_text_floor -e test_bench_training_step | tr '\n' ' ')
BENCH_FILES=${BENCH_FILES:-$PRIORITY_BENCH $OTHER_BENCH}
TEST_ARGS=${TEST_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}

# open_clip and its text-cleaning deps from .whl/ (installed into .site/), the checkout itself importable even
# if the editable install fails.
export PYTHONPATH="$ROOT/.site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  if [ -z "$arch" ]; then
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  fi
  export TORCH_CUDA_ARCH_LIST=${arch:-9.0}
fi

printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"

# run_step NAME LIMIT COMMAND...: COMMAND under `timeout LIMIT`, output to $OUT/NAME.log, status to steps.tsv.
run_step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status
  echo "=== $name (limit ${limit}s)" | tee -a "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  status=$?
  [ "$status" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s" >> "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$OUT/steps.tsv"
  tail -n 5 "$OUT/$name.log"
  return 0
}

setup() {
  set -e
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  else
    echo "no wheels in .whl/ (run /work/shared/gpu/prepare.sh on the CPU machine and carry .whl)"
  fi
  set +e
  "$PY" -c 'import open_clip; print("open_clip", open_clip.__version__)' || return 1
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=$FORCE_CUDA MAX_JOBS=$MAX_JOBS"
  # Offline: --no-index, so pip resolves the [test] extras against what is installed (.site is on the path).
  "$PY" -m pip install --no-build-isolation --no-index -e ".[test]" && return 0
  echo "editable install with dependency check failed; retrying with --no-deps"
  "$PY" -m pip install --no-build-isolation --no-index --no-deps -e . && return 0
  echo "editable install failed; building the extension in place (the checkout is on PYTHONPATH)"
  "$PY" setup.py build_ext --inplace -q
}

env_report() {
  nvidia-smi
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  "$PY" -m fastprompt.cli env
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(setup env tests bench)
for step in "${steps[@]}"; do
  case $step in
    setup|env|tests|bench) ;;
    *) echo "unknown step '$step' (choose from: setup env tests bench)" >&2; exit 2 ;;
  esac
done
for step in "${steps[@]}"; do
  case $step in
    setup) run_step setup "$T_SETUP" bash -c "$(declare -f setup); PY='$PY'; setup" ;;
    env) run_step env "$T_ENV" bash -c "$(declare -f env_report); PY='$PY'; env_report" ;;
    tests)
      # shellcheck disable=SC2086  # TEST_ARGS is a list of extra arguments
      run_step tests "$T_TESTS" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider \
        --junitxml="$OUT/junit-gpu.xml" $TEST_ARGS ;;
    bench)
      export FASTPROMPT_BENCH_JSON="$OUT/bench.json"
      # shellcheck disable=SC2086  # BENCH_FILES / BENCH_ARGS are lists
      run_step bench "$T_BENCH" "$PY" -m pytest $BENCH_FILES \
        --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json" $BENCH_ARGS ;;
  esac
done
cat "$OUT/steps.tsv"
