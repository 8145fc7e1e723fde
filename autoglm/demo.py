"""`autoglm demo`: the whole fleet on one machine, with real answers.

Starts what is missing (embedded broker, one worker), prepares the model if needed, then does what
real users do at the same time: a bulk job floods the `bulk` queue with classification tasks while
an interactive user asks questions one by one. Prints answers, labels, batch sizes and latencies.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from autoglm.fleet import running_worker
from producers.client import FleetClient
from shared.broker import broker_url, exit_on_sigterm
from shared.config import Settings, load_settings

INTERACTIVE_PROMPTS = [
    "What is the capital of France?",
    "What is deep learning? Answer in one sentence.",
    "Which planet is the largest in our solar system?",
]


def _prepare_all(settings: Settings) -> None:
    from workers.prepare.quantize import prepare

    for model in settings.models:
        prepare(settings, model, report=lambda msg: print(f"[prepare] {msg}", flush=True))


def run_demo(bulk: int = 64, as_json: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    from workers.prepare.evaluation import SENTIMENT_LABELS, sentiment_examples

    settings = settings or load_settings()
    _prepare_all(settings)
    examples = sentiment_examples()
    bulk_items = [examples[i % len(examples)] for i in range(bulk)]

    exit_on_sigterm()  # a stopped demo stops its embedded broker and worker too
    with broker_url(settings.redis_url, settings.broker.master_name) as url:
        print(f"[demo] broker: {url}{'' if settings.redis_url else ' (embedded)'}", flush=True)
        client = FleetClient(url, settings)
        with running_worker(client.app, url) as worker:
            print(f"[demo] worker pid {worker.process.pid} ready; submitting {bulk} bulk + "
                  f"{len(INTERACTIVE_PROMPTS)} interactive requests", flush=True)
            bulk_started = time.perf_counter()
            bulk_handles = client.submit_many(
                # no prompt_template: the default method, what a caller gets for any label set
                {"task_type": "classification", "text": text, "labels": SENTIMENT_LABELS, "priority": "bulk"}
                for text, _ in bulk_items
            )
            answers, latencies, interactive = [], [], []
            for prompt in INTERACTIVE_PROMPTS:
                started = time.perf_counter()
                result = client.generate(prompt, max_new_tokens=48, priority="interactive", timeout=600)
                latencies.append((time.perf_counter() - started) * 1000.0)
                answers.append(result.output.text)  # type: ignore[union-attr]
                interactive.append(result)
            bulk_results = [h.result(timeout=600) for h in bulk_handles]
            bulk_seconds = time.perf_counter() - bulk_started
        client.close()

    labels = [r.output.label for r in bulk_results]  # type: ignore[union-attr]
    correct = sum(label == gold for label, (_, gold) in zip(labels, bulk_items, strict=True))
    batch_sizes = [r.batch_size for r in interactive + bulk_results]
    summary = {
        "prompts": INTERACTIVE_PROMPTS,
        "answers": answers,
        "interactive_latencies_ms": [round(x, 1) for x in latencies],
        "interactive_p50_ms": round(statistics.median(latencies), 1),
        "labels": labels,
        "bulk_accuracy": round(correct / len(labels), 3) if labels else None,
        "bulk_tasks_per_s": round(len(bulk_results) / bulk_seconds, 2),
        "batch_sizes": batch_sizes,
        "max_batch_size_seen": max(batch_sizes),
        "model": interactive[0].model,
    }
    print("\nInteractive answers (submitted while the bulk backlog drained):")
    for prompt, result, ms in zip(INTERACTIVE_PROMPTS, interactive, latencies, strict=True):
        print(f"  Q: {prompt}\n  A: {result.output.text}")  # type: ignore[union-attr]
        print(f"     {ms:.0f} ms end to end, queue wait {result.timings.queue_wait_ms:.0f} ms, "
              f"batch size {result.batch_size}, {result.usage.completion_tokens} tokens")
    print(f"\nBulk classification: {len(labels)} tasks, {summary['bulk_tasks_per_s']} tasks/s, "
          f"accuracy {correct}/{len(labels)} vs gold labels")
    for (text, gold), label in list(zip(bulk_items, labels, strict=True))[:5]:
        print(f"  {label:<9} (gold {gold:<9}) {text[:70]}")
    print(f"Batch sizes seen: max {summary['max_batch_size_seen']}, "
          f"mean {statistics.mean(batch_sizes):.1f} over {len(batch_sizes)} requests")
    if as_json:
        print(json.dumps(summary), flush=True)
    sys.stdout.flush()
    return summary
