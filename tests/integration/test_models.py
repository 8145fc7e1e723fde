"""Several models in one fleet: queues per (model, priority), workers that serve only what they loaded.

Two real workers on one broker: one loads model A, the other models B and A: the bundled model under
two aliases with different processors (B filters "Paris" out of what it generates), sharing one
prepared artifact. A third alias, configured with B as its fallback, is loaded by nobody.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared.config import Settings
from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_fleet import CLEAR_REVIEWS, SENTIMENT_TEMPLATE

pytestmark = [pytest.mark.integration, pytest.mark.beside]  # its own two-worker fleet: make test's second lane
A, B, UNSERVED = "smollm2-135m", "smollm2-b", "smollm2-unserved"
LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def two_models(prepared_models: None, redis_url: str, settings: Settings) -> Iterator[Fleet]:
    base = settings.models[0].model_dump(mode="json")
    redact = [{"name": "redact", "options": {"patterns": ["paris"]}}]
    models = [base, {**base, "name": B, "processors": redact}, {**base, "name": UNSERVED, "fallbacks": [B]}]
    one_thread = {"consumers": 1, "torch_threads": 1}
    with fleet_on(redis_url, models=models, workers=[{"worker": {"models": [A], **one_thread}},
                                                      {"worker": {"models": [B, A], **one_thread}}]) as running:
        yield running


def classify(text: str, model: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "prompt_template": SENTIMENT_TEMPLATE,
            "priority": priority, "model": model}


def served_by(fleet: Fleet, hostname: str) -> int:
    return next(i for i, w in enumerate(fleet.workers) if hostname.startswith(w.hostname_prefix))


def test_each_request_is_served_by_a_worker_that_loaded_its_model(two_models: Fleet) -> None:
    requests = [classify(text, model, priority) for model in (A, B) for priority in ("bulk", "interactive")
                for text, _ in CLEAR_REVIEWS[:6]]
    requests += [{"task_type": "text_generation", "prompt": "Name a colour.", "max_new_tokens": 4, "model": m} for m in (A, B)]
    handles = two_models.client.submit_many(requests)
    results = [h.result(timeout=600) for h in handles]
    for request, result in zip(requests, results, strict=True):
        assert result.model == request["model"] and result.fallback_from is None
    workers_of_b = {served_by(two_models, r.worker) for q, r in zip(requests, results, strict=True) if q["model"] == B}
    assert workers_of_b == {1}  # only the worker that loaded B ever got B's requests
    # The registry says who serves what (producers route fallbacks by it).
    registry = two_models.client.registry
    assert {served_by(two_models, w) for w in registry.workers(A)} == {0, 1}
    assert {served_by(two_models, w) for w in registry.workers(B)} == {1}
    assert registry.workers(UNSERVED) == []


def test_each_model_answers_with_its_own_processors(two_models: Fleet) -> None:
    ask = {"prompt": "What is the capital of France?", "max_new_tokens": 16}
    plain = two_models.client.generate(model=A, timeout=600, **ask).output.text  # type: ignore[union-attr]
    filtered = two_models.client.generate(model=B, timeout=600, **ask).output.text  # type: ignore[union-attr]
    assert "Paris" in plain
    assert "[redacted]" in filtered and "paris" not in filtered.lower()


def test_a_model_nobody_serves_goes_to_its_fallback_s_queue(two_models: Fleet) -> None:
    result = two_models.client.classify(CLEAR_REVIEWS[0][0], LABELS, prompt_template=SENTIMENT_TEMPLATE,
                                        model=UNSERVED, timeout=600)
    assert result.model == B and result.fallback_from == UNSERVED
    assert served_by(two_models, result.worker) == 1


def test_an_interactive_request_for_b_overtakes_bulk_backlogs_of_a_and_b(two_models: Fleet) -> None:
    client = two_models.client
    # A is drained by both workers, so it gets twice B's backlog.
    backlog = client.submit_many(classify(text, model) for text, _ in CLEAR_REVIEWS * 8 for model in (A, B, A))
    of_a, of_b = backlog[0::3] + backlog[2::3], backlog[1::3]
    deadline = time.monotonic() + 300
    while not (any(h.ready() for h in of_a) and any(h.ready() for h in of_b)):
        assert time.monotonic() < deadline, "the workers never started on the backlogs"
        time.sleep(0.02)
    urgent = client.submit_generate("Say hello.", max_new_tokens=8, priority="interactive", model=B)
    assert urgent.result(timeout=300).model == B
    done_a, done_b = sum(h.ready() for h in of_a), sum(h.ready() for h in of_b)
    print(f"interactive B finished after {done_a}/{len(of_a)} bulk A and {done_b}/{len(of_b)} bulk B")
    assert done_b < len(of_b) // 2 and done_a < len(of_a) // 2
    assert all(h.result(timeout=600).output.label in LABELS for h in backlog)  # type: ignore[union-attr]
