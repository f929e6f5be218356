# syntax=docker/dockerfile:1
# nvfp4-prep server image for Blackwell GPU nodes (deploy/README.md says how to
# build, push and run it). Build from the repository root:
#   docker build -t nvfp4-prep:0.1.0 .
#
# The base image's CUDA must match the CUDA that torch's wheels bring:
# deploy/constraints.txt pins torch 2.11.0, whose PyPI wheels ship CUDA 13.0
# libraries, so nodes need NVIDIA driver 580 or newer. Change both together:
# torch 2.10.0 wheels ship CUDA 12.8 and pair with
# nvidia/cuda:12.8.1-runtime-ubuntu24.04 (driver 570); deploy/README.md says how.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

LABEL org.opencontainers.image.title="nvfp4-prep" \
      org.opencontainers.image.description="Prepares NVFP4 fused-MoE expert weights for FlashInfer kernels over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# Ubuntu 24.04's python3 is 3.12. Distribution packages float with the base
# image's security updates instead of being pinned (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/nvfp4-prep \
    PATH=/opt/nvfp4-prep/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV"

# Every pip step takes its versions from the constraints file. The two heavy
# packages get layers of their own (torch with its CUDA libraries, then
# FlashInfer with CUTLASS DSL), so a code change rebuilds only the last layer.
WORKDIR /src
COPY deploy/constraints.txt deploy/constraints.txt
RUN pip install -c deploy/constraints.txt torch
# hadolint ignore=DL3059
RUN pip install -c deploy/constraints.txt flashinfer-python
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
RUN pip install -c deploy/constraints.txt ".[flashinfer]" \
 && rm -rf build nvfp4_prep.egg-info

RUN groupadd --system --gid 10001 nvfp4-prep \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/nvfp4-prep \
      --shell /usr/sbin/nologin nvfp4-prep
# Kubernetes mounts the root file system read-only; .pyc files were compiled
# at install time.
ENV HOME=/home/nvfp4-prep \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/nvfp4-prep
USER 10001:10001

# gRPC (--port) and Prometheus metrics (--metrics-port): the server's defaults.
EXPOSE 50051 9400
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; deploy/ probes the gRPC health service natively.
ENTRYPOINT ["nvfp4-prep", "serve"]
