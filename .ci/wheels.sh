#!/usr/bin/env bash
# Build fastprompt wheels reproducibly from the committed tree (git HEAD), into dist/ (or $OUT_DIR).
#
#   .ci/wheels.sh pure         fastprompt-X.Y.Z-py3-none-any.whl: Triton + reference ops, any platform (PyPI)
#   .ci/wheels.sh cpu          fastprompt-X.Y.Z+pt<torch>cpu-cp39-abi3-<platform>.whl: + compiled CPU ops
#   .ci/wheels.sh cuda         fastprompt-X.Y.Z+pt<torch>cu<cuda>-cp39-abi3-<platform>.whl: + compiled CPU and
#                              CUDA ops for TORCH_CUDA_ARCH_LIST (default: Ampere, Ada, Hopper, Blackwell)
#   .ci/wheels.sh all          the three
#
# Compiled wheels are abi3 (one wheel for every CPython >= 3.9) but bound to the torch minor release and
# CUDA major version they are built against (torch's C++ ABI is not stable across releases): the build uses
# the torch installed in the current environment, and the local version label names it. Local versions are
# not allowed on PyPI: compiled wheels go to a per-CUDA index (pip install fastprompt --extra-index-url ...).
#
# Environment: PYTHON (default python3), OUT_DIR, TORCH_CUDA_ARCH_LIST, MAX_JOBS (default 2), NVCC_THREADS,
# CUDA_HOME (default /usr/local/cuda). SOURCE_DATE_EPOCH is set from the commit time (reproducible zip stamps).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
OUT_DIR="$(mkdir -p "${OUT_DIR:-dist}" && cd "${OUT_DIR:-dist}" && pwd)"
export MAX_JOBS="${MAX_JOBS:-2}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct)"
DEFAULT_ARCHS="8.0;8.6;8.9;9.0;10.0;12.0"

torch_tag() {  # pt214 for torch 2.14.x
    "$PYTHON" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print("pt" + v[0] + v[1])'
}

build() {  # build KIND: a clean export of HEAD, so nothing uncommitted or previously built leaks in
    local kind="$1" src
    src="$(mktemp -d)"
    git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$src"
    echo "== building the $kind wheel from $(git -C "$ROOT" rev-parse --short HEAD) in $src"
    (
        cd "$src"
        case "$kind" in
            pure) export FASTPROMPT_SKIP_EXT=1 ;;
            cpu)
                export FORCE_CUDA=0
                export FASTPROMPT_LOCAL_VERSION="$(torch_tag)cpu" ;;
            cuda)
                local cuda
                cuda="$("$PYTHON" -c 'import torch; print((torch.version.cuda or "").replace(".", ""))')"
                if [ -z "$cuda" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
                    echo "cuda wheel: needs a CUDA build of torch and nvcc at $CUDA_HOME/bin/nvcc" >&2
                    exit 1
                fi
                export FORCE_CUDA=1
                export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$DEFAULT_ARCHS}"
                export FASTPROMPT_LOCAL_VERSION="$(torch_tag)cu$cuda" ;;
        esac
        "$PYTHON" -m pip wheel . --no-deps --no-build-isolation -w "$OUT_DIR" -q
    )
    rm -rf "$src"
}

case "${1:-all}" in
    pure|cpu|cuda) build "$1" ;;
    all) build pure; build cpu; build cuda ;;
    *) echo "usage: $0 [pure|cpu|cuda|all]" >&2; exit 2 ;;
esac
ls -l "$OUT_DIR"
