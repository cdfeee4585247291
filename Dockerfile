# syntax=docker/dockerfile:1.7
# Two images from one file (Docker does not run on the dev machine: this file is checked by reading):
#   docker build --target api    -t tarq-api .     # FastAPI only: no torch, no CUDA (small)
#   docker build --target worker -t tarq-worker .  # Celery worker with CUDA torch
# PyAV wheels bundle FFmpeg, so neither image needs apt packages for audio.

ARG PYTHON_VERSION=3.11

# ---- build: one wheel of the project, shared by both images ---------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tarq ./tarq
COPY app ./app
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- api: the HTTP API, torch-free ------------------------------------------------------------------------
# Needs pyproject's core dependencies to be torch-free (torch/transformers/compressed-tensors in an ML
# extra that only `worker` pulls); the API imports only tarq.config/audio/errors/formats/artifact_info.
FROM python:${PYTHON_VERSION}-slim AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TARQ_DATA_DIR=/var/lib/tarq
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/tarq-*.whl)[api]" \
    && python -c "import app.main, sys; assert 'torch' not in sys.modules" \
    && useradd --system --uid 10001 --home-dir /var/lib/tarq tarq \
    && mkdir -p /var/lib/tarq && chown tarq /var/lib/tarq
USER tarq
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# uvicorn directly (not `tarq serve`): the API image has no worker and no key generation; keys come
# from TARQ_API_KEYS.
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# ---- worker: Celery + CUDA torch ---------------------------------------------------------------------------
# The CUDA build of torch brings its own CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit (compose reserves the GPU).
FROM python:${PYTHON_VERSION}-slim AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TARQ_DATA_DIR=/var/lib/tarq HF_HOME=/var/lib/tarq/hf
COPY --from=build /wheels /wheels
RUN pip install --extra-index-url "${TORCH_INDEX}" "torch>=2.11,<2.14" \
    && pip install --extra-index-url "${TORCH_INDEX}" "$(ls /wheels/tarq-*.whl)[worker]" \
    && useradd --system --uid 10001 --home-dir /var/lib/tarq tarq \
    && mkdir -p /var/lib/tarq && chown tarq /var/lib/tarq
USER tarq
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A worker.celery_app inspect ping -d "celery@$(hostname)" --timeout 10 || exit 1
# One quantization at a time per GPU; run a second service with -Q transcribe for transcription capacity.
CMD ["tarq", "worker", "-Q", "quantize,transcribe", "-c", "1"]
