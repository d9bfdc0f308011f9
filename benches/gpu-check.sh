#!/usr/bin/env bash
# One-shot GPU check: driver, the CUDA binary, `imagegen bench` and the diffusers baseline on the
# same card, side by side. Built for a GPU box with no network that has the NVIDIA driver and
# PyTorch (CUDA 13) but maybe not diffusers. Finishes inside ~9 minutes (per-phase timeouts).
#
# Carry from the build machine (both git-ignored; `make gpu-prep` makes them):
#   dist/imagegen-cuda13.0-sm90.xz   the CUDA binary (make build-cuda)
#   dist/imagegen-cuda13.0-sm90-cudnn.xz  optional: the cuDNN-conv variant (CUDNN=1 make build-cuda)
#   .whl/                            wheels for missing Python packages (diffusers)
# Writes to $OUT (default ./out/gpu-check): summary.md, results.json, log.txt.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/out/gpu-check}"
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
CAP="${CUDA_COMPUTE_CAP:-90}"
BIN_XZ="${IMAGEGEN_BIN_XZ:-$ROOT/dist/imagegen-cuda13.0-sm${CAP}.xz}"
SCALE="${GPU_CHECK_SCALE:-1}" # multiply every phase timeout (e.g. 2 on a slower card)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
say() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

finish() {
  say "collecting results"
  python3 - "$WORK" "$OUT" "$ROOT/benches/compare.py" <<'PY' || true
import glob, importlib.util, json, os, sys
work, out, compare_py = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("compare", compare_py)
cmp = importlib.util.module_from_spec(spec); spec.loader.exec_module(cmp)
reports = {}
for p in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        reports[os.path.basename(p)[:-5]] = json.load(open(p))
    except Exception as e:
        reports[os.path.basename(p)[:-5]] = {"unreadable": repr(e)}
json.dump(reports, open(os.path.join(out, "results.json"), "w"), indent=1)
md = [open(os.path.join(work, "env.md")).read() if os.path.exists(os.path.join(work, "env.md")) else ""]
for name in ["4b-t2i", "4b-refs"]:
    a, b = reports.get(f"imagegen-{name}"), reports.get(f"diffusers-{name}")
    if a and b and "cases" in a and "cases" in b:
        md += [f"## 4B bf16, {name[3:]}: imagegen vs diffusers (same card, same run)\n", cmp.compare(a, b)]
for name, r in reports.items():
    if "cases" in r:
        md += [f"## {name}\n", cmp.to_markdown(r) if hasattr(cmp, "to_markdown") else ""]
for p in sorted(glob.glob(os.path.join(work, "*.md"))):
    if not p.endswith("env.md"):
        md += [f"## {os.path.basename(p)}\n", open(p).read()]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md))
print("wrote", os.path.join(out, "summary.md"))
PY
  say "done"
}
trap finish EXIT

# --- 1. the card, the driver, the libraries ---------------------------------------------------
say "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || echo "nvidia-smi failed"
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo '```'
} >"$WORK/env.md"
NV="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
LIBDIRS=""
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
  d="$(find "$NV" /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib -name "$lib" -printf '%h\n' 2>/dev/null | head -1)"
  [[ -n "$d" && ":$LIBDIRS:" != *":$d:"* ]] && LIBDIRS="$LIBDIRS:$d"
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [[ -d "$d" ]] && LIBDIRS="$LIBDIRS:$d"; done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

BIN="$WORK/imagegen"
if [[ -f "$BIN_XZ" ]]; then
  xz -dc "$BIN_XZ" >"$BIN" && chmod +x "$BIN"
else
  echo "MISSING $BIN_XZ: run 'make gpu-prep' on the build machine and carry dist/"
fi
ldd "$BIN" 2>&1 | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
"$BIN" --version || echo "the binary does not start"

# diffusers (and anything else missing) from carried wheels.
if ! python3 -c 'import diffusers' 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
python3 -c 'import diffusers; print("diffusers", diffusers.__version__)' || echo "diffusers unavailable: baseline phases will fail"

# --- 2. benches: the most important figures first ---------------------------------------------
T2I="load,t2i-*,upscale-x4plus-1024"
REFS="refs2-1024x768,refs4-1024x768,refs8-1024x768,refs12-1024x768,refs16-1024x768,refs2-768x768,refs8-768x768,refs16-768x768,refs2-512x512,refs8-512x512,refs16-512x512"
rust() { # name timeout args...
  local name=$1 t=$2; shift 2
  say "imagegen bench $name (timeout $((t * SCALE)) s)"
  timeout --kill-after=10 "$((t * SCALE))" "$BIN" bench --device cuda --json-out "$WORK/imagegen-$name.json" "$@" \
    || echo "imagegen bench $name exited with $?"
}
py() { # name timeout args...
  local name=$1 t=$2; shift 2
  say "diffusers baseline $name (timeout $((t * SCALE)) s)"
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$((t * SCALE))" python3 benches/diffusers_baseline.py --device cuda \
    --json-out "$WORK/diffusers-$name.json" "$@" || echo "diffusers baseline $name exited with $?"
}
rust 4b-t2i 100 --random-weights 4B --cases "$T2I" --runs 3
py 4b-t2i 100 --model 4B --cases "$T2I" --runs 3
# One run per attention backend, forced (ATTENTION=<name>): its self-check on this card (max
# error, time per call), then the same cases, so speed and GPU peak line up per backend. A forced
# backend that fails its check stops the binary at load with the reason, which the log keeps.
for backend in ${GPU_CHECK_ATTENTION:-naive cudnn}; do
  rust "4b-attn-$backend" 50 --random-weights 4B --attention "$backend" \
    --cases load,t2i-1024x1024,refs4-1024x768 --runs 2
done
rust 4b-refs 80 --random-weights 4B --cases "$REFS" --runs 2
py 4b-refs 80 --model 4B --cases "$REFS" --runs 2
rust 9b-fp8 40 --random-weights 9B --quantization fp8 --cases load,t2i-1024x1024 --runs 2
rust 9b-int8 40 --random-weights 9B --quantization int8 --cases load,t2i-1024x1024 --runs 2

# The cuDNN-conv variant: same cases where convolutions matter (VAE decode, x4plus), to decide
# which build ships. Runs last: it only compares two builds of imagegen.
BIN_CUDNN_XZ="${BIN_XZ%.xz}-cudnn.xz"
if [[ -f "$BIN_CUDNN_XZ" ]]; then
  xz -dc "$BIN_CUDNN_XZ" >"$WORK/imagegen-cudnn" && chmod +x "$WORK/imagegen-cudnn"
  ldd "$WORK/imagegen-cudnn" 2>&1 | grep -E 'cudnn|not found' || true
  BIN="$WORK/imagegen-cudnn" rust 4b-t2i-cudnn 55 --random-weights 4B \
    --cases load,t2i-1024x1024,upscale-x4plus-1024 --runs 2
else
  echo "no $BIN_CUDNN_XZ: skipping the cuDNN variant"
fi
