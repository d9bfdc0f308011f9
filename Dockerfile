# syntax=docker/dockerfile:1
# imagegen container: the CUDA build of the binary on a slim CUDA runtime base.
#
#   docker build -t imagegen .                                  # H100/H200 kernels (sm_90a)
#   docker build --build-arg CUDA_COMPUTE_CAP=80 -t imagegen .  # portable PTX: A100 … RTX 5090
#   docker build --build-arg BAKE_REALESRGAN=true -t imagegen . # Real-ESRGAN x4plus inside
#   docker build --build-arg CUDNN=1 -t imagegen .              # cuDNN convolutions (VAE, x4plus)
#   docker build --build-arg FUSED_ATTENTION=0 \
#     --build-arg CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 -t imagegen .
#                                                               # naive attention, no cuDNN
#   docker build --secret id=hf_token,env=HF_TOKEN \
#     --build-arg BAKE_MODEL=black-forest-labs/FLUX.2-klein-4B \
#     --build-arg MODEL_ID=/opt/imagegen/model -t imagegen .    # model weights inside
#
# The build stage compiles exactly like `make build-cuda` (CUDA 13.0 toolkit from PyPI wheels, no
# GPU needed); the runtime stage carries the binary, CA certificates and nothing else of note.

# cuDNN 9 at run time: the fused attention (default) opens it, the CUDNN=1 convolutions link it.
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM rust:1.95-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-venv gcc g++ binutils xz-utils ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG CUDA_COMPUTE_CAP=90
# 1: the cuDNN-conv variant; the runtime image must then carry cuDNN 9 (CUDA_RUNTIME_IMAGE).
ARG CUDNN=0
# 1: cuDNN fused attention for the DiT (opened at run time; falls back to naive without cuDNN).
ARG FUSED_ATTENTION=1
RUN CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP}" CUDNN="${CUDNN}" FUSED_ATTENTION="${FUSED_ATTENTION}" \
    CUDA_TARGET_DIR=/src/target-cuda CUDA_DIST=/src/dist scripts/build-cuda.sh \
    && suffix="$([ "${CUDNN}" = 1 ] && echo -cudnn || true)$([ "${FUSED_ATTENTION}" = 1 ] || echo -naive)" \
    && install -D -m 0755 "/src/dist/imagegen-cuda13.0-sm${CUDA_COMPUTE_CAP}${suffix}" /out/bin/imagegen \
    && install -D -m 0644 /src/.venv-cuda/cuda-link/libcuda.so /out/ci-stub/libcuda.so.1

# Optional weights, fetched at build time so the container starts without network access.
FROM python:3.12-slim-bookworm AS weights
ARG BAKE_REALESRGAN=false
ARG BAKE_MODEL=""
ARG REALESRGAN_X4PLUS_URL=https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth
ARG REALESRGAN_X4PLUS_SHA256=4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1
ARG HF_HUB_VERSION=0.36.0
WORKDIR /out
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=secret,id=hf_token \
    mkdir -p /out/weights /out/model \
    && if [ "${BAKE_REALESRGAN}" = "true" ]; then \
         python3 -c "import urllib.request, sys; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" \
           "${REALESRGAN_X4PLUS_URL}" /out/weights/RealESRGAN_x4plus.pth \
         && echo "${REALESRGAN_X4PLUS_SHA256}  /out/weights/RealESRGAN_x4plus.pth" | sha256sum -c - ; \
       fi \
    && if [ -n "${BAKE_MODEL}" ]; then \
         pip install --no-cache-dir "huggingface_hub==${HF_HUB_VERSION}" \
         && HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
            python3 -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir='/out/model')" \
            "${BAKE_MODEL}" ; \
       fi

FROM ${CUDA_RUNTIME_IMAGE} AS runtime
# curl serves the HEALTHCHECK; ca-certificates the presigned-URL uploads and hub downloads.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/imagegen imagegen \
    && mkdir -p /data/hf /data/weights \
    && chown -R imagegen:imagegen /data
COPY --from=build /out/bin/imagegen /usr/local/bin/imagegen
# Link-time libcuda stub (every call fails with CUDA_ERROR_STUB_LIBRARY). Only CI's GPU-less smoke
# test puts it on LD_LIBRARY_PATH so the binary can start; a real deployment uses the driver's.
COPY --from=build /out/ci-stub/ /opt/imagegen/ci-stub/
COPY --from=weights --chown=imagegen:imagegen /out/weights/ /opt/imagegen/weights/
COPY --from=weights --chown=imagegen:imagegen /out/model/ /opt/imagegen/model/

ARG MODEL_ID=black-forest-labs/FLUX.2-klein-4B
ENV MODEL_ID=${MODEL_ID} \
    QUANTIZATION=none \
    PRELOAD_MODELS=true \
    HOST=0.0.0.0 \
    PORT=7000 \
    HF_HOME=/data/hf \
    UPSCALER_WEIGHTS_DIR=/opt/imagegen/weights \
    LOG_LEVEL=info \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/imagegen
EXPOSE 7000
# /ready is 503 while the model loads or after a failure, so the start period covers a first
# download (~16 GB for 4B) and the load; raise it for 9B on a slow link.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"http://127.0.0.1:${PORT}/ready\""]
ENTRYPOINT ["/usr/local/bin/imagegen"]
CMD ["serve"]
