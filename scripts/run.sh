#!/usr/bin/env bash
# `make run`: start the server on the right binary for this machine, and say which.
#
# With an NVIDIA GPU (nvidia-smi lists one) it builds the CUDA binary for that GPU's family
# (scripts/build-cuda.sh, cached after the first build) and runs it with the CUDA 13 libraries
# from the build venv; without one it builds and runs the CPU binary. RUN_DEVICE=cpu forces the
# CPU binary on a GPU machine (the server will then warn that the GPU is unused).
# RUN_DRY=1 prints the choice and exits (tests use it with a fake nvidia-smi).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# The kernel family for a compute capability: the families build-cuda.sh builds (see docs/build-cuda.md).
cuda_family() {
  case "$1" in
    8.0 | 8.6 | 8.7) echo 80 ;;
    8.9) echo 89 ;;
    9.*) echo 90 ;;
    12.*) echo 120 ;;
    *) echo 80 ;; # compute_80 PTX, JIT-compiled by newer drivers
  esac
}

gpu=""
if [[ "${RUN_DEVICE:-auto}" != cpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpu="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)"
fi

if [[ -z "$gpu" ]]; then
  echo "make run: no NVIDIA GPU found (or RUN_DEVICE=cpu): building and starting the CPU binary" >&2
  [[ "${RUN_DRY:-0}" == 1 ]] && exit 0
  exec cargo run --release -- serve "$@"
fi

name="${gpu%%,*}"
cap="$(echo "${gpu##*,}" | tr -d ' ')"
family="$(cuda_family "$cap")"
echo "make run: found $name (compute capability $cap): building the CUDA binary for sm_$family" >&2
[[ "${RUN_DRY:-0}" == 1 ]] && exit 0
CUDA_COMPUTE_CAP="$family" scripts/build-cuda.sh
bin="${CUDA_DIST:-$ROOT/dist}/imagegen-cuda13.0-sm${family}"
venv="${CUDA_VENV:-$ROOT/.venv-cuda}"
libs="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
echo "make run: starting $bin (DEVICE=${DEVICE:-auto})" >&2
LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$bin" serve "$@"
