"""The fleet on the llama_cpp backend: the bundled GGUF file served by llama.cpp in real worker
processes on a real broker, with the guarantees every backend has: answers, streams, one bad
request failing alone, batches split on failure, nothing lost when the engine core is killed, and
interactive requests ahead of a bulk backlog. Skipped, saying why, without the extra."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_reliability import REVIEWS, _engine_core_pid, others_of_a_permanent_fault
from workers.consumer.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.beside]  # its own fleet, not the shared ones: it runs in make test's second lane
pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama_cpp extra) is not installed: "
                    "`make setup LLAMA_CPP=1` builds it")

GOLD = ["positive", "negative", "positive", "negative", "positive", "negative"]
LABELS = ["positive", "negative"]
FAULTS = {"oom_batch_over": 2, "fail_marker": "FAIL-ME"}


@pytest.fixture(scope="module")
def llama_fleet(redis_url: str, settings: Any) -> Iterator[Fleet]:
    base = settings.models[0].model_dump(mode="json")
    model = {**base, "name": "smollm2-135m-llama", "backend": "llama_cpp", "options": {"threads": 1}}  # tests/conftest.py: why one
    with fleet_on(redis_url, models=[model], faults=FAULTS,
                  policies={"RESOURCE_EXHAUSTED": {"action": "split"}}) as running:
        yield running


def classify(text: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "priority": priority}


def generate(prompt: str, priority: str = "bulk", **extra: Any) -> dict:
    return {"task_type": "text_generation", "messages": [{"role": "user", "content": prompt}], "priority": priority,
            "max_new_tokens": 24, **extra}


def test_answers_and_streams_come_from_the_gguf_file(llama_fleet: Fleet) -> None:
    client = llama_fleet.client
    result = client.submit(generate("What is the capital of France? Answer in one word.")).result(timeout=300)
    assert "Paris" in result.output.text and result.model == "smollm2-135m-llama"  # type: ignore[union-attr]
    handle = client.submit(generate("Name three colours.", stream=True))
    streamed = "".join(handle.stream(timeout=300))
    assert streamed.strip() == handle.result(timeout=60).output.text  # type: ignore[union-attr]
    labels = [h.result(timeout=300).output.label for h in client.submit_many(classify(t) for t in REVIEWS)]  # type: ignore[union-attr]
    assert labels == GOLD


def test_a_bad_request_fails_alone_and_batches_are_split_on_failure(llama_fleet: Fleet) -> None:
    results = others_of_a_permanent_fault(llama_fleet.client, classify)
    assert [r.output.label for r in results] == GOLD  # type: ignore[union-attr]
    assert max(r.batch_size for r in results) <= 2  # every batch over 2 "ran out of memory" and was split


def test_interactive_generation_overtakes_a_bulk_backlog(llama_fleet: Fleet) -> None:
    client = llama_fleet.client
    bulk = client.submit_many(generate(f"Tell me a long story about a dragon (#{i}).", max_new_tokens=24) for i in range(40))
    deadline = time.monotonic() + 300
    while not any(h.ready() for h in bulk) and time.monotonic() < deadline:
        time.sleep(0.05)
    urgent = client.submit(generate("Say hello.", priority="interactive", max_new_tokens=8))
    urgent.result(timeout=300)
    pending = sum(not h.ready() for h in bulk)
    assert pending >= 10, f"only {pending} of 40 bulk requests were still pending when the interactive one finished"
    assert all(h.result(timeout=600).output.text for h in bulk)  # type: ignore[union-attr]


def test_killing_the_engine_core_mid_generation_loses_nothing_and_runs_nothing_twice(llama_fleet: Fleet) -> None:
    client = llama_fleet.client
    core = _engine_core_pid(llama_fleet.worker)
    handles = client.submit_many(generate(f"Write a sentence about rivers (#{i}).", max_new_tokens=32) for i in range(24))
    deadline = time.monotonic() + 300
    while sum(h.ready() for h in handles) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(core, signal.SIGKILL)
    assert sum(h.ready() for h in handles) < 24
    results = [h.result(timeout=600) for h in handles]
    assert all(r.output.text for r in results)  # type: ignore[union-attr]
    assert _engine_core_pid(llama_fleet.worker) != core, "the engine core was not restarted"
    ledger = Ledger(client.redis_url, 60)
    counts = [ledger.counts(h.id) for h in handles]
    assert [c.get("executions") for c in counts] == [1] * 24, counts
    assert any(c["deliveries"] >= 2 for c in counts), "no task was in the killed core"
