"""Scenario `continuous`: static micro-batches vs continuous batching for generation, same engine,
same requests, same arrival times, one run.

Workload: greedy generations with max_new_tokens drawn from 8-256 (seeded), arriving at a steady
rate that keeps the engine loaded. Static is the fleet's micro-batcher policy (up to the config's
generation batch size, oldest first, the batch waits up to max_wait_ms for company) running
``Engine.generate``; its time to first token is when the batch's first decoding step returned
(a streamer hook: the earliest a static batch could have shown a token). Continuous is
workers/core/continuous.py's ContinuousGenerator as the engine core drives it. Reported per mode:
generated tokens/s over the whole run, p95 time to first token and p95 latency from arrival.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from typing import Any

from opentelemetry import trace
from transformers.generation.streamers import BaseStreamer

from bench.harness import percentile
from bench.workloads import TOPICS
from shared.schemas import GenerateRequest, TaskType

STYLES = ["a short story", "a travel guide entry", "a recipe", "a letter to a friend", "a product review",
          "a history lesson", "a poem", "a news report"]


def workload(engine: Any, n: int, seed: int = 7) -> list[Any]:
    rng = random.Random(seed)
    requests = [GenerateRequest(prompt=f"Write {rng.choice(STYLES)} about {rng.choice(TOPICS)}.",
                                max_new_tokens=rng.randint(8, 256), stream=True) for _ in range(n)]
    return [engine.prepare(r) for r in requests]


class _FirstStep(BaseStreamer):
    """``generate`` calls put() with the prompt, then once per decoding step: the second call is
    the first generated token of every row in the batch."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def run_static(engine: Any, items: list[Any], arrivals: list[float], batch: int, max_wait_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    first, done, tokens = [0.0] * len(items), [0.0] * len(items), 0
    pending = 0
    while pending < len(items):
        now = time.perf_counter() - start
        if arrivals[pending] > now:
            time.sleep(arrivals[pending] - now)
            continue
        # the first request waits up to max_wait for company, as the micro-batcher does
        deadline = arrivals[pending] + max_wait_s
        while (time.perf_counter() - start) < deadline and pending + batch - 1 < len(items) \
                and arrivals[min(len(items) - 1, pending + batch - 1)] > time.perf_counter() - start:
            time.sleep(0.001)
        now = time.perf_counter() - start
        members = [i for i in range(pending, min(len(items), pending + batch)) if arrivals[i] <= now]
        streamer = _FirstStep()
        answers = engine.generate([items[i] for i in members], streamer=streamer)
        finished = time.perf_counter() - start
        for i, answer in zip(members, answers, strict=True):
            first[i], done[i] = streamer.at - start, finished
            tokens += answer.usage.completion_tokens
        pending = members[-1] + 1
    return _summary(items, arrivals, first, done, tokens, time.perf_counter() - start)


class _Recorder:
    """The generator's stream sink here: records when each task's first text arrived."""

    def __init__(self, start: float, first: dict[str, float]) -> None:
        self.start, self.first = start, first

    def text(self, task_id: str, offset: int, text: str) -> None:
        self.first.setdefault(task_id, time.perf_counter() - self.start)

    def end(self, task_id: str, finish_reason: str) -> None:
        pass

    def error(self, task_id: str, code: str, message: str) -> None:
        pass


def run_continuous(engine: Any, items: list[Any], arrivals: list[float], config: Any) -> dict[str, Any]:
    from workers.core.continuous import ContinuousGenerator

    first: dict[str, float] = {}
    start = time.perf_counter()
    recorder = _Recorder(start, first)

    def no_fallback(*_: Any) -> Future:
        raise RuntimeError("continuous batching gave a row back: the bench counts only continuous rows")

    generator = ContinuousGenerator(engine, config, most_urgent=0, streams=recorder, fallback=no_fallback)  # type: ignore[arg-type]
    try:
        # warm-up, untimed: the manager's first step allocates
        warm = generator.submit(items[0], 1, "warm", trace.INVALID_SPAN_CONTEXT)
        while not warm.done():
            generator.step()
        first.clear()
        start = recorder.start = time.perf_counter()
        futures: list[Future] = []
        done = [0.0] * len(items)
        while len(futures) < len(items) or not all(f.done() for f in futures):
            now = time.perf_counter() - start
            while len(futures) < len(items) and arrivals[len(futures)] <= now:
                i = len(futures)
                future = generator.submit(items[i], 1, f"t{i}", trace.INVALID_SPAN_CONTEXT)
                future.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.perf_counter() - start))
                futures.append(future)
            generator.step()  # one decoding step while rows run, as the engine core's loop does
            if not generator.busy:
                time.sleep(0.002)
        elapsed = time.perf_counter() - start
        tokens = sum(f.result()[0].usage.completion_tokens for f in futures)
        first_list = [first.get(f"t{i}", done[i]) for i in range(len(items))]
        return _summary(items, arrivals, first_list, done, tokens, elapsed)
    finally:
        generator.close()


def _summary(items: list[Any], arrivals: list[float], first: list[float], done: list[float], tokens: int,
             elapsed: float) -> dict[str, Any]:
    ttft = [(f - a) * 1000.0 for f, a in zip(first, arrivals, strict=True)]
    latency = [(d - a) * 1000.0 for d, a in zip(done, arrivals, strict=True)]
    return {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1), "seconds": round(elapsed, 2),
            "p50_ttft_ms": round(percentile(ttft, 50), 1), "p95_ttft_ms": round(percentile(ttft, 95), 1),
            "p95_latency_ms": round(percentile(latency, 95), 1)}


def run(settings: Any, engine: Any, n: int, rate_per_s: float, rounds: int = 1) -> dict[str, Any]:
    items = workload(engine, n)
    arrivals = [i / rate_per_s for i in range(n)]
    batch = settings.max_batch_size(TaskType.TEXT_GENERATION)
    max_wait_s = settings.batching.max_wait_ms / 1000.0
    engine.generate(items[:1])  # warm-up, untimed
    results: dict[str, list[dict[str, Any]]] = {"static": [], "continuous": []}
    for _ in range(rounds):  # alternate, so machine noise hits both
        results["static"].append(run_static(engine, items, arrivals, batch, max_wait_s))
        results["continuous"].append(run_continuous(engine, items, arrivals, settings.batching.continuous))
    static = max(results["static"], key=lambda r: r["tokens_per_s"])
    continuous = max(results["continuous"], key=lambda r: r["tokens_per_s"])
    return {
        "continuous_workload": {"requests": n, "max_new_tokens": "8-256", "arrivals_per_s": rate_per_s,
                                "static_batch": batch, "continuous_rows": settings.batching.continuous.max_rows},
        "continuous_static": static,
        "continuous_continuous": continuous,
        "continuous_ttft_p95_gain": round(static["p95_ttft_ms"] / max(continuous["p95_ttft_ms"], 1e-3), 2),
        "continuous_throughput_ratio": round(continuous["tokens_per_s"] / static["tokens_per_s"], 3),
        "continuous_latency_p95_gain": round(static["p95_latency_ms"] / max(continuous["p95_latency_ms"], 1e-3), 2),
    }
