"""MicroBatcher behaviour, with a plain function standing in for the model."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

import pytest

from workers.core.batcher import MicroBatcher, Shape

ONE = Shape(rows=1, width=10)


class Recorder:
    """A batch function that records every batch and can hold the first one back."""

    def __init__(self, fail_on: set[str] | None = None, hold_first: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on or set()
        self.hold_first = hold_first
        self.started = threading.Event()

    def __call__(self, key: Hashable, payloads: list[str]) -> list[str]:
        self.batches.append(list(payloads))
        if self.hold_first is not None and len(self.batches) == 1:
            self.started.set()
            self.hold_first.wait(5)
        bad = self.fail_on.intersection(payloads)
        if bad:
            raise ValueError(f"poisoned: {sorted(bad)}")
        return [p.upper() for p in payloads]


def make(run: Recorder, **kw: float) -> MicroBatcher:
    params = {"max_batch_size": 4, "max_batch_tokens": 10_000, "max_wait_ms": 50.0, **kw}
    return MicroBatcher(run, **params).start()  # type: ignore[arg-type]


def test_requests_arriving_together_share_a_batch_up_to_max_size() -> None:
    run = Recorder()
    batcher = make(run, max_wait_ms=200)
    futures = [batcher.submit("k", f"r{i}", ONE) for i in range(6)]
    results = [f.result(5) for f in futures]
    batcher.stop()
    assert [r for r, _ in results] == [f"R{i}" for i in range(6)]
    assert [len(b) for b in run.batches] == [4, 2]
    assert [info.size for _, info in results] == [4, 4, 4, 4, 2, 2]


def test_a_lone_request_runs_after_max_wait() -> None:
    run = Recorder()
    batcher = make(run, max_wait_ms=30)
    started = time.monotonic()
    result, info = batcher.submit("k", "solo", ONE).result(5)
    batcher.stop()
    assert result == "SOLO" and info.size == 1
    assert time.monotonic() - started >= 0.025


def test_flushes_at_once_when_every_worker_thread_is_already_waiting() -> None:
    run = Recorder()
    batcher = make(run, max_wait_ms=5_000, max_pending=3)
    futures = [batcher.submit("k", f"r{i}", ONE) for i in range(3)]
    _, info = futures[0].result(2)  # far less than max_wait: nobody else can arrive
    batcher.stop()
    assert info.size == 3


def test_interactive_jumps_the_bulk_backlog() -> None:
    release = threading.Event()
    run = Recorder(hold_first=release)
    batcher = make(run, max_batch_size=2, max_wait_ms=0)
    first = batcher.submit("k", "bulk-0", ONE, rank=1)
    assert run.started.wait(5)
    bulk = [batcher.submit("k", f"bulk-{i}", ONE, rank=1) for i in range(1, 7)]
    urgent = batcher.submit("k", "urgent", ONE, rank=0)
    release.set()
    urgent.result(5)
    for f in [first, *bulk]:
        f.result(5)
    batcher.stop()
    assert run.batches[1][0] == "urgent"  # the very next batch after the running one


def test_batch_size_can_depend_on_the_batch_key() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch_size=lambda key: {"small": 2, "big": 5}[key],  # type: ignore[arg-type]
                           max_batch_tokens=10_000, max_wait_ms=100).start()
    futures = [batcher.submit(k, f"{k}{i}", ONE) for i in range(6) for k in ("small", "big")]
    for f in futures:
        f.result(5)
    batcher.stop()
    assert max(len(b) for b in run.batches if b[0].startswith("small")) == 2
    assert max(len(b) for b in run.batches if b[0].startswith("big")) == 5


def test_after_a_batch_the_next_one_waits_for_the_released_threads_to_refill_it() -> None:
    release = threading.Event()
    run = Recorder(hold_first=release)
    batcher = make(run, max_batch_size=4, max_wait_ms=150)
    first = batcher.submit("k", "bulk-0", ONE, rank=1)
    assert run.started.wait(5)
    early = batcher.submit("k", "bulk-1", ONE, rank=1)  # arrived long before the model is free
    time.sleep(0.2)
    release.set()
    first.result(5)
    time.sleep(0.03)  # the released thread fetches its next message: an interactive one
    urgent = batcher.submit("k", "urgent", ONE, rank=0)
    urgent.result(5)
    early.result(5)
    batcher.stop()
    assert run.batches[1] == ["urgent", "bulk-1"]  # not ["bulk-1"] alone, started the moment the model freed


class Broker:
    """Stands in for the broker's interactive queue, which the batcher peeks at."""

    def __init__(self) -> None:
        self.interactive: list[str] = []
        self.peeks = 0

    def urgent_queued(self) -> bool:
        self.peeks += 1
        return bool(self.interactive)


def _full_bulk_batch_waiting_behind_a_running_one(broker: Broker) -> tuple[Recorder, MicroBatcher, list, threading.Event]:
    """One bulk batch running and the next one already full and waiting (threads >= 2 batches)."""
    release = threading.Event()
    run = Recorder(hold_first=release)
    batcher = make(run, max_batch_size=2, max_wait_ms=3_000, max_pending=3, urgent_upstream=broker.urgent_queued)  # type: ignore[arg-type]
    futures = [batcher.submit("cls", "bulk-0", ONE, rank=1), batcher.submit("cls", "bulk-1", ONE, rank=1)]
    assert run.started.wait(5)
    futures += [batcher.submit("cls", f"bulk-{i}", ONE, rank=1) for i in (2, 3)]
    return run, batcher, futures, release


def test_a_full_bulk_batch_goes_the_moment_the_model_is_free_when_nothing_urgent_is_queued() -> None:
    broker = Broker()
    run, batcher, futures, release = _full_bulk_batch_waiting_behind_a_running_one(broker)
    release.set()
    for f in futures:
        f.result(1)  # far inside the 3 s refill window: nothing held it back
    batcher.stop()
    assert run.batches == [["bulk-0", "bulk-1"], ["bulk-2", "bulk-3"]]
    assert broker.peeks == 2  # one broker round trip per full bulk batch


def test_a_full_bulk_batch_holds_for_interactive_requests_queued_upstream() -> None:
    broker = Broker()
    run, batcher, futures, release = _full_bulk_batch_waiting_behind_a_running_one(broker)
    broker.interactive.append("urgent")  # arrives while every worker thread is busy
    release.set()
    futures[0].result(5)
    time.sleep(0.05)  # a released thread fetches it from the broker and submits it
    urgent = batcher.submit("gen", broker.interactive.pop(), ONE, rank=0)
    urgent.result(5)
    for f in futures:
        f.result(5)
    batcher.stop()
    assert run.batches[1] == ["urgent"]  # ahead of the full bulk batch that was ready first
    assert broker.peeks == 3  # once per idle period, not on every wake-up


def test_while_the_caller_runs_urgent_work_of_its_own_only_urgent_batches_go() -> None:
    """The engine core's loop (no batcher thread): while continuous batching decodes interactive
    rows, a bulk batch would hold the model between their steps, so it waits; interactive ones don't."""
    run = Recorder()
    batcher = MicroBatcher(run, max_batch_size=2, max_batch_tokens=10_000, max_wait_ms=0)  # type: ignore[arg-type]
    bulk = [batcher.submit("cls", f"bulk-{i}", ONE, rank=1) for i in range(2)]
    assert batcher.take(hold_less_urgent=True)[0] is None
    urgent = batcher.submit("cls", "urgent", ONE, rank=0)
    batch, _ = batcher.take(hold_less_urgent=True)
    assert batch is not None and [m.payload for m in batch] == ["urgent", "bulk-0"]  # led by it, filled as usual
    batcher.execute(batch)
    assert batcher.take(hold_less_urgent=True)[0] is None
    batch, _ = batcher.take(hold_less_urgent=False)  # the interactive rows finished
    assert batch is not None
    batcher.execute(batch)
    assert urgent.result(1)[0] == "URGENT" and [f.result(1)[0] for f in bulk] == ["BULK-0", "BULK-1"]


def test_token_budget_limits_batch_width() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=8, max_batch_tokens=250, max_wait_ms=100)
    futures = [batcher.submit("k", f"r{i}", Shape(rows=1, width=100)) for i in range(5)]
    for f in futures:
        f.result(5)
    batcher.stop()
    assert all(len(b) <= 2 for b in run.batches)  # 3 rows x 100 tokens would exceed 250


def test_different_keys_never_share_a_batch() -> None:
    run = Recorder()
    batcher = make(run, max_batch_size=8, max_wait_ms=100)
    futures = [batcher.submit(("m", k), f"{k}{i}", ONE) for i in range(4) for k in ("gen", "cls")]
    for f in futures:
        f.result(5)
    batcher.stop()
    assert sorted(b[0][:3] for b in run.batches) == ["cls", "gen"]
    assert all(len({p[:3] for p in b}) == 1 for b in run.batches)


def test_one_failing_request_does_not_fail_its_batch_mates() -> None:
    run = Recorder(fail_on={"r2"})
    batcher = make(run, max_batch_size=8, max_wait_ms=100)
    futures = [batcher.submit("k", f"r{i}", ONE) for i in range(6)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(5)[0])
        except ValueError as exc:
            outcomes.append(f"error: {exc}")
    batcher.stop()
    assert outcomes == ["R0", "R1", "error: poisoned: ['r2']", "R3", "R4", "R5"]
    assert len(run.batches[0]) == 6  # it was really batched before being split


def test_stop_finishes_submitted_work_and_refuses_new() -> None:
    run = Recorder()
    batcher = make(run, max_wait_ms=1_000)
    future = batcher.submit("k", "last", ONE)
    batcher.stop(timeout=5)
    assert future.result(0)[0] == "LAST"
    with pytest.raises(RuntimeError):
        batcher.submit("k", "late", ONE)


def test_members_that_fail_alone_are_run_again_alone_and_their_batch_mates_keep_their_answers() -> None:
    calls: list[list[str]] = []

    def remote(key: Hashable, payloads: list[str]) -> list[object]:
        """A remote backend: each call answers or fails on its own; 'flaky' fails the first time."""
        calls.append(list(payloads))
        first = len(calls) == 1
        return [ValueError(f"{p} failed") if p == "bad" or (p == "flaky" and first) else p.upper() for p in payloads]

    batcher = make(remote, max_wait_ms=200)  # type: ignore[arg-type]
    futures = {p: batcher.submit("k", p, ONE) for p in ("a", "flaky", "bad", "b")}
    assert futures["a"].result(5)[0] == "A" and futures["b"].result(5)[0] == "B"
    assert futures["flaky"].result(5)[0] == "FLAKY"
    with pytest.raises(ValueError, match="bad failed") as caught:
        futures["bad"].result(5)
    batcher.stop()
    assert calls[0] == ["a", "flaky", "bad", "b"] and calls[1] == ["flaky", "bad"]  # only the failed went again
    assert "at" in caught.value.history[0]  # type: ignore[attr-defined]
