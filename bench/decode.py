"""Scenario `decode`: the engine's decode rate by batch, next to the device's bandwidth bound and a peer.

Same weights, same prompts, one run, per batch size b (1, 8, 32, 128; quick: 1, 8):

- **fleet engine**: workers/core/continuous.py's ContinuousGenerator driven as the engine core drives it
  (the device's ``batching.continuous`` settings: graphs, compile level, async batching), b rows
  submitted at once, each generating ``new_tokens``; generated tokens / wall time of the steps.
- **bound**: a decode step reads every weight once and each row's KV cache. Bytes per step =
  weight bytes on the device + b x KV bytes per token x the rows' mean context; at the device's
  copy bandwidth measured here (a large tensor copied on the device, bytes read + written per
  second), b tokens per step. ``ratio`` = fleet engine / bound.
- **peer**: transformers' own ``generate_batch`` (the manager behind ``transformers serve``) on the
  same model object, with its best settings for the device (graphs and compilation on a GPU).

Rows ignore end-of-sequence (random weights, and every row must run the same number of steps), so
both sides generate exactly ``new_tokens`` per row.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from opentelemetry import trace

from bench.workloads import prompts
from shared.config import ContinuousConfig
from shared.schemas import GenerateRequest

GPU_BATCHES = [1, 8, 32, 128]


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: Any, megabytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second the device moves in a tensor copy (read + write), the decode bound's rate."""
    import torch

    size = (megabytes or (1024 if getattr(device, "type", str(device)) == "cuda" else 256)) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * size * repeats / (time.perf_counter() - started)


def weight_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (GPTQ's packed qweight, scales and zeros are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def kv_bytes_per_token(model: Any, dtype_bytes: int) -> int:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes


def bound_tokens_per_s(weights: int, kv_per_token: int, batch: int, mean_context: float, bandwidth: float) -> float:
    """Tokens/s if a decode step took exactly the time to read its bytes once at ``bandwidth``."""
    step_bytes = weights + batch * kv_per_token * mean_context
    return batch * bandwidth / step_bytes


def _items(engine: Any, batch: int, new_tokens: int) -> list[Any]:
    return [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=new_tokens)) for p in prompts(batch)]


def run_engine(engine: Any, config: ContinuousConfig, items: list[Any]) -> float:
    """Tokens/s of the fleet's continuous generator for ``items`` submitted together."""
    from workers.core.continuous import ContinuousGenerator

    def no_fallback(*_: Any) -> Future:
        raise RuntimeError("continuous batching gave a row back: the bench counts only continuous rows")

    rows = max(config.max_rows, len(items))
    stops, engine.stop_token_ids = engine.stop_token_ids, []  # every row runs all its steps
    generator = ContinuousGenerator(engine, config.model_copy(update={"max_rows": rows, "interactive_reserve": 0}),
                                    most_urgent=0, streams=None, fallback=no_fallback)  # type: ignore[arg-type]
    try:
        warm = [generator.submit(item, 1, f"w{i}", trace.INVALID_SPAN_CONTEXT) for i, item in enumerate(items)]
        while not all(f.done() for f in warm):  # the first steps of each shape allocate (and compile, capture)
            generator.step()
        _sync(engine.device)
        started = time.perf_counter()
        futures = [generator.submit(item, 1, f"t{i}", trace.INVALID_SPAN_CONTEXT) for i, item in enumerate(items)]
        while not all(f.done() for f in futures):
            generator.step()
        _sync(engine.device)
        elapsed = time.perf_counter() - started
        return sum(f.result()[0].usage.completion_tokens for f in futures) / elapsed
    finally:
        engine.stop_token_ids = stops
        generator.close()


def peer_options(device_type: str) -> dict[str, Any]:
    """transformers' generate_batch at its best for the device: graphs and compiled decode on a GPU."""
    if device_type == "cuda":
        return {"use_cuda_graph": True, "default_compile_level": 2, "use_async_batching": True}
    return {}


def run_peer(engine: Any, items: list[Any], new_tokens: int) -> float:
    """Tokens/s of transformers' ``generate_batch`` on the same model and prompts."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                                  pad_token_id=engine.tokenizer.pad_token_id)
    cb = ContinuousBatchingConfig(max_requests_per_batch=len(items), **peer_options(engine.device.type))
    inputs = [list(item.input_ids) for item in items]
    # The manager (its thread, cache, graphs) is built by the warm-up call and kept for the timed one:
    # what a server that keeps it running pays per batch.
    options = {"generation_config": generation, "continuous_batching_config": cb, "persistent_manager": True}
    engine.model.generate_batch(inputs, **options)
    _sync(engine.device)
    started = time.perf_counter()
    outputs = engine.model.generate_batch(inputs, **options)
    _sync(engine.device)
    elapsed = time.perf_counter() - started
    engine.model.destroy_cached_continuous_batching_manager()
    return sum(len(out.generated_tokens) for out in outputs.values()) / elapsed


def run(settings: Any, engine: Any, batches: list[int], new_tokens: int, peer: bool = True) -> dict[str, Any]:
    bandwidth = copy_bandwidth(engine.device)
    weights = weight_bytes(engine.model)
    kv_token = kv_bytes_per_token(engine.model, engine.model.dtype.itemsize)
    config = settings.batching.continuous
    table: dict[str, dict[str, float]] = {}
    for batch in batches:
        items = _items(engine, batch, new_tokens)
        mean_context = sum(len(i.input_ids) for i in items) / len(items) + new_tokens / 2
        bound = bound_tokens_per_s(weights, kv_token, batch, mean_context, bandwidth)
        ours = run_engine(engine, config, items)
        row = {"engine_tok_s": round(ours, 1), "bound_tok_s": round(bound, 1), "ratio": round(ours / bound, 4)}
        if peer:
            theirs = run_peer(engine, items, new_tokens)
            row.update(peer_tok_s=round(theirs, 1), engine_vs_peer=round(ours / theirs, 3))
        table[str(batch)] = row
        print(f"[bench] decode batch {batch}: {row}", flush=True)
    return {"decode_by_batch": table, "decode_weight_bytes": weights, "decode_kv_bytes_per_token": kv_token,
            "decode_copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "decode_new_tokens": new_tokens,
            "decode_settings": {k: v for k, v in config.manager_options().items() if v is not None}}
