# The aegaeon image: `aegaeon serve` on a CUDA base, as a non-root user. Build from the repository root:
#
#   docker build -t aegaeon:0.1.0 .
#
# A CPU-only image is the same file on a plain Ubuntu base (the torch wheel runs on the CPU too):
#
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 -t aegaeon:0.1.0-cpu .
#
# docs/deploy.md runs it on Kubernetes (deploy/kubernetes/).

# The CUDA major version of the base matches the one PyTorch's default Linux wheel is built for
# (13.x for torch 2.13): the wheel brings its own CUDA libraries, the base the driver compatibility.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/aegaeon
# The torch release the test suite runs against, installed first and on its own layer: it is most of
# the image and changes least often.
ARG TORCH_SPEC=torch==2.13.0
RUN /opt/aegaeon/bin/pip install "${TORCH_SPEC}"
COPY pyproject.toml /src/
COPY aegaeon /src/aegaeon
RUN /opt/aegaeon/bin/pip install /src

FROM ${BASE_IMAGE}
# A C compiler and Python's headers: the CPU kernels and Triton's GPU kernel launchers are compiled
# on the first run (cached under ~/.cache).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 aegaeon \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/aegaeon --shell /usr/sbin/nologin aegaeon
COPY --from=build /opt/aegaeon /opt/aegaeon
ENV PATH=/opt/aegaeon/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HOME=/home/aegaeon \
    TRITON_CACHE_DIR=/home/aegaeon/.cache/triton \
    MPLCONFIGDIR=/home/aegaeon/.cache/matplotlib
WORKDIR /home/aegaeon
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# 8000: the OpenAI API (role all or api); 7100: a node's port for api servers; 9100: a node's /metrics.
EXPOSE 8000 7100 9100
ENTRYPOINT ["aegaeon", "serve"]
CMD ["--help"]
