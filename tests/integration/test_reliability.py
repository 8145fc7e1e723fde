"""Nothing lost: faults are injected, workers are killed, Redis is restarted, garbage is sent.

Every test runs real worker processes on a real broker; faults come from the test-only hook in
workers/core/faults.py, enabled per worker through its config. Tests whose subject is the machinery
(kills, restarts, garbage on the queue, fault policies) run on the tiny random model (conftest
``tiny_model``): the same engine with a model ~50x cheaper per request. Where a test needs work to
still be waiting (a cancel landing, a kill mid-batch), a ``slow_ms`` fault makes every batch last that
long, on any machine, instead of counting on the real model being slow.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from autoglm.fleet import WorkerProcess
from shared.broker import EmbeddedRedis
from shared.dlq import DeadLetters
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority
from tests.integration.conftest import Fleet, cli_env, fleet_on
from workers.consumer.ledger import UNACKED_KEY, Ledger

pytestmark = pytest.mark.integration
TEMPLATE = 'Review: "{text}"\nSentiment ({labels}):'
LABELS = ["positive", "negative"]
REVIEWS = [
    "Wonderful food and friendly staff.", "Terrible service, cold food.", "I love this phone.",
    "The worst hotel I have stayed in.", "A delightful, moving film.", "Broken on arrival, useless.",
]
FAULTS = {"oom_batch_over": 2, "fail_marker": "FAIL-ME", "transient_marker": "POISON", "flaky_marker": "FLAKY", "flaky_times": 2,
          "slow_ms": 100}  # 12 queued requests hold the worker >= 0.6 s: a cancel lands while they wait


def classify(text: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "prompt_template": TEMPLATE, "priority": priority}


@pytest.fixture(scope="module")
def faulty(tiny_model: dict, redis_url: str) -> Iterator[Fleet]:
    # A second, configured-but-not-loaded model that falls back to the served one.
    base = tiny_model
    models = [base, {**base, "name": "smollm2-large", "fallbacks": [base["name"]]}]
    with fleet_on(
        redis_url, faults=FAULTS, models=models, worker={"models": [base["name"]]},
        policies={"ENGINE_TRANSIENT": {"action": "retry", "attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
                  "RESOURCE_EXHAUSTED": {"action": "split"}, "MODEL_UNAVAILABLE": {"action": "fallback"}},
    ) as running:
        yield running


def test_out_of_memory_batches_are_split_until_they_fit(faulty: Fleet) -> None:
    handles = faulty.client.submit_many(classify(REVIEWS[i % 6]) for i in range(12))
    results = [h.result(timeout=300) for h in handles]
    sizes = {r.batch_size for r in results}
    assert max(sizes) == 2, sizes  # every batch over 2 ran out of memory and was split


def others_of_a_permanent_fault(client, request: Callable[[str], dict]) -> list:  # noqa: ANN001
    """The six reviews with a FAIL-ME request among them (fleet config ``FAULTS``): that one fails
    INTERNAL; the others' results, in order (any backend's fleet: test_llama_cpp_fleet.py too)."""
    handles = client.submit_many(request(t) for t in [*REVIEWS[:3], "FAIL-ME please", *REVIEWS[3:]])
    with pytest.raises(FleetError) as caught:
        handles[3].result(timeout=300)
    assert caught.value.code == ErrorCode.INTERNAL
    return [h.result(timeout=300) for i, h in enumerate(handles) if i != 3]


def test_a_permanent_fault_fails_only_its_own_request(faulty: Fleet) -> None:
    assert all(r.output.label in LABELS for r in others_of_a_permanent_fault(faulty.client, classify))  # type: ignore[union-attr]


def test_a_transient_fault_is_retried_with_backoff(faulty: Fleet) -> None:
    result = faulty.client.submit_classify("FLAKY but lovely", LABELS, prompt_template=TEMPLATE).result(timeout=300)
    assert result.output.label in LABELS  # type: ignore[union-attr]


def test_a_poison_request_goes_to_the_dlq_while_others_complete(faulty: Fleet) -> None:
    dlq = DeadLetters(faulty.client.redis_url)
    dlq.purge()
    handles = faulty.client.submit_many(classify(t) for t in ["POISON pill", *REVIEWS])
    assert all(h.result(timeout=300).output.label in LABELS for h in handles[1:])  # type: ignore[union-attr]
    with pytest.raises(FleetError) as caught:
        handles[0].result(timeout=300)
    assert caught.value.code == ErrorCode.ENGINE_TRANSIENT and caught.value.retryable
    entries = dlq.list()
    assert [e["task_id"] for e in entries] == [handles[0].id]
    codes = [h["code"] for h in entries[0]["history"]]  # the whole story: OOM splits, then 3 attempts alone
    assert codes[-3:] == ["ENGINE_TRANSIENT"] * 3, codes
    # Requeued under the same id, it fails the same way and is dead-lettered again: nothing vanishes.
    assert dlq.requeue(faulty.client.app) == [handles[0].id]
    deadline = time.monotonic() + 120
    while len(dlq) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [e["task_id"] for e in dlq.list()] == [handles[0].id]
    dlq.purge()


def test_an_unloaded_model_falls_back_along_its_chain(faulty: Fleet) -> None:
    result = faulty.client.submit_classify(REVIEWS[0], LABELS, prompt_template=TEMPLATE, model="smollm2-large").result(timeout=300)
    assert result.model == faulty.settings.models[0].name and result.fallback_from == "smollm2-large"


def test_a_cancelled_request_never_runs(faulty: Fleet) -> None:
    # The victim is cancelled a few milliseconds after it is queued behind the backlog, which keeps
    # the worker busy for a second or more (batches of at most 2, each >= 100 ms: FAULTS): it is
    # still waiting when the cancel lands.
    backlog = faulty.client.submit_many(classify(REVIEWS[i % 6]) for i in range(12))
    victim = faulty.client.submit_classify(REVIEWS[0], LABELS, prompt_template=TEMPLATE)
    victim.cancel()
    with pytest.raises(FleetError) as caught:
        victim.result(timeout=300)
    assert caught.value.code == ErrorCode.CANCELLED
    assert all(h.result(timeout=300) for h in backlog)
    assert Ledger(faulty.client.redis_url, 60).counts(victim.id).get("executions", 0) == 0


@dataclass
class Churned:
    """A fleet whose workers the tests kill or stop; ``workers`` are the ones alive now."""

    fleet: Fleet
    workers: list[WorkerProcess]


@pytest.fixture(scope="module")
def churned(tiny_model: dict, redis_url: str) -> Iterator[Churned]:
    """Two workers at the default broker settings on the tiny model, batches of >= 300 ms."""
    with fleet_on(redis_url, models=[tiny_model], faults={"slow_ms": 300}, workers=[{}, {}]) as fleet:
        state = Churned(fleet, list(fleet.workers))
        try:
            yield state
        finally:
            for worker in state.workers:
                worker.stop()


@pytest.mark.beside
def test_killing_workers_mid_batch_loses_nothing_and_runs_nothing_twice(churned: Churned) -> None:
    """Six kill -9s, both workers at once in three rounds, at the default broker settings, each
    round with 100 accepted tasks spread over both: every task ends SUCCESS, each answer is computed
    once, and all are answered within the redelivery bound of the kill (a killed worker's messages
    are restored visibility_timeout_s after its last heartbeat, swept every restore_interval_s) plus
    what the work itself takes on this machine: the replacements' start and three times the round's compute
    at the rate measured before the kill (a slow machine must not fail this; a redelivery that waited
    for kombu's default hour would). With both killed no live worker is left to sweep: the
    replacements must find what the dead ones held."""
    fleet = churned.fleet
    redelivery_s = fleet.settings.broker.visibility_timeout_s + fleet.settings.broker.restore_interval_s
    ledger = Ledger(fleet.client.redis_url, 60)
    redelivered = 0
    for round_ in range(3):
        handles = fleet.client.submit_many(classify(f"{REVIEWS[i % 6]} ({round_}.{i})") for i in range(100))
        submitted = time.monotonic()
        deadline = submitted + 120
        while sum(h.ready() for h in handles) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        round_compute_s = (time.monotonic() - submitted) / 30 * 100
        for victim in churned.workers:
            os.kill(victim.process.pid, signal.SIGKILL)  # mid-batch: batches take >= 300 ms
        killed_at = time.monotonic()
        for victim in churned.workers:
            victim.process.wait()
        assert sum(h.ready() for h in handles) < 100
        churned.workers = [WorkerProcess(fleet.client.redis_url, env=_env_of(fleet)) for _ in churned.workers]
        for replacement in churned.workers:
            replacement.wait_ready(fleet.client.app)
        ready_after = time.monotonic() - killed_at
        bound = redelivery_s + ready_after + 3 * round_compute_s  # 2x was missed once on a fresh clone's first run
        results = [h.result(timeout=max(1.0, killed_at + bound - time.monotonic())) for h in handles]
        print(f"round {round_}: replacements ready {ready_after:.1f} s after the kills, all answered after "
              f"{time.monotonic() - killed_at:.1f} s (bound {bound:.1f} s; round's compute {round_compute_s:.1f} s)")
        assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
        counts = [ledger.counts(h.id) for h in handles]
        assert [c.get("executions") for c in counts] == [1] * 100, counts
        redelivered += sum(c["deliveries"] >= 2 for c in counts)
    assert redelivered > 0, "no task was redelivered: the kills hit nothing"


@pytest.mark.beside
def test_sigterm_mid_batch_hands_back_what_it_holds_and_every_task_is_answered_once(churned: Churned) -> None:
    """Scale-down (an autoscaler, a rolling deploy): SIGTERM is a warm shutdown. A worker stopped with
    batches running finishes them, and every message it holds but has not started goes back to its
    queue as it exits: none is left unacked for the visibility timeout. A replacement answers the
    rest; every task is answered once."""
    fleet = churned.fleet
    handles = fleet.client.submit_many(classify(f"{REVIEWS[i % 6]} (term {i})") for i in range(100))
    deadline = time.monotonic() + 120
    while sum(h.ready() for h in handles) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in churned.workers:
        worker.process.send_signal(signal.SIGTERM)  # mid-batch: batches take >= 300 ms
    for worker in churned.workers:
        assert worker.process.wait(timeout=120) == 0, worker.log_tail()
    assert sum(h.ready() for h in handles) < 100  # they stopped with work left over
    ours = {h.id for h in handles}
    unacked = redis.Redis.from_url(fleet.client.redis_url).hvals(UNACKED_KEY)
    held = [m for m in map(json.loads, unacked) if m[0].get("headers", {}).get("id") in ours]
    assert not held, f"{len(held)} messages left unacked: they would wait for the visibility timeout"
    churned.workers = [WorkerProcess(fleet.client.redis_url, env=_env_of(fleet))]
    churned.workers[0].wait_ready(fleet.client.app)
    results = [h.result(timeout=300) for h in handles]
    assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    ledger = Ledger(fleet.client.redis_url, 60)
    assert [ledger.counts(h.id).get("executions") for h in handles] == [1] * 100


def _env_of(fleet: Fleet) -> dict[str, str]:
    """A replacement worker's environment: the fleet's queues and models, its broker and fault settings."""
    s = fleet.settings
    return {**cli_env(fleet), "AUTOGLM_BROKER": json.dumps(s.broker.model_dump()), "AUTOGLM_FAULTS": json.dumps(s.faults)}


@pytest.mark.beside
def test_restarting_redis_loses_no_accepted_request(tiny_model: dict) -> None:
    with EmbeddedRedis(data_dir=Path(tempfile.mkdtemp(prefix="autoglm-redis-")), persist=True) as server:
        with fleet_on(server.url, models=[tiny_model], broker={"visibility_timeout_s": 20, "restore_interval_s": 1,
                                          "publish_attempts": 4, "publish_backoff_max_s": 0.5}) as fleet:
            accepted, refused = [], []

            def produce() -> None:
                for i in range(500):
                    try:
                        accepted.append(fleet.client.submit(classify(f"{REVIEWS[i % 6]} #{i}")))
                    except FleetError as exc:
                        assert exc.code == ErrorCode.BROKER_UNAVAILABLE
                        refused.append(i)
                    time.sleep(0.004)

            producer = threading.Thread(target=produce)
            producer.start()
            time.sleep(0.6)
            server.restart(down_s=1.5)
            producer.join(timeout=300)
            results = [h.result(timeout=600) for h in accepted]
    assert len(accepted) + len(refused) == 500
    assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    print(f"accepted {len(accepted)}, refused {len(refused)} while Redis was down")


def _envelope(queue: str, body: str, **properties: object) -> bytes:
    """A kombu envelope as Celery would publish it, around a body of our choosing."""
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "autoglm.classify", "id": uuid.uuid4().hex, "lang": "py"},
        "properties": {"body_encoding": "base64", "delivery_tag": uuid.uuid4().hex, "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": queue, "routing_key": queue}, **properties},
    }).encode()


@pytest.mark.beside
def test_malformed_messages_of_any_shape_go_to_the_dlq_and_the_worker_stays_up(tiny_model: dict, redis_url: str) -> None:
    with fleet_on(redis_url, models=[tiny_model], faults={"slow_ms": 150}) as fleet:
        bulk = fleet.settings.queue_name(Priority.BULK)
        shapes = {
            "not JSON": b"\xff\xfe{not json at all",
            "a JSON list": b"[1, 2, 3]",
            "a JSON string": b'"just a string"',
            "an envelope whose body is not base64": _envelope(bulk, "%%% not base64 %%%"),
            "a JSON object without an envelope": b'{"hello": "world"}',
        }
        dlq = DeadLetters(fleet.client.redis_url)
        dlq.purge()
        handles = fleet.client.submit_many(classify(f"{REVIEWS[i % 6]} #{i}") for i in range(40))
        deadline = time.monotonic() + 120
        while sum(h.ready() for h in handles) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        raw = redis.Redis.from_url(fleet.client.redis_url)
        for body in shapes.values():  # behind the tasks already queued, while others are in flight
            raw.lpush(bulk, body)
        results = [h.result(timeout=300) for h in handles]
        deadline = time.monotonic() + 60
        while len(dlq) < len(shapes) and time.monotonic() < deadline:
            time.sleep(0.05)
        entries = dlq.list()
        assert fleet.worker.process.poll() is None, fleet.worker.log_tail()
        assert len(entries) == len(shapes), entries
        # One entry per shape, raw body kept (order is not: some are caught in the fetch script,
        # others after it, and one fetch can take several messages).
        by_raw = {entry["raw"]: entry for entry in entries}
        assert set(by_raw) == {body.decode("utf-8", "replace") for body in shapes.values()}, entries
        assert all(e["error"]["code"] == "INVALID_INPUT" and e["reason"] for e in entries), entries
        assert "base64" in by_raw[shapes["an envelope whose body is not base64"].decode()]["reason"]
        assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
        ledger = Ledger(redis_url, 60)
        assert [ledger.counts(h.id).get("executions") for h in handles] == [1] * 40
        assert all(raw.llen(q) == 0 for q in (bulk, fleet.settings.queue_name(Priority.INTERACTIVE)))
        # A worker started afterwards finds nothing poisoned and serves normally.
        second = WorkerProcess(fleet.client.redis_url, env=_env_of(fleet))
        try:
            second.wait_ready(fleet.client.app)
            fleet.worker.stop()
            late = [fleet.client.submit(classify(text)) for text in REVIEWS]
            assert all(h.result(timeout=120).output.label in LABELS for h in late)  # type: ignore[union-attr]
            assert second.process.poll() is None
        finally:
            second.stop()
        dlq.purge()


def test_a_task_id_published_twice_runs_once_even_when_both_copies_are_in_flight(fleet: Fleet) -> None:
    """What a resumed backfill does with a chunk whose publish it never saw confirmed: the same task
    ids again. Each copy sits next to the original, so both are often in the worker at once."""
    requests = [classify(f"{REVIEWS[i % 6]} (twice {i})") for i in range(24)]
    ids = [uuid.uuid4().hex for _ in requests]
    interleaved = [r for pair in zip(requests, requests, strict=True) for r in pair]
    handles = fleet.client.submit_many(interleaved, task_ids=[i for pair in zip(ids, ids, strict=True) for i in pair])
    results = [h.result(timeout=300) for h in handles]
    assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    ledger = Ledger(fleet.client.redis_url, 60)
    counts = [ledger.counts(task_id) for task_id in ids]
    assert all(c["deliveries"] == 2 for c in counts), counts
    assert [c.get("executions") for c in counts] == [1] * 24, counts


def _engine_core_pid(worker: WorkerProcess) -> int:
    """The worker's engine-core child (python -m workers.core.loop), from /proc."""
    cores = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == worker.process.pid and b"workers.core.loop" in (entry / "cmdline").read_bytes():
                cores.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    assert len(cores) == 1, cores
    return cores[0]


@pytest.mark.beside
@pytest.mark.parametrize("consumers", [1, 2])
def test_killing_the_engine_core_mid_batch_loses_nothing_and_runs_nothing_twice(
        tiny_model: dict, redis_url: str, consumers: int) -> None:
    """The model process dies under a batch: its requests are requeued (never acked as done), the
    consumer that owns it restarts the core, every consumer feeding it reconnects, and every task
    is answered once."""
    env = {"AUTOGLM_WORKER__CONSUMERS": str(consumers)}
    with fleet_on(redis_url, env=env, models=[tiny_model], faults={"slow_ms": 300}) as fleet:
        core = _engine_core_pid(fleet.worker)
        handles = fleet.client.submit_many(classify(f"{REVIEWS[i % 6]} (core {i})") for i in range(60))
        deadline = time.monotonic() + 120
        while sum(h.ready() for h in handles) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(core, signal.SIGKILL)  # mid-batch: batches take >= 300 ms
        assert sum(h.ready() for h in handles) < 60
        results = [h.result(timeout=300) for h in handles]
        assert fleet.worker.process.poll() is None, "the consumer must outlive its engine core"
        assert _engine_core_pid(fleet.worker) != core, "the engine core was not restarted"
    assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    assert len({r.worker for r in results}) == consumers, "every consumer process should have served"
    ledger = Ledger(redis_url, 60)
    counts = [ledger.counts(h.id) for h in handles]
    assert [c.get("executions") for c in counts] == [1] * 60, counts
    assert any(c["deliveries"] >= 2 for c in counts), "no task was in the killed core"


@pytest.mark.beside
def test_a_task_longer_than_the_visibility_timeout_is_not_redelivered_while_its_worker_lives(
        tiny_model: dict, redis_url: str) -> None:
    """The heartbeat renews what a live worker holds: a 5 s batch under a 3 s visibility timeout
    (swept every second) is delivered once and run once."""
    broker = {"visibility_timeout_s": 3, "heartbeat_s": 0.5, "restore_interval_s": 1}
    with fleet_on(redis_url, models=[tiny_model], broker=broker, faults={"slow_ms": 5000}) as fleet:
        handles = fleet.client.submit_many(classify(f"{REVIEWS[i % 6]} (long {i})") for i in range(5))
        results = [h.result(timeout=120) for h in handles]
    assert all(r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    ledger = Ledger(redis_url, 60)
    assert [ledger.counts(h.id) for h in handles] == [{"deliveries": 1, "executions": 1}] * 5
