# falcon-serve GPU image.
#
#   docker build -t falcon-serve .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/models/hf -e HF_TOKEN \
#     falcon-serve --model tiiuae/Falcon-H1-7B-Instruct
#
# The CUDA *runtime* base supplies the NVIDIA container-toolkit wiring
# (NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES); the CUDA libraries
# torch uses come with the torch wheel itself. Ubuntu 24.04 gives a stock
# Python 3.12 without third-party PPAs.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc + python3-dev are runtime dependencies, not build leftovers: Triton
# compiles its small C launcher stubs (which include Python.h) on first use.
# Versions are not pinned: the base image tag pins the distribution, and exact
# apt pins break the build as soon as Ubuntu ships a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# Non-root user. Ubuntu 24.04 images already own uid 1000 ("ubuntu"), so use
# 10001; deploy/k8s sets runAsUser/fsGroup to the same id.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin falcon \
    && mkdir -p /models/hf \
    && chown -R falcon:falcon /models

WORKDIR /opt/falcon-serve/src
# Only what `pip install .` needs (see .dockerignore); tests, deploy/ and
# benchmarks stay out of the image.
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY kernels/ kernels/
COPY server/ server/
RUN pip install --no-cache-dir .

# Serving presets, usable as `--config /opt/falcon-serve/configs/<model>.yaml`.
COPY configs/ /opt/falcon-serve/configs/

# Hugging Face cache on a mountable path so weights survive container restarts
# and can be shared (a docker volume, or the model-cache PVC in Kubernetes).
# HF_TOKEN is deliberately NOT set here: pass it at run time (`-e HF_TOKEN`,
# or a Secret in Kubernetes) so no credential is baked into a layer.
ENV HF_HOME=/models/hf
VOLUME ["/models"]

# Numeric so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /home/falcon
EXPOSE 8000

# Long start period: the first start may download tens of GB of weights.
# Python instead of curl keeps the image free of an extra package.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health', timeout=4)"]

ENTRYPOINT ["falcon-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
