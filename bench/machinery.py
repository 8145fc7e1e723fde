"""Scenarios `celery-floor` and `machinery`: what a task costs the fleet when the model costs nothing.

celery-floor: a plain Celery echo task (bench/floor.py: threads pool, prefetch 1, acks_late, the same
Redis broker and result backend). machinery: the fleet's own worker with the zero-cost echo engine
(workers/backends/echo.py), so validation, ledger, batching, spans, result writes are the whole figure.
Rounds alternate between the two on the same machine; the best round of each is compared. CPU
ms per task is the worker processes' CPU time over the round (producer and Redis not included).
"""

from __future__ import annotations

from typing import Any

from bench.harness import Harness, cpu_seconds, timed, wait_all
from bench.workloads import classify_payload, review_texts

ECHO_MODEL = {"name": "echo", "model_name": "echo", "backend": "echo", "task_type": ["text_generation", "classification"],
              "quantize": {"method": "none"}}


def _floor_round(app, queue: str, texts: list[str]) -> None:  # noqa: ANN001
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        results = [app.send_task("floor.echo", args=[classify_payload(t)], queue=queue, producer=producer) for t in texts]
    for r in results:
        r.get(timeout=600)


def run(h: Harness, n: int, rounds: int, which: set[str]) -> dict[str, Any]:
    texts = review_texts(n)
    rates: dict[str, list[float]] = {k: [] for k in which}
    cpu_ms: dict[str, list[float]] = {k: [] for k in which}
    concurrency = h.settings.worker_concurrency
    with h.floor(concurrency) as (floor_app, floor_queue, floor_pid), \
            h.fleet("machinery", models=[ECHO_MODEL]) as client:
        fleet_pids = list(h.worker_pids)
        _floor_round(floor_app, floor_queue, texts[:50])  # warm-up, untimed
        wait_all(client.submit_many(classify_payload(t) for t in texts[:50]))
        for _ in range(rounds):
            if "celery-floor" in which:
                before = cpu_seconds([floor_pid])
                secs, _ = timed(_floor_round, floor_app, floor_queue, texts)
                rates["celery-floor"].append(n / secs)
                cpu_ms["celery-floor"].append((cpu_seconds([floor_pid]) - before) * 1000 / n)
            if "machinery" in which:
                before = cpu_seconds(fleet_pids)
                secs, _ = timed(lambda: wait_all(client.submit_many(classify_payload(t) for t in texts)))
                rates["machinery"].append(n / secs)
                cpu_ms["machinery"].append((cpu_seconds(fleet_pids) - before) * 1000 / n)
    out: dict[str, Any] = {"machinery_n": n}
    if "celery-floor" in which:
        out["celery_floor_tasks_per_s"] = round(max(rates["celery-floor"]), 1)
        out["celery_floor_cpu_ms_per_task"] = round(min(cpu_ms["celery-floor"]), 3)
    if "machinery" in which:
        out["machinery_tasks_per_s"] = round(max(rates["machinery"]), 1)
        out["machinery_cpu_ms_per_task"] = round(min(cpu_ms["machinery"]), 3)
        out["machinery_rounds"] = [round(x, 1) for x in rates["machinery"]]
    if which == {"celery-floor", "machinery"}:
        out["machinery_vs_celery_floor"] = round(out["machinery_tasks_per_s"] / out["celery_floor_tasks_per_s"], 3)
    return out
