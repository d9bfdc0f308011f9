#!/usr/bin/env bash
# Creates the PyTorch venv used only to generate parity fixtures (never by `make test`).
# Idempotent: re-running with the venv present only checks the imports.
set -euo pipefail
VENV="${PARITY_VENV:-.venv-parity}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, diffusers, transformers, safetensors, tokenizers, numpy, PIL, peft; from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, AutoencoderKLFlux2' 2>/dev/null; then
    "$VENV/bin/pip" install --upgrade pip
    # Pinned to releases known to ship Flux2KleinPipeline / Flux2Transformer2DModel / AutoencoderKLFlux2.
    "$VENV/bin/pip" install \
        "torch==2.15.0" \
        "diffusers==0.42.1" \
        "transformers==5.23.0" \
        "tokenizers==0.23.3" \
        "safetensors==0.8.0" \
        "accelerate==1.15.0" \
        "peft==0.21.2" \
        numpy pillow
fi
"$VENV/bin/python" -c 'import torch, diffusers, transformers; from diffusers import Flux2KleinPipeline; print("parity venv ok:", torch.__version__, diffusers.__version__, transformers.__version__)'
