"""The whole fleet, for real: Redis broker, a `python -m workers` process, the prepared GPTQ model.

No fakes: producers talk to the worker only through Redis, and answers come from the real model.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from shared.errors import ErrorCode, FleetError
from shared.schemas import TaskType
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

SENTIMENT_TEMPLATE = 'Review: "{text}"\nSentiment ({labels}):'
CLEAR_REVIEWS = [
    ("Absolutely wonderful hotel: spotless rooms, friendly staff and a delicious breakfast.", "positive"),
    ("The worst meal I have ever had. Cold, bland and overpriced. Never again.", "negative"),
    ("I love this book! Beautifully written, I could not put it down.", "positive"),
    ("Dreadful service, rude staff, and my order arrived broken. Terrible experience.", "negative"),
    ("Fantastic film with brilliant acting. I enjoyed every minute and would watch it again.", "positive"),
    ("This printer is garbage: it jams constantly and the ink ran out in a day. I hate it.", "negative"),
    ("Great value and excellent quality. My whole family is delighted with it.", "positive"),
    ("Awful, boring and far too long. I regret wasting my money on this movie.", "negative"),
    ("The concert was amazing, the band was superb and the crowd loved it.", "positive"),
    ("My flight was cancelled, the airline lost my luggage and nobody helped. A horrible trip.", "negative"),
]


def test_generation_answers_a_factual_question(fleet: Fleet) -> None:
    handle = fleet.client.submit_generate("What is the capital of France?", max_new_tokens=32)
    assert handle.id  # an id at once, the answer later
    result = handle.result(timeout=300)
    assert "Paris" in result.output.text  # type: ignore[union-attr]
    assert result.task_type == TaskType.TEXT_GENERATION
    assert 0 < result.usage.completion_tokens <= 32 and result.usage.prompt_tokens > 0
    assert result.timings.inference_ms > 0 and result.timings.total_ms >= result.timings.inference_ms
    assert result.worker.startswith(fleet.worker.hostname_prefix)
    assert handle.status() == "SUCCESS"


def test_classifies_clear_sentiment(fleet: Fleet) -> None:
    handles = [
        fleet.client.submit_classify(text, ["positive", "negative"], prompt_template=SENTIMENT_TEMPLATE)
        for text, _ in CLEAR_REVIEWS
    ]
    results = [h.result(timeout=300) for h in handles]
    labels = [r.output.label for r in results]  # type: ignore[union-attr]
    correct = sum(label == gold for label, (_, gold) in zip(labels, CLEAR_REVIEWS, strict=True))
    assert correct >= 8, f"{correct}/10 correct: {labels}"
    for result in results:
        assert sum(result.output.scores.values()) == pytest.approx(1.0, abs=1e-4)  # type: ignore[union-attr]


def test_concurrent_generations_join_one_running_batch(tiny_fleet: Fleet) -> None:
    """Greedy generation is continuously batched: batch_size is the rows running when it joined.
    (How rows share a decode, not what they say: the tiny random model.)"""
    fleet = tiny_fleet
    prompts = [f"Write one short sentence about the number {n}." for n in range(16)]
    handles = fleet.client.submit_many(
        {"task_type": "text_generation", "prompt": p, "max_new_tokens": 12} for p in prompts
    )
    results = [h.result(timeout=300) for h in handles]
    sizes = [r.batch_size for r in results]
    assert all(r.usage.completion_tokens >= 1 for r in results)  # every row decoded (random text may be blank)
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    rows = fleet.settings.batching.continuous
    assert max(sizes) <= rows.max_rows + rows.interactive_reserve


def test_sampled_generations_are_micro_batched(tiny_fleet: Fleet) -> None:
    """Sampling is per row in a static micro-batch (the continuous manager samples all rows or none).
    (The tiny random model: the subject is the batching.)"""
    fleet = tiny_fleet
    handles = fleet.client.submit_many(
        {"task_type": "text_generation", "prompt": f"Name a colour ({n}).", "max_new_tokens": 6, "temperature": 0.7}
        for n in range(12)
    )
    sizes = [h.result(timeout=300).batch_size for h in handles]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    assert max(sizes) <= fleet.settings.batching.max_batch_size


def test_interactive_request_overtakes_a_bulk_backlog(tiny_fleet: Fleet) -> None:
    """The subject is the order work is taken in, not the answers: the tiny random model serves it
    (on the real model it was the suite's slowest priority check; test_llama_cpp_fleet checks the same
    overtaking on real weights, and the bench's isolation scenario times it)."""
    fleet = tiny_fleet
    bulk = fleet.client.submit_many(
        {"task_type": "classification", "text": text, "labels": ["positive", "negative"],
         "prompt_template": SENTIMENT_TEMPLATE, "priority": "bulk"}
        for text, _ in CLEAR_REVIEWS * 20
    )
    assert len(bulk) == 200
    # Submit once the worker is busy draining the backlog (its threads hold bulk messages), so the
    # interactive request has to get past both the Redis queue and the batcher.
    deadline = time.monotonic() + 300
    while not any(h.ready() for h in bulk[:32]):
        assert time.monotonic() < deadline, "the worker never started on the backlog"
        time.sleep(0.02)
    urgent = fleet.client.submit_generate("Say hello.", max_new_tokens=8, priority="interactive")
    urgent.result(timeout=300)
    finished_before = sum(h.ready() for h in bulk)
    print(f"interactive finished after {finished_before}/200 bulk requests")
    assert finished_before < len(bulk) // 2, f"{finished_before}/200 bulk requests finished first"
    # ... and none of the backlog is lost.
    assert all(h.result(timeout=600).output.label for h in bulk)  # type: ignore[union-attr]


def test_malformed_request_fails_alone_with_invalid_input(fleet: Fleet) -> None:
    from shared.queues import CLASSIFY_TASK

    queue = fleet.settings.queue_name("interactive")  # type: ignore[arg-type]
    good = [{"text": text, "labels": ["positive", "negative"], "prompt_template": SENTIMENT_TEMPLATE}
            for text, _ in CLEAR_REVIEWS[:7]]
    bad = {"text": "fine", "labels": ["only-one-label"]}
    payloads = good[:3] + [bad] + good[3:]
    # Raw messages, as a non-Python producer might send them: no client-side validation.
    sent = [fleet.client.app.send_task(CLASSIFY_TASK, args=[p], queue=queue, routing_key=queue) for p in payloads]
    handles = [fleet.client.handle(r.id) for r in sent]
    with pytest.raises(FleetError) as caught:
        handles[3].result(timeout=300)
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert "labels" in caught.value.message and not caught.value.retryable
    mates = [h.result(timeout=300) for i, h in enumerate(handles) if i != 3]
    assert all(r.output.label in ("positive", "negative") for r in mates)  # type: ignore[union-attr]
    assert max(r.batch_size for r in mates) > 1


def test_a_request_that_would_hold_the_model_for_minutes_is_refused_with_what_to_change(fleet: Fleet) -> None:
    """32 multi-token labels x a 1,400-token text: 64 scoring rows, ~112,000 padded tokens (it held a
    2-core worker for minutes and 7 GB). Refused before the model, PROMPT_TOO_LONG, and the worker serves on."""
    labels = [f"category {i} with a rather long descriptive name here" for i in range(32)]
    handle = fleet.client.submit_classify("This is a fairly long text about many things. " * 150, labels)
    with pytest.raises(FleetError) as refused:
        handle.result(timeout=300)
    assert refused.value.code == ErrorCode.PROMPT_TOO_LONG and not refused.value.retryable
    assert "batching.max_request_tokens" in refused.value.message and "fewer or shorter labels" in refused.value.message
    assert fleet.client.classify("Great film!", ["positive", "negative"], timeout=300).output.label  # type: ignore[union-attr]


def test_producer_refuses_bad_requests_before_enqueue(fleet: Fleet) -> None:
    with pytest.raises(FleetError) as caught:
        fleet.client.submit_generate("hi", max_new_tokens=0)
    assert caught.value.code == ErrorCode.INVALID_INPUT and "max_new_tokens" in caught.value.message
    with pytest.raises(FleetError) as unknown:
        fleet.client.submit_generate("hi", model="no-such-model")
    assert unknown.value.code == ErrorCode.INVALID_INPUT and "no-such-model" in unknown.value.message


def test_worker_reports_prompt_too_long_and_expired_deadlines(fleet: Fleet) -> None:
    too_long = fleet.client.submit_generate("lorem ipsum " * 2000, max_new_tokens=8)
    expired = fleet.client.submit_generate("hi", deadline=time.time() - 1)
    with pytest.raises(FleetError) as long_error:
        too_long.result(timeout=300)
    assert long_error.value.code == ErrorCode.PROMPT_TOO_LONG and "tokens" in long_error.value.message
    with pytest.raises(FleetError) as deadline_error:
        expired.result(timeout=300)
    assert deadline_error.value.code == ErrorCode.DEADLINE_EXCEEDED
    # The worker is still serving.
    assert fleet.client.generate("What is 2 + 2?", max_new_tokens=8, timeout=300).output.text  # type: ignore[union-attr]


def test_identical_deterministic_requests_can_be_answered_from_the_cache(fleet: Fleet) -> None:
    prompt = f"Name a colour. ({time.time()})"
    first = fleet.client.generate(prompt, max_new_tokens=8, cache=True, timeout=300)
    second = fleet.client.generate(prompt, max_new_tokens=8, cache=True, timeout=300)
    assert not first.cached and second.cached
    assert second.output == first.output and second.usage == first.usage
    assert not fleet.client.generate(prompt, max_new_tokens=8, timeout=300).cached  # opt-in only
    sampled = [fleet.client.generate(prompt, max_new_tokens=8, temperature=0.7, cache=True, timeout=300) for _ in range(2)]
    assert not any(r.cached for r in sampled)  # sampling is never cached


def test_autoglm_trace_prints_a_tasks_timeline(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    handle = fleet.client.submit_generate("Name a tree.", max_new_tokens=4)
    handle.result(timeout=300)
    monkeypatch.setenv("REDIS_URL", fleet.client.redis_url)
    assert main(["trace", handle.id]) == 0
    out = capsys.readouterr().out
    assert handle.id in out and "waiting in Redis" in out and "model (smollm2-135m, batch of" in out


def test_a_wait_that_runs_out_is_a_one_line_timeout_and_an_unknown_id_says_so(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    monkeypatch.setenv("REDIS_URL", fleet.client.redis_url)
    # An id this fleet never had is not "PENDING": the CLI says so and fails, at once.
    assert main(["result", "no-such-task"]) == 2
    assert "error NOT_FOUND: no task no-such-task in this fleet" in capsys.readouterr().err
    assert fleet.client.handle("no-such-task").status() == "UNKNOWN"
    # A real task that is not done in time: a one-line TIMEOUT, exit 1; `result` shows it pending.
    slow = fleet.client.submit_generate("Tell a long story about a lighthouse keeper.", max_new_tokens=400)
    assert main(["trace", slow.id, "--timeout", "0.5"]) == 1
    assert f"error TIMEOUT: task {slow.id} not finished after 0.5s" in capsys.readouterr().err
    assert main(["result", slow.id]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["status"] in ("PENDING", "STARTED")
    slow.cancel()
    task_id = f"not-yet-published-{time.time_ns()}"  # nothing can answer it before it is published below
    handle = fleet.client.handle(task_id)
    with pytest.raises(FleetError) as unknown:
        handle.result(timeout=0.01)
    assert unknown.value.code == ErrorCode.NOT_FOUND
    backend = fleet.client.app.backend
    assert handle.id not in backend._pending_results.concrete  # no subscription left behind by the wait
    fleet.client.submit_many([{"task_type": "text_generation", "prompt": "Count to twenty.", "max_new_tokens": 16}],
                             task_ids=[task_id])
    assert handle.status() in ("PENDING", "STARTED", "SUCCESS")
    assert handle.result(timeout=300).usage.completion_tokens >= 1  # waiting again subscribes again


def test_requeueing_an_id_that_is_not_dead_lettered_says_so_and_fails(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    monkeypatch.setenv("REDIS_URL", fleet.client.redis_url)
    assert main(["dlq", "requeue", "no-such-task"]) == 1
    assert "not requeued (not in the dead-letter queue" in capsys.readouterr().err


def test_a_result_stored_without_its_publish_still_reaches_a_waiting_caller(fleet: Fleet) -> None:
    """Celery subscribes when a caller starts waiting and reads the state once; a state stored in
    between publishes to nobody. TaskHandle.result reads the stored state again every RECHECK_S,
    so it returns that answer instead of waiting out its timeout."""
    done = fleet.client.submit_generate("Name a colour.", max_new_tokens=4)
    done.result(timeout=300)
    backend = fleet.client.app.backend
    meta = backend.decode(backend.client.get(backend.get_key_for_task(done.id)))
    waiting = fleet.client.handle(f"unpublished-{done.id}")

    def store_silently() -> None:  # SET only: the PUBLISH that normally follows never comes
        time.sleep(0.5)
        backend.client.set(backend.get_key_for_task(waiting.id), backend.encode({**meta, "task_id": waiting.id}))

    threading.Thread(target=store_silently).start()
    started = time.monotonic()
    assert waiting.result(timeout=20).output.text == done.result(timeout=5).output.text  # type: ignore[union-attr]
    assert time.monotonic() - started < 10


def test_a_result_stored_between_the_callers_read_and_its_subscribe_reaches_it_in_the_same_wait(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order Redis ran for about 1 in 50 streamed requests (MONITOR): the caller's read of the
    state (STARTED), the worker's store and PUBLISH, then the caller's SUBSCRIBE - published to
    nobody. Played here in that order; the caller reads the state again once its subscription is
    live, so the wait that was running gets the answer (before, a later recheck did, RECHECK_S in)."""
    done = fleet.client.submit_generate("Name a fruit.", max_new_tokens=4)
    answer = done.result(timeout=300)
    backend = fleet.client.app.backend
    consumer = backend.result_consumer
    meta = backend.decode(backend.client.get(backend.get_key_for_task(done.id)))
    waiting = fleet.client.handle(f"raced-{done.id}")
    key = backend.get_key_for_task(waiting.id)
    backend.client.set(key, backend.encode({**meta, "status": "STARTED", "result": None, "task_id": waiting.id}))
    subscribe, read = consumer.consume_from, consumer.on_wait_for_pending
    held: list[str] = []

    def stored_before_subscribed(result, **kwargs):  # noqa: ANN001, ANN003 - Celery's signature
        read(result, **kwargs)  # the caller's read: STARTED
        if held:
            stored = backend.encode({**meta, "task_id": waiting.id})
            backend.client.set(key, stored)
            backend.client.publish(key, stored)  # nobody is subscribed yet
            subscribe(held.pop())

    monkeypatch.setattr(consumer, "consume_from", lambda task_id: held.append(task_id) if task_id == waiting.id
                        else subscribe(task_id))
    monkeypatch.setattr(consumer, "on_wait_for_pending", stored_before_subscribed)
    waits: list[float] = []
    get = waiting._result.get
    monkeypatch.setattr(waiting._result, "get", lambda **kwargs: waits.append(kwargs["timeout"]) or get(**kwargs))
    assert waiting.result(timeout=20).output.text == answer.output.text  # type: ignore[union-attr]
    assert len(waits) == 1  # answered by the wait that began before the store, no recheck needed


def test_autoglm_generate_and_classify_print_the_task_id(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The id comes first (stderr, before the wait) and again in the JSON, so `autoglm result <id>` can
    find a task whose wait ran out."""
    from autoglm.cli import main
    from tests.integration.conftest import cli_env

    for key, value in cli_env(fleet).items():
        if key.startswith("AUTOGLM_") or key == "REDIS_URL":
            monkeypatch.setenv(key, value)
    assert main(["generate", "Name a tree.", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert captured.err.startswith(f"task {answer['id']}") and answer["usage"]["completion_tokens"] >= 1
    assert main(["classify", "Lovely soup.", "--labels", "positive,negative"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["id"] and answer["output"]["label"] in ("positive", "negative")
