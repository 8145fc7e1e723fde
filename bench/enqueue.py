"""Scenario 3: how fast producers can enqueue, against a real Redis (no consumer on the queues).

Measured twice on the same broker, alternating: as a single Redis is run (``broker.min_replicas_acked``
0), and with a replica attached and every publish waiting for it (1: Redis WAIT, so an accepted task
survives the master's loss). The ratio is what durable publishing costs producers.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.harness import Harness, percentile
from bench.workloads import classify_payload, review_texts
from shared.broker import EmbeddedRedis


def measure(h: Harness, n_bulk: int, n_single: int, replicas_acked: int) -> tuple[float, list[float]]:
    """Bulk submit rate (tasks/s, submit_many) and single-submit latencies (ms)."""
    client = h.client(f"enqueue{replicas_acked}", broker={"min_replicas_acked": replicas_acked})
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
    return bulk_rate, latencies


def attach_replica(replica: EmbeddedRedis, master_url: str) -> None:
    """Make ``replica`` follow the broker, and wait until it is in sync."""
    master = urlsplit(master_url)
    follower = redis.Redis.from_url(replica.url)
    follower.replicaof(master.hostname, master.port)
    deadline = time.monotonic() + 30
    while follower.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the bench replica did not sync with the broker")
        time.sleep(0.05)


def run(h: Harness, n_bulk: int, n_single: int, rounds: int = 2) -> dict[str, Any]:
    rates: dict[int, list[float]] = {0: [], 1: []}
    singles: dict[int, list[float]] = {0: [], 1: []}
    with EmbeddedRedis() as replica:
        attach_replica(replica, h.redis_url)
        for _ in range(rounds):  # alternate, so drift on the machine hits both sides alike
            for acked in (0, 1):
                rate, latencies = measure(h, n_bulk, n_single, acked)
                rates[acked].append(rate)
                singles[acked] += latencies
    best = {acked: max(r) for acked, r in rates.items()}
    return {
        "enqueue_n": n_bulk,
        "enqueue_tasks_per_s": round(best[0], 1),
        "submit_p50_ms": round(percentile(singles[0], 50), 3),
        "submit_p99_ms": round(percentile(singles[0], 99), 3),
        "enqueue_replicated_tasks_per_s": round(best[1], 1),
        "submit_replicated_p50_ms": round(percentile(singles[1], 50), 3),
        "submit_replicated_p99_ms": round(percentile(singles[1], 99), 3),
        "enqueue_replicated_vs_plain": round(best[1] / best[0], 3),
    }
