"""Scenario 3: how fast producers can enqueue, against a real Redis (no consumer on the queues)."""

from __future__ import annotations

import time
from typing import Any

from bench.harness import Harness, percentile
from bench.workloads import classify_payload, review_texts


def run(h: Harness, n_bulk: int, n_single: int) -> dict[str, Any]:
    client = h.client("enqueue")
    try:
        payloads = [classify_payload(t) for t in review_texts(n_bulk)]
        client.submit_many(payloads[:100])  # connection + queue declaration warm-up
        started = time.perf_counter()
        handles = client.submit_many(payloads)
        bulk_rate = len(handles) / (time.perf_counter() - started)
        latencies = []
        for i in range(n_single):
            started = time.perf_counter()
            client.submit_generate(f"question {i}", priority="interactive")
            latencies.append((time.perf_counter() - started) * 1000.0)
    finally:
        h.purge(client.app, client.settings.declared_queue_names())
        client.close()
    return {
        "enqueue_n": n_bulk,
        "enqueue_tasks_per_s": round(bulk_rate, 1),
        "submit_p50_ms": round(percentile(latencies, 50), 3),
        "submit_p99_ms": round(percentile(latencies, 99), 3),
    }
