"""Scenario `fast-model`: a model so fast that the serving machinery decides throughput.

A random-weight Llama with 2 layers and hidden size 64 (speed does not depend on weight values;
never used for answers anyone reads) and the bundled model's real tokenizer, built once into the
cache. limit = the engine in-process at the fleet's batch size; naive = one Celery task per model
call (bench/naive.py); fleet = the fleet's worker. Classification tasks/s, rounds alternate, best of.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import Harness, timed, wait_all
from bench.throughput import _limit_classify
from bench.workloads import LABELS, TEMPLATE, classify_payload, review_texts
from shared.config import Settings
from shared.schemas import TaskType

SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 2048}


def tiny_model_dir(settings: Settings) -> Path:
    """The tiny random model folder (built once, cached): real tokenizer, random weights."""
    target = settings.cache_dir / "bench" / "tiny-random-llama-2x64"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workers.artifacts import resolve_source
    from workers.prepare.quantize import ensure_float

    real = settings.models[0]
    tokenizer = AutoTokenizer.from_pretrained(ensure_float(settings, real, resolve_source(real.source), lambda _: None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **SHAPE)
    tmp = target.with_name(target.name + ".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def tiny_model_config(settings: Settings) -> dict[str, Any]:
    return {"name": "tiny-random", "model_name": "random/llama-2x64", "source": str(tiny_model_dir(settings)),
            "task_type": ["text_generation", "classification"], "quantize": {"method": "none"}}


def run(h: Harness, n: int, rounds: int) -> dict[str, Any]:
    import json

    from shared.config import ModelConfig
    from workers.backends.transformers.batch_side import Engine
    from workers.prepare.quantize import prepare

    model = ModelConfig(**tiny_model_config(h.settings))
    prepare(h.settings, model, report=lambda msg: print(f"[bench] {msg}", flush=True))
    from workers.artifacts import prepared_path

    engine = Engine(model, prepared_path(h.settings, model), device=h.settings.worker.device)
    batch = h.settings.max_batch_size(TaskType.CLASSIFICATION)
    texts = review_texts(n)
    rates: dict[str, list[float]] = {k: [] for k in ("limit", "naive", "fleet")}
    models = [model.model_dump(mode="json")]
    with h.naive(env={"AUTOGLM_MODELS": json.dumps(models)}) as (naive_app, naive_queue), \
            h.fleet("fast", models=models) as client:
        _limit_classify(engine, texts[:batch], batch)  # warm-up, untimed
        naive_app.send_task("naive.classify", args=[texts[0], LABELS, TEMPLATE], queue=naive_queue).get(timeout=600)
        wait_all(client.submit_many(classify_payload(t) for t in texts[:50]))
        for _ in range(rounds):
            secs, _ = timed(_limit_classify, engine, texts, batch)
            rates["limit"].append(n / secs)
            secs, _ = timed(lambda: [r.get(timeout=3600) for r in [
                naive_app.send_task("naive.classify", args=[t, LABELS, TEMPLATE], queue=naive_queue) for t in texts]])
            rates["naive"].append(n / secs)
            secs, _ = timed(lambda: wait_all(client.submit_many(classify_payload(t) for t in texts)))
            rates["fleet"].append(n / secs)
    best = {k: round(max(v), 1) for k, v in rates.items()}
    return {
        "fast_model_n": n,
        "fast_model_tasks_per_s": best,
        "fast_model_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "fast_fleet_vs_naive": round(best["fleet"] / best["naive"], 3),
        "fast_fleet_vs_limit": round(best["fleet"] / best["limit"], 3),
    }
