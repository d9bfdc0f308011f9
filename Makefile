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

run: ## start the server on port 7000 (env: MODEL_ID, QUANTIZATION, PRELOAD_MODELS, ...)
	$(CARGO) run --release -- serve

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
