"""Probe: how long the engine core's model call takes per batch, against the same engine in-process.

Not a bench scenario: it answers one question of bench/RESULTS.md ("2026-12-02, evening"): is the
fleet's gap to the in-process limit on a CPU inside the core's torch calls, and does it come with a
setting of the core? Each round starts a real fleet (`Harness.fleet`) once per variant, sends the
same classifications, takes the median of the core's own `inference_ms` per batch, and times the
in-process engine on the same batches right after, so machine noise hits both.

    python -m bench.probes.core_model_time [--rounds 2] [--n 120] [--env NAME=a,b]

``--env`` names one setting the fleet's workers get, and the values to alternate (default:
continuous batching on and off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.__main__ import in_process_engine
from bench.harness import Harness, wait_all
from bench.workloads import LABELS, TEMPLATE, classify_payload, review_texts
from shared.broker import broker_url
from shared.config import load_settings
from shared.schemas import ClassifyRequest, TaskType


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=120, help="classifications per fleet")
    parser.add_argument("--env", default="AUTOGLM_BATCHING__CONTINUOUS__ENABLED=true,false")
    args = parser.parse_args()
    name, values = args.env.split("=", 1)
    settings = load_settings().on_device()
    batch = settings.max_batch_size(TaskType.CLASSIFICATION)
    texts = review_texts(args.n)
    engine = in_process_engine(settings)
    items = [engine.prepare(ClassifyRequest(text=t, labels=LABELS, prompt_template=TEMPLATE)) for t in texts]

    def in_process_ms() -> float:
        times = []
        for start in range(0, len(items), batch):
            started = time.perf_counter()
            engine.classify(items[start : start + batch])
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    with broker_url(settings.redis_url) as url:
        os.environ["REDIS_URL"] = url
        harness = Harness(settings, url, {})
        for round_ in range(args.rounds):
            for value in values.split(","):
                with harness.fleet(f"probe{round_}{value}", env={name: value}) as client:
                    wait_all(client.submit_many(classify_payload(t) for t in texts[: 2 * batch]))  # warm-up
                    results = wait_all(client.submit_many(classify_payload(t) for t in texts))
                    core = statistics.median(r.timings.inference_ms for r in results)
                print(f"round {round_} {name}={value}: core {core:.0f} ms per batch of {batch}, "
                      f"in-process {in_process_ms():.0f} ms", flush=True)


if __name__ == "__main__":
    main()
