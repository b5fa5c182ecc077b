# syntax=docker/dockerfile:1.7
# One file, three targets:
#   operator  slim Python, no torch, non-root, read-only root filesystem friendly
#   trainer   PyTorch with its CUDA runtime (the PyPI wheels carry CUDA; the GPU driver comes
#             from the node through the NVIDIA container toolkit), our trainer, bitsandbytes
#   serve     the trainer image running `kubetune serve`
# Dependencies are installed in their own layer from pyproject.toml + constraints.txt before our
# code is copied, so a code change rebuilds seconds, not torch. No secrets enter any layer:
# S3 credentials reach pods from Secrets at run time.
#   docker build --target operator -t kubetune/operator .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# The user every target runs as, with a passwd entry (libraries look the user up) and a home
# on /tmp: pods run with a read-only root filesystem and an emptyDir at /tmp.
RUN useradd --no-log-init --uid 65532 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin kubetune
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY docker/deps.py docker/install.sh ./docker/

FROM base AS operator-deps
RUN sh docker/install.sh deps operator

FROM base AS trainer-deps
RUN sh docker/install.sh deps trainer

# The operator never imports the trainer (tests/unit/test_layout.py): no trainer code is copied.
FROM operator-deps AS operator
COPY kubetune ./kubetune
COPY operator ./operator
RUN sh docker/install.sh app && rm -rf /src
WORKDIR /
ENV HOME=/tmp
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]

FROM trainer-deps AS trainer
COPY kubetune ./kubetune
COPY trainer ./trainer
RUN sh docker/install.sh app && rm -rf /src
WORKDIR /work
ENV HOME=/tmp \
    HF_HOME=/tmp/.cache/huggingface
USER 65532:65532
ENTRYPOINT ["python", "-m", "kubetune_trainer"]

FROM trainer AS serve
EXPOSE 8000
ENTRYPOINT ["kubetune", "serve"]
CMD ["--help"]
