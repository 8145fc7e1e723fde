"""Probe: what a llama.cpp decode step costs per weight type, in process, on this CPU.

The bundled GGUF file (Q4_1) converted with llama.cpp's own ``llama_model_quantize`` to each type,
then, per type: the median time of a one-token decode step for 1 and for 8 sequences (40-token
prompts, 48 steps, best of 3 rounds) and the prefill of those prompts. Why: one stream on a CPU is
bound by the bytes of weights read per token, and a batch of rows by whether llama.cpp has a
matrix-matrix kernel for the type (it has none for Q4_1); this says which type serves which load
(docs/architecture.md, "Which backend on a CPU"). Label agreement per type: bench/probes/label_agreement.py.

    python -m bench.probes.quant_types [Q4_1,Q8_0,Q5_0,Q4_0,IQ4_NL,...]
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shared.config import load_settings
from workers.artifacts import resolve_source
from workers.backends.llama_cpp import convert_gguf, gguf_path
from workers.backends.llama_cpp.llama_engine import cpu_threads, import_llama
from workers.backends.llama_cpp.tokens import TokenBatch

SOURCE_TYPE = "Q4_1"  # the bundled file's


def step_times(llama, path: Path, rounds: int = 3) -> dict[str, dict[str, float]]:  # noqa: ANN001
    from llama_cpp import _internals

    model = _internals.LlamaModel(path_model=str(path), params=llama.llama_model_default_params(), verbose=False)
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max, params.kv_unified = 8192, 512, 512, 16, True
    params.n_threads = params.n_threads_batch = cpu_threads()
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as the backend sets it
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    batch = TokenBatch(llama, 512)
    out = {}
    for rows in (1, 8):
        best = []
        for _ in range(rounds):
            llama.llama_memory_clear(ctx.memory, True)
            batch.clear()
            for seq in range(rows):
                batch.add(list(range(100 + seq, 140 + seq)), 0, seq)
            started = time.perf_counter()
            assert batch.decode(llama, ctx.ctx) == 0
            prefill = time.perf_counter() - started
            steps = []
            for step in range(48):
                batch.clear()
                for seq in range(rows):
                    batch.add([200 + step], 40 + step, seq, True)
                started = time.perf_counter()
                assert batch.decode(llama, ctx.ctx) == 0
                steps.append(time.perf_counter() - started)
            best.append((statistics.median(steps), prefill))
        step, prefill = min(best)
        out[f"rows_{rows}"] = {"step_ms": round(step * 1000, 2), "tok_per_s": round(rows / step, 1),
                               "prefill_ms": round(prefill * 1000, 1)}
    return out


def main() -> None:
    types = (sys.argv[1] if len(sys.argv) > 1 else "Q4_1,Q8_0,Q5_0,Q4_0,IQ4_NL").split(",")
    settings = load_settings()
    source = gguf_path(settings.models[0], resolve_source(settings.models[0].source))
    llama = import_llama()
    llama.llama_backend_init()
    with tempfile.TemporaryDirectory() as tmp:
        for name in types:
            path = source
            if name != SOURCE_TYPE:
                path = Path(tmp) / f"{name}.gguf"
                assert convert_gguf(source, path, name), f"llama.cpp could not convert the file to {name}"
            print(json.dumps({"type": name, "mb": round(path.stat().st_size / 1e6, 1), **step_times(llama, path)}), flush=True)


if __name__ == "__main__":
    main()
