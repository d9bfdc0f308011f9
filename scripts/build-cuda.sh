#!/usr/bin/env bash
# Builds the CUDA release binary on a plain x86-64 machine: no GPU, no system CUDA toolkit.
#
# nvcc, headers and the CUDA 13.0 libraries come from PyPI wheels in an ignored venv; libcuda
# (the driver, present only where the binary runs) is replaced at link time by a generated stub
# whose soname is libcuda.so.1. CUDA 13.0 matches an R580 driver: PTX from a newer nvcc would not
# load there. See docs/build-cuda.md for the arch options and how to run the result.
#
# Env knobs:
#   CUDA_COMPUTE_CAP   kernel arch (default 90 → sm_90a: H100/H200 only). 80 → compute_80 PTX,
#                      which the driver JIT-compiles on sm_80, sm_86, sm_89, sm_90 and sm_120.
#   CUDA_TARGET_DIR    cargo target dir prefix (default <repo>/target-cuda); "-sm<cap>" is appended
#                      so each arch keeps its own kernel cache.
#   CUDA_VENV          venv holding the wheels (default <repo>/.venv-cuda)
#   CUDA_DIST          where the stripped and compressed binaries go (default <repo>/dist)
#   CUDAFORGE_THREADS  parallel nvcc jobs (default: number of cores)
#   CUDNN              1 → also enable cuDNN convolutions (cargo feature `cudnn`): the VAE and
#                      Real-ESRGAN convs then skip candle's im2col buffer. Links against the
#                      loader libcudnn.so.9 taken from the nvidia-cudnn-cu13 wheel; the GPU host
#                      needs cuDNN 9 at run time. Outputs get a "-cudnn" suffix.
#   CUDA_CLIPPY        1 → run clippy (-D warnings) with these features instead of building.
#   FUSED_ATTENTION    1 (default) → cuDNN fused attention for the DiT (cargo feature
#                      `cudnn-sdpa`): a C++ shim over the cudnn-frontend headers; cuDNN is opened
#                      at run time, not linked, and the load-time self-check falls back to naive
#                      attention where it is missing or wrong. 0 → naive attention only,
#                      outputs get a "-naive" suffix.
#
# Everything fetched is pinned by version and sha256: scripts/cuda-wheels.txt (toolkit, installed
# into the venv) and scripts/cudnn-wheels.txt (cuDNN and cudnn-frontend, downloaded, unpacked).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

CAP="${CUDA_COMPUTE_CAP:-90}"
CUDNN="${CUDNN:-0}"
FUSED_ATTENTION="${FUSED_ATTENTION:-1}"
VARIANT="sm${CAP}"
FEATURES=cuda
if [[ "$CUDNN" == 1 ]]; then
  VARIANT="sm${CAP}-cudnn"
  FEATURES=cudnn
fi
if [[ "$FUSED_ATTENTION" == 1 ]]; then
  FEATURES="$FEATURES,cudnn-sdpa"
else
  VARIANT="$VARIANT-naive"
fi
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
TARGET_DIR="${CUDA_TARGET_DIR:-$ROOT/target-cuda}-${VARIANT}"
DIST="${CUDA_DIST:-$ROOT/dist}"
PY="${PYTHON:-python3}"

TOOLKIT_WHEELS="$ROOT/scripts/cuda-wheels.txt"
CUDNN_WHEELS="$ROOT/scripts/cudnn-wheels.txt"

log() { printf '\n[build-cuda] %s\n' "$*" >&2; }
start=$(date +%s)

# 1. Toolkit wheels (all land in nvidia/cu13/).
stamp="$VENV/.wheels-$(sha256sum "$TOOLKIT_WHEELS" | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  log "installing CUDA 13.0 wheels into $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps \
    -r "$TOOLKIT_WHEELS"
  touch "$stamp"
fi
CU13="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[[ -x "$CU13/bin/nvcc" ]] || { echo "nvcc missing under $CU13/bin" >&2; exit 1; }
"$CU13/bin/nvcc" --version | tail -2 >&2

# 2. Link directory: unversioned names the linker asks for, plus the libcuda stub.
LINK="$VENV/cuda-link"
mkdir -p "$LINK"
for lib in cublas cublasLt cudart curand nvrtc; do
  found=("$CU13"/lib/lib"${lib}".so.*)
  [[ -e "${found[0]}" ]] || { echo "lib$lib.so.* not found in $CU13/lib" >&2; exit 1; }
  ln -sf "${found[0]}" "$LINK/lib${lib}.so"
done

# cuDNN and cudnn-frontend: downloaded by hash, never installed (cuDNN's engines are 1.5 GB).
# Unpacked are the headers of both and cuDNN's small loader libcudnn.so.9, which is all the
# CUDNN=1 conv variant links against (it dlopens the engines at run time).
CUDNN_DIR="$VENV/cudnn-$(sha256sum "$CUDNN_WHEELS" | cut -c1-12)"
if [[ ("$CUDNN" == 1 || "$FUSED_ATTENTION" == 1) && ! -f "$CUDNN_DIR/.done" ]]; then
  log "fetching cuDNN and cudnn-frontend ($CUDNN_WHEELS)"
  rm -rf "$CUDNN_DIR" && mkdir -p "$CUDNN_DIR/wheels"
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --require-hashes --no-deps \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    -d "$CUDNN_DIR/wheels" -r "$CUDNN_WHEELS"
  "$VENV/bin/python" - "$CUDNN_DIR" <<'PY'
import glob, os, shutil, sys, zipfile
root = sys.argv[1]
def unpack(pattern, prefix, dest):
    wheel = glob.glob(os.path.join(root, "wheels", pattern))[0]
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                rest = name[len(prefix):]  # empty when prefix names one file
                out = os.path.join(root, dest, rest) if rest else os.path.join(root, dest)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
unpack("nvidia_cudnn_cu13-*.whl", "nvidia/cudnn/include/", "cudnn-include")
unpack("nvidia_cudnn_cu13-*.whl", "nvidia/cudnn/lib/libcudnn.so.9", "lib/libcudnn.so")
# The headers include "../include/…": the folder must be called include.
unpack("nvidia_cudnn_frontend-*.whl", "include/", "frontend/include")
PY
  rm -rf "$CUDNN_DIR/wheels"
  touch "$CUDNN_DIR/.done"
fi
if [[ "$CUDNN" == 1 ]]; then ln -sf "$CUDNN_DIR/lib/libcudnn.so" "$LINK/libcudnn.so"; fi
export CUDNN_INCLUDE_DIR="$CUDNN_DIR/cudnn-include" CUDNN_FRONTEND_INCLUDE_DIR="$CUDNN_DIR/frontend/include"

# The stub defines every cu* driver entry point that cudarc's bindings reference, each returning
# CUDA_ERROR_STUB_LIBRARY (34). It exists only to satisfy the linker: the real libcuda.so.1 of the
# GPU host's driver is what the binary loads at run time.
cargo fetch --quiet
CUDARC_DIR="$(cargo metadata --format-version 1 --features cuda 2>/dev/null | "$PY" -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')"
SYMS="$(grep -ohE '\bfn cu[A-Za-z0-9_]+\s*\(' "$CUDARC_DIR"/src/driver/sys/*.rs \
  | sed -E 's/^fn ([A-Za-z0-9_]+).*/\1/' | sort -u)"
nsyms=$(wc -l <<<"$SYMS")
(( nsyms > 100 )) || { echo "only $nsyms driver symbols found in $CUDARC_DIR" >&2; exit 1; }
{
  echo "/* generated by scripts/build-cuda.sh from $(basename "$CUDARC_DIR"): link-time stub only */"
  while read -r s; do echo "int $s(void) { return 34; }"; done <<<"$SYMS"
} >"$LINK/libcuda_stub.c"
cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"
log "libcuda stub: $nsyms symbols from $(basename "$CUDARC_DIR")"

# 3. Build.
export PATH="$CU13/bin:$PATH" NVCC="$CU13/bin/nvcc" CUDA_HOME="$CU13" CUDA_PATH="$CU13"
export CUDA_ROOT="$LINK" CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP="$CAP"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="$TARGET_DIR"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LINK"
if [[ "${CUDA_CLIPPY:-0}" == 1 ]]; then
  # The CUDA-only code (device pools, the cuDNN attention) is linted here, with the real features.
  log "cargo clippy --release --features $FEATURES (target $TARGET_DIR)"
  cargo clippy --release --features "$FEATURES" --bin imagegen -- -D warnings
  exit 0
fi
log "cargo build --release --features $FEATURES (CUDA_COMPUTE_CAP=$CAP, target $TARGET_DIR)"
cargo build --release --features "$FEATURES" --bin imagegen

# 4. Strip, compress, report.
mkdir -p "$DIST"
name="imagegen-cuda13.0-${VARIANT}"
out="$DIST/$name"
cp "$TARGET_DIR/release/imagegen" "$out"
unstripped=$(stat -c %s "$out")
strip "$out"
xz -9 -T0 -k -f "$out"
stripped=$(stat -c %s "$out")
compressed=$(stat -c %s "$out.xz")
(cd "$DIST" && sha256sum "$name" "$name.xz" >"$name.sha256")
end=$(date +%s)
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
log "done in $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
echo "binary:      $out ($(mb "$unstripped") unstripped, $(mb "$stripped") stripped)"
echo "compressed:  $out.xz ($(mb "$compressed"))"
echo "needs at run time:"
ldd "$out" 2>/dev/null | grep -E 'cuda|cublas|curand|nvrtc|cudnn' | sed 's/^/  /' || true
(( compressed < 60000000 )) || { echo "compressed binary exceeds 60 MB" >&2; exit 1; }
