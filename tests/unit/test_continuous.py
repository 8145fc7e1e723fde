"""Continuous batching's admission, answers, streams and cancellation (workers/core/continuous.py), on the
tiny random-weight Llama of test_engine (plumbing only: the answers are compared, not judged)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
from opentelemetry import trace

from shared.config import ContinuousConfig
from shared.errors import ErrorCode, FleetError
from tests.unit.test_engine import PROMPTS, engine, gen  # noqa: F401 - the module-scoped engine fixture
from workers.backends.transformers.batch_side import Engine
from workers.core.continuous import ContinuousGenerator

INTERACTIVE, BULK = 0, 1


class Sink:
    """The generator's stream writer here: records what it was given."""

    def __init__(self, every_step: bool = True) -> None:
        self.pieces: dict[str, list[tuple[int, str]]] = {}
        self.ends: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.usage: dict[str, Any] = {}
        self.every_step = every_step  # a piece may go every step (else only the first and the last)

    def interval_passed(self) -> bool:
        return self.every_step

    def text(self, task_id: str, offset: int, text: str) -> None:
        self.pieces.setdefault(task_id, []).append((offset, text))

    def end(self, task_id: str, finish_reason: str, usage: Any = None) -> None:
        self.ends[task_id] = finish_reason
        self.usage[task_id] = usage

    def error(self, task_id: str, code: str, message: str) -> None:
        self.errors[task_id] = code


@pytest.fixture
def sink() -> Sink:
    return Sink()


def generator(engine: Engine, sink: Sink, static: list[Any] | None = None, **config: Any) -> ContinuousGenerator:  # noqa: F811
    def fallback(prepared: Any, rank: int, span: Any, task_id: str) -> Future:
        future: Future = Future()
        (static if static is not None else []).append(task_id)
        future.set_result((engine.generate([prepared])[0], None))
        return future

    settings = ContinuousConfig(**{"max_rows": 4, "interactive_reserve": 1, "num_blocks": 8, **config})
    return ContinuousGenerator(engine, settings, most_urgent=INTERACTIVE, streams=sink, fallback=fallback)  # type: ignore[arg-type]


def drive(gen_: ContinuousGenerator, futures: list[Future], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(f.done() for f in futures):
        assert time.monotonic() < deadline, "continuous batching did not finish"
        gen_.step()
        time.sleep(0.002)


def submit(gen_: ContinuousGenerator, item: Any, task_id: str, rank: int = BULK) -> Future:
    return gen_.submit(item, rank, task_id, trace.INVALID_SPAN_CONTEXT)


def test_rows_joining_a_running_batch_get_the_answers_they_get_alone(engine: Engine, sink: Sink) -> None:  # noqa: F811
    items = [gen(engine, p, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 3, 20, 7), strict=True)]
    alone = [engine.generate([item])[0].output.text for item in items]
    g = generator(engine, sink)
    try:
        first = submit(g, items[0], "a")
        g.step()
        time.sleep(0.05)  # the first row is decoding when the others arrive
        rest = [submit(g, item, t) for item, t in zip(items[1:], "bcd", strict=True)]
        drive(g, [first, *rest])
        answers = [f.result()[0] for f in [first, *rest]]
    finally:
        g.close()
    assert [a.output.text for a in answers] == alone
    assert [a.usage.completion_tokens for a in answers] <= [12, 3, 20, 7]


def test_interactive_requests_take_reserved_rows_while_bulk_waits(engine: Engine, sink: Sink) -> None:  # noqa: F811
    g = generator(engine, sink, max_rows=2, interactive_reserve=1)
    try:
        bulk = [submit(g, gen(engine, p, max_new_tokens=30), f"bulk{i}") for i, p in enumerate(PROMPTS)]
        g.step()
        assert len(g._active) == 2  # bulk fills max_rows and no more
        assert not g.urgent  # bulk rows alone never hold the engine core's static bulk batches
        urgent = submit(g, gen(engine, "Hi", max_new_tokens=2), "urgent", INTERACTIVE)
        assert g.urgent
        g.step()
        assert "urgent" in {row.task_id for row in g._active.values()} and len(g._active) == 3
        drive(g, [urgent])
        assert not g.urgent
        assert sum(f.done() for f in bulk) < len(bulk), "the interactive row finished only after all bulk rows"
        drive(g, bulk)
    finally:
        g.close()


def stream_one(engine: Engine, sink: Sink) -> tuple[list[tuple[int, str]], Any]:  # noqa: F811
    """One streamed row to its end: (the pieces ``sink`` got, the answer)."""
    g = generator(engine, sink)
    try:
        future = submit(g, gen(engine, PROMPTS[1], max_new_tokens=16, stream=True), "s")
        drive(g, [future])
    finally:
        g.close()
    return sink.pieces["s"], future.result()[0]


def test_a_stream_carries_the_text_in_order_and_ends_with_the_finish(engine: Engine, sink: Sink) -> None:  # noqa: F811
    pieces, answer = stream_one(engine, sink)
    assert [offset for offset, _ in pieces] == [sum(len(t) for _, t in pieces[:i]) for i in range(len(pieces))]
    assert "".join(t for _, t in pieces).strip() == answer.output.text
    assert sink.ends["s"] == answer.output.finish_reason and len(pieces) > 1
    assert sink.usage["s"] == answer.usage


def test_between_two_writes_a_row_gets_no_piece_and_the_next_one_carries_its_text(engine: Engine) -> None:  # noqa: F811
    """The stream writer sends middle pieces every ``interval_ms``: between two writes the generator
    does not decode a row's text at all, and the piece at the next write (here: the end) carries
    everything since the first piece, in order."""
    pieces, answer = stream_one(engine, Sink(every_step=False))
    assert len(pieces) == 2 and pieces[1][0] == len(pieces[0][1])  # the first piece at once, then the rest
    assert "".join(t for _, t in pieces).strip() == answer.output.text


def test_a_stop_string_ends_the_row_and_never_reaches_the_stream(engine: Engine, sink: Sink) -> None:  # noqa: F811
    full = engine.generate([gen(engine, PROMPTS[2], max_new_tokens=20)])[0].output.text
    stop = full.split()[2]  # a word the greedy answer is known to contain
    g = generator(engine, sink)
    try:
        future = submit(g, gen(engine, PROMPTS[2], max_new_tokens=20, stop=[stop], stream=True), "s")
        drive(g, [future])
    finally:
        g.close()
    answer = future.result()[0]
    assert answer.output.finish_reason == "stop" and stop not in answer.output.text
    assert stop not in "".join(t for _, t in sink.pieces.get("s", []))


def test_cancelled_rows_leave_the_batch_and_fail_with_cancelled(engine: Engine, sink: Sink) -> None:  # noqa: F811
    g = generator(engine, sink, max_rows=1, interactive_reserve=0)
    try:
        running = submit(g, gen(engine, PROMPTS[1], max_new_tokens=200, stream=True), "running")
        waiting = submit(g, gen(engine, PROMPTS[0], max_new_tokens=5), "waiting")
        g.step()
        g.cancel({"running", "waiting"})
        for future in (running, waiting):
            with pytest.raises(FleetError) as cancelled:
                future.result(timeout=1)
            assert cancelled.value.code == ErrorCode.CANCELLED
        assert sink.errors["running"] == "CANCELLED" and not g.busy
        after = submit(g, gen(engine, PROMPTS[0], max_new_tokens=3), "after")  # the freed row serves the next
        drive(g, [after])
    finally:
        g.close()


def test_every_forward_pass_runs_in_the_thread_that_steps_it(engine: Engine, sink: Sink) -> None:  # noqa: F811
    # One thread running torch keeps one OpenMP pool: a second one throttled every pool's spin-wait
    # and slowed the core's classification batches by 10-50 % on a CPU (bench/RESULTS.md).
    threads_before = threading.active_count()
    callers: set[int] = set()
    probe = engine.model.register_forward_hook(lambda *_: callers.add(threading.get_ident()))
    g = generator(engine, sink)
    try:
        assert threading.active_count() == threads_before, "continuous batching started a thread of its own"
        futures = [submit(g, gen(engine, p, max_new_tokens=4), t) for p, t in zip(PROMPTS, "abcd", strict=True)]
        drive(g, futures)
    finally:
        g.close()
        probe.remove()
    assert callers == {threading.get_ident()}


def test_a_failing_step_sends_its_rows_and_later_ones_to_static_batches(engine: Engine, sink: Sink) -> None:  # noqa: F811
    static: list[str] = []
    g = generator(engine, sink, static=static)
    try:
        first = submit(g, gen(engine, PROMPTS[0], max_new_tokens=5), "first")

        def broken() -> bool:
            raise RuntimeError("paged cache corrupted")

        g._steps.processor.prepare_next_batch = broken
        g.step()
        later = submit(g, gen(engine, PROMPTS[1], max_new_tokens=5), "later")
        drive(g, [first, later])
    finally:
        g.close()
    assert static == ["first", "later"]
    assert first.result()[0].output.text == engine.generate([gen(engine, PROMPTS[0], max_new_tokens=5)])[0].output.text


def test_cuda_graphs_asked_for_on_a_cpu_are_turned_off_and_answers_stay_the_same(engine: Engine, sink: Sink) -> None:  # noqa: F811
    """A config written for a GPU (graphs on) still serves on a CPU: transformers finds no graph backend
    and decodes eagerly, with the same greedy answers."""
    items = [gen(engine, p, max_new_tokens=6) for p in PROMPTS[:2]]
    alone = [engine.generate([item])[0].output.text for item in items]
    g = generator(engine, sink, use_cuda_graph=True)
    try:
        futures = [submit(g, item, f"g{i}") for i, item in enumerate(items)]
        drive(g, futures)
        assert [f.result()[0].output.text for f in futures] == alone
    finally:
        g.close()
