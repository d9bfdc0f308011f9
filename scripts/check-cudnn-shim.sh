#!/usr/bin/env bash
# Builds the cuDNN attention shim with the headers `make build-cuda` unpacked and runs
# tests/cudnn_shim/check.c against the real cuDNN 9 (the pinned wheel, unpacked into a temp dir):
# every failure the shim can meet without a GPU must come back as an error message, not abort
# the process. Needs no GPU. Run `make build-cuda` (or CUDA_CLIPPY=1 scripts/build-cuda.sh) first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
CUDNN_DIR="$VENV/cudnn-$(sha256sum "$ROOT/scripts/cudnn-wheels.txt" | cut -c1-12)"
[[ -f "$CUDNN_DIR/.done" ]] || { echo "no $CUDNN_DIR: run make build-cuda first" >&2; exit 1; }
CU13="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
WORK="$(mktemp -d /tmp/cudnn-shim.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

"$VENV/bin/python" -m pip download -q --disable-pip-version-check --require-hashes --no-deps \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$WORK" \
  -r <(grep '^nvidia-cudnn-cu13' "$ROOT/scripts/cudnn-wheels.txt")
(cd "$WORK" && python3 -m zipfile -e nvidia_cudnn_cu13-*.whl full >/dev/null)
mkdir -p "$WORK/alone" && cp "$WORK/full/nvidia/cudnn/lib/libcudnn.so.9" "$WORK/alone/"

g++ -std=c++17 -O1 -fPIC -Wall -Wextra -Werror -DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING \
  -isystem "$CUDNN_DIR/frontend/include" -isystem "$CUDNN_DIR/cudnn-include" -isystem "$CU13/include" \
  -c "$ROOT/src/flux2/attention/cudnn_sdpa.cpp" -o "$WORK/shim.o"
gcc -Wall -Werror -c "$ROOT/tests/cudnn_shim/check.c" -o "$WORK/check.o"
g++ -o "$WORK/check" "$WORK/check.o" "$WORK/shim.o" -ldl
LD_LIBRARY_PATH="$CU13/lib" "$WORK/check" "$WORK/alone/libcudnn.so.9" "$WORK/full/nvidia/cudnn/lib/libcudnn.so.9"
