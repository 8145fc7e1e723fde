#!/usr/bin/env bash
# The GPU table (bench/RESULTS.md) in one command, on a machine without network:
#   bench/gpu.sh [OUTDIR]
# Brings what that machine lacks from the repo's ignored folders: .whl/ (bench/gpu_wheels.sh fills it, the
# project's own wheel among them, rebuilt after every change, or the plugin entry points are missing there)
# and .gpu/tok (the bundled model's tokenizer; ../shared/gpu/README.md). The model is a random-weight
# Llama in SmolLM2-1.7B's shape, built there (bench/shapes.py).
# GPU_PROFILE=1: one more run at batch 32 with the engine core under cProfile (its top functions
# printed; rates under cProfile are not comparable).
# Each run's log and JSON go to OUTDIR (default bench/results): read them even if a later run fails.
set -u
OUT_DIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then  # bench/gpu_wheels.sh gathers them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if ls .whl/src/*.tar.gz >/dev/null 2>&1; then  # compiled packages without a wheel for this Python: built here
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/src/*.tar.gz
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
# GPTQModel compiles its CUDA kernels (Marlin, ExLlama v2) with torch's JIT on first use: Hopper only, all cores.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
nvidia-smi -L; nproc
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TOK=${AUTOGLM_BENCH_TOKENIZER:-.gpu/tok}
# DRY_RUN=1: the same runs on a few-MB model at quick sizes (a CPU check of this script; figures mean nothing).
SHAPE=1.7b; QUICK=""
if [ "${DRY_RUN:-0}" = 1 ]; then SHAPE=tiny; QUICK=--quick; [ -d "$TOK" ] || TOK=""; fi

bench() {  # NAME TIMEOUT_S ARGS...: one bench run, its log and summary in OUT_DIR
  local name=$1 limit=$2; shift 2
  echo "=== $name: python3 -m bench --shape $SHAPE $QUICK ${TOK:+--tokenizer $TOK} $*"
  timeout "$limit" python3 -m bench --shape "$SHAPE" $QUICK ${TOK:+--tokenizer "$TOK"} --json "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?; echo "rc=$rc"; grep -E "^\[bench\] (round|throughput|engine|model|decode|gptq)" "$OUT_DIR/$name.log" | cut -c1-1500
  tail -n 1 "$OUT_DIR/$name.log" >"$OUT_DIR/$name.json"
  return $rc
}

# Decode by batch (1, 8, 32, 128) against the device's bandwidth bound and transformers' generate_batch on
# the same weights: fp16, then a GPTQ 4-bit artifact made here from them (the kernel GPTQModel chose is logged).
for quant in fp16 gptq4; do
  bench "decode-$quant" ${GPU_RUN_DECODE_S:-240} --only decode --quant "$quant" || tail -n 30 "$OUT_DIR/decode-$quant.log"
done
# The engine alone by batch size, then limit / naive / fleet at batch 32 with the default consumers.
if ! bench sweep-and-32 ${GPU_RUN1_S:-300} --only engine-sweep,throughput --batch 32; then
  tail -n 40 "$OUT_DIR/sweep-and-32.log"
  echo "run 1 failed: the next run without continuous batching"; export AUTOGLM_BATCHING__CONTINUOUS__ENABLED=false
fi
# The engine core alone at 32, fed over its socket without Celery (bench/engine_core.py): the share of
# its wall time in model calls, and its rate against the same engine in-process.
bench engine-core ${GPU_RUN_CORE_S:-150} --only engine-core --batch 32
# The same at 32 with more consumer processes (is the fleet fed by its consumers?).
bench consumers-8 ${GPU_RUN2_S:-180} --only throughput --batch 32 --consumers 8
if [ "${GPU_PROFILE:-0}" = 1 ]; then
  AUTOGLM_CORE_PROFILE="$OUT_DIR/core.prof" bench profiled ${GPU_RUN3_S:-150} --only throughput --batch 32
  for f in "$OUT_DIR"/core.prof.*; do
    python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(25)" "$f" | tail -n 35
  done
fi
