"""Scenario 5: fleet throughput with 1 and 2 worker processes on one broker, CPU threads split."""

from __future__ import annotations

import os
from typing import Any

from bench.harness import Harness, timed, wait_all
from bench.workloads import classify_payload, review_texts


def run(h: Harness, n: int) -> dict[str, Any]:
    cores = os.cpu_count() or 2
    texts = review_texts(n)
    rates = {}
    for workers in (1, 2):
        threads = max(1, cores // workers)
        with h.fleet(f"scale{workers}", workers=workers, env={"AUTOGLM_WORKER__TORCH_THREADS": str(threads)}) as client:
            wait_all(client.submit_many(classify_payload(t) for t in texts[:16]))  # warm-up
            secs, _ = timed(lambda: wait_all(client.submit_many(classify_payload(t) for t in texts)))
            rates[workers] = len(texts) / secs
    return {
        "scaling_n": n,
        "scaling_cores": cores,
        "scaling_tasks_per_s": {f"{k}_workers": round(v, 2) for k, v in rates.items()},
        "scaling_2_vs_1": round(rates[2] / rates[1], 3),
    }
