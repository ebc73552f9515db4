# syntax=docker/dockerfile:1
# KubeDream's two images, built from this one file:
#
#   docker build --target operator -t REGISTRY/kubedream/operator:0.1.0 .
#   docker build --target trainer  -t REGISTRY/kubedream/trainer:0.1.0 .
#
# Both install the same wheel, built once in the `builder` stage. The operator image carries the
# core dependencies only (no torch); the trainer image adds the `train` extra on a CUDA base.
# Versions come from requirements/constraints.txt, the same pins the tests run with.
#
# Base images are pinned by exact tag. For bit-for-bit reproducible builds pin digests too, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# CUDA 13.2 matches the CUDA runtime the pinned torch wheel is built against (nvidia-*-cu13 13.2
# in constraints.txt); the node needs an NVIDIA driver that supports CUDA 13 (580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.2.1-runtime-ubuntu24.04

# -- builder: the kubedream wheel ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- operator: `kubedream operator` (kopf), no torch ---------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/kubedream/bin:$PATH
# The chart runs the pod as 10001:10001 (values.yaml securityContext), the image says so too.
RUN groupadd --system --gid 10001 kubedream \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin kubedream
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements/constraints.txt,target=/constraints.txt \
    python -m venv /opt/kubedream \
 && /opt/kubedream/bin/pip install --constraint /constraints.txt /wheels/kubedream-*.whl \
 && kubedream --help >/dev/null
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["kubedream", "operator"]

# -- trainer: `kubedream train` with torch, diffusers, transformers, accelerate on CUDA ----------
FROM ${CUDA_IMAGE} AS trainer
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/kubedream/bin:$PATH
# Ubuntu 24.04's Python (3.12); the pins in constraints.txt all have wheels for it.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The operator runs trainer pods as 1000:1000 (render.OperatorDefaults.run_as_user). Ubuntu
# images ship a user `ubuntu` with that uid; replace it with ours.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid 1000 kubedream \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin kubedream
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements/constraints.txt,target=/constraints.txt \
    python3 -m venv /opt/kubedream \
 && /opt/kubedream/bin/pip install --constraint /constraints.txt \
      "$(ls /wheels/kubedream-*.whl)[train]" \
 && kubedream --help >/dev/null
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["kubedream", "train"]
