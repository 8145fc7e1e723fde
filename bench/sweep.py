"""Scenario `engine-sweep`: the engine alone, in-process, by batch size (the device's physical limit).

What per-device batch defaults are chosen from: where tasks/s stops growing with the batch, a
larger batch only lengthens the time an interactive request waits behind a running one.
"""

from __future__ import annotations

import time
from typing import Any

from bench.workloads import LABELS, TEMPLATE, prompts, review_texts
from shared.schemas import ClassifyRequest, GenerateRequest
from workers.backends.transformers.batch_side import Engine


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(engine: Engine, batches: list[int], new_tokens: int, budget_s: float = 3.0) -> dict[str, Any]:
    items = [engine.prepare(ClassifyRequest(text=t, labels=LABELS, prompt_template=TEMPLATE)) for t in review_texts(512)]
    classify: dict[str, float] = {}
    generate: dict[str, float] = {}
    for b in batches:
        engine.classify(items[:b])  # warm-up at this shape
        _sync()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < budget_s or done < 4 * b:
            engine.classify([items[(done + i) % len(items)] for i in range(b)])
            done += b
        _sync()
        classify[str(b)] = round(done / (time.perf_counter() - started), 1)
        print(f"[bench] engine classify batch {b}: {classify[str(b)]} tasks/s", flush=True)
    for b in batches:
        gen = [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=new_tokens)) for p in prompts(b)]
        engine.generate(gen)
        _sync()
        tokens, rounds, started = 0, 0, time.perf_counter()
        while time.perf_counter() - started < budget_s or rounds < 2:
            tokens += sum(a.usage.completion_tokens for a in engine.generate(gen))
            rounds += 1
        _sync()
        generate[str(b)] = round(tokens / (time.perf_counter() - started), 1)
        print(f"[bench] engine generate batch {b}: {generate[str(b)]} tok/s", flush=True)
    return {"engine_classify_tasks_per_s_by_batch": classify, "engine_generate_tokens_per_s_by_batch": generate}
