# syntax=docker/dockerfile:1
# nvfp4-prep server image for Blackwell GPU nodes (deploy/README.md says how to
# build, push and run it). Build from the repository root:
#   docker build -t registry.example.invalid/ml/nvfp4-prep:0.1.0 .
#
# CUDA comes from one place, torch's PyPI wheels (deploy/requirements-torch.in:
# torch 2.11.0 brings the CUDA 13.0 libraries, so nodes need NVIDIA driver 580
# or newer); the base image is plain Python, and the NVIDIA container runtime
# mounts the driver. The base is named in full: podman and containerd refuse
# short names.
FROM docker.io/library/python:3.12-slim-trixie

LABEL org.opencontainers.image.title="nvfp4-prep" \
      org.opencontainers.image.description="Prepares NVFP4 fused-MoE expert weights for FlashInfer kernels over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# NVIDIA_DRIVER_CAPABILITIES tells the NVIDIA container runtime to mount the
# driver's compute libraries; the device plugin sets NVIDIA_VISIBLE_DEVICES.
ENV VIRTUAL_ENV=/opt/nvfp4-prep \
    PATH=/opt/nvfp4-prep/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN python3 -m venv "$VIRTUAL_ENV"

# Every pip step installs exactly the hashed pins of deploy/lock-image's locks
# (--require-hashes, --no-deps). torch with its CUDA libraries gets a layer of
# its own, then the package's other dependencies, so a code change rebuilds
# only the last, few-MB layer.
WORKDIR /src
COPY deploy/requirements-torch.txt deploy/requirements-server.txt deploy/
RUN pip install --require-hashes --no-deps -r deploy/requirements-torch.txt
# hadolint ignore=DL3059
RUN pip install --require-hashes --no-deps -r deploy/requirements-server.txt
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
# The package itself has no hash to check: it is built here, from the lock's
# setuptools, with no index to fetch anything else from.
RUN pip install --no-deps --no-index --no-build-isolation . \
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
