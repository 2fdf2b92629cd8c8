# The RunPod Serverless worker: trains one style LoRA per job (lora_pipeline/worker/handler.py).
#
#   docker build -t <registry>/lora-pipeline-worker:<tag> .
#
# Exactly locks/worker.txt (the `train` and `qlora` extras; `make lock` writes it), hashes checked:
# torch there is PyPI's CUDA build for Linux x86_64 (bundled CUDA runtime; the host
# needs only the NVIDIA driver). Then the project itself, adding nothing.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Base models downloaded from the object store or a hub are cached here; on
    # RunPod a network volume is mounted at /runpod-volume, so they survive workers.
    LORA_PIPELINE_CACHE=/runpod-volume/lora_pipeline/cache \
    HF_HOME=/runpod-volume/lora_pipeline/hf

WORKDIR /app
COPY locks/worker.txt ./locks/worker.txt
RUN pip install --require-hashes --no-deps -r locks/worker.txt
COPY pyproject.toml README.md ./
COPY lora_pipeline ./lora_pipeline
RUN pip install --no-deps --no-build-isolation .

# RunPod's convention: `python handler.py` starts the worker loop
# (runpod.serverless.start); with no RunPod environment it runs test_input.json.
WORKDIR /app/lora_pipeline/worker
CMD ["python", "-u", "handler.py"]
