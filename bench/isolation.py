"""Scenario 2: interactive latency when idle vs while a large bulk backlog drains."""

from __future__ import annotations

import random
import time
from typing import Any

from bench.harness import Harness, percentile
from bench.workloads import classify_payload, prompts, review_texts


def _interactive_latencies(client, n: int, new_tokens: int) -> list[float]:  # noqa: ANN001
    """One request at a time, each after a random pause (seeded): arrivals land at every phase of
    the running bulk batch, not in lockstep with it (a fixed pause measured a flattering phase)."""
    pauses = random.Random(7)
    latencies = []
    for prompt in prompts(n):
        time.sleep(pauses.uniform(0.0, 0.3))
        started = time.perf_counter()
        client.generate(prompt, max_new_tokens=new_tokens, priority="interactive", timeout=600)
        latencies.append((time.perf_counter() - started) * 1000.0)
    return latencies


def run(h: Harness, n_interactive: int, backlog: int, new_tokens: int) -> dict[str, Any]:
    with h.fleet("isolation") as client:
        _interactive_latencies(client, 2, new_tokens)  # warm-up
        idle = _interactive_latencies(client, n_interactive, new_tokens)
        bulk = client.submit_many(classify_payload(t) for t in review_texts(backlog))
        deadline = time.monotonic() + 600
        while not any(h_.ready() for h_ in bulk[:64]) and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = _interactive_latencies(client, n_interactive, new_tokens)
        done_during = sum(h_.ready() for h_ in bulk)
    p95_idle, p95_busy = percentile(idle, 95), percentile(busy, 95)
    return {
        "interactive_n": n_interactive,
        "bulk_backlog": backlog,
        "bulk_done_while_measuring": done_during,
        "interactive_p50_idle_ms": round(percentile(idle, 50), 1),
        "interactive_p95_idle_ms": round(p95_idle, 1),
        "interactive_p50_under_bulk_ms": round(percentile(busy, 50), 1),
        "interactive_p95_under_bulk_ms": round(p95_busy, 1),
        "interactive_p95_ratio": round(p95_busy / p95_idle, 3),
    }
