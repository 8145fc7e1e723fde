"""Continuous batching for generation: rows join the running batch at a decoding step and leave
the step they finish.

Why: a static batch ends when its longest row ends, and a request that arrives meanwhile waits
for all of it; with lengths of 8-256 tokens most of a static batch's rows sit finished while the
longest one decodes. The backend's scheduler runs every step (transformers: its
``ContinuousBatchingManager``, paged KV cache and chunked prefill, driven by
workers/backends/transformers/steps.py; llama_cpp: ``Slots``, llama.cpp sequences in one decode);
this module is the engine core's admission control around it, and runs its steps in the engine
core's own loop, one thread for every forward pass:

- **priority**: requests wait here, most urgent first; bulk may fill ``max_rows`` rows, and
  ``interactive_reserve`` more rows are kept for interactive requests, so an interactive request
  joins at the next step however much bulk is running;
- **answers** in the engine's own format (stop tokens and stop strings applied as in the static
  path), streamed token by token when the request asks (workers/core/stream_writer.py);
- **cancellation**: a row whose producer cancelled it leaves the batch at once;
- **nothing lost**: a row the manager fails (or a manager that stopped) goes to the static
  micro-batcher (``fallback``), which applies the retry/split policies as for any batch.

Greedy requests only on transformers: its manager samples or not for all its rows, so sampled
requests keep the static path there (workers/backends/transformers/sampling.py has their per-row
controls); a backend whose scheduler samples per row (``samples_per_row``) takes them too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from shared.config import ContinuousConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import GenerateOutput, Usage
from shared.telemetry import tracer
from workers.core.stream_writer import StreamWriter
from workers.wire import Answer, BatchInfo, PreparedGenerate

log = logging.getLogger(__name__)
Fallback = Callable[[PreparedGenerate, int, trace.SpanContext, str], Future]  # prepared, rank, span, task id


@dataclass
class _Row:
    prepared: PreparedGenerate
    rank: int
    task_id: str
    span_context: trace.SpanContext
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token: float = 0.0
    rows_at_admission: int = 0
    sent: int = 0  # characters of text already streamed
    spans: tuple[Any, Any] | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.prepared.request.stream)

    @property
    def needs_steps(self) -> bool:
        """Whether the manager must report this row every step (it streams, or a stop string may end it)."""
        return self.streamed or bool(self.prepared.request.stop)


def eligible(prepared: Any, engine: Any) -> bool:
    """Generation requests; sampled ones only where the backend samples per row (``samples_per_row``)."""
    return isinstance(prepared, PreparedGenerate) and (prepared.request.temperature == 0 or engine.samples_per_row)


class ContinuousGenerator:
    def __init__(self, engine: Any, config: ContinuousConfig, most_urgent: int, streams: StreamWriter | None,
                 fallback: Fallback, faults: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.most_urgent = most_urgent
        self.streams = streams
        self.fallback = fallback
        self.faults = faults
        # The backend's scheduler: the manager that keeps the rows and the stepper that runs a step
        # (transformers: its ContinuousBatchingManager; llama_cpp: its Slots, both in one).
        self.manager, self._steps = engine.continuous_batches(config)
        self._waiting: list[tuple[int, int, _Row]] = []
        self._active: dict[str, _Row] = {}
        self._order = itertools.count()
        log.info("continuous batching for %s: %d rows (+%d interactive)", engine.name, config.max_rows,
                 config.interactive_reserve)

    # -- the engine core's calls ---------------------------------------------------------------
    def submit(self, prepared: PreparedGenerate, rank: int, task_id: str, span_context: trace.SpanContext) -> Future:
        row = _Row(prepared, rank, task_id, span_context)
        heapq.heappush(self._waiting, (rank, next(self._order), row))
        return row.future

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def urgent(self) -> bool:
        """Whether interactive rows are decoding or waiting: static bulk batches then wait, since
        each would hold the model (Engine.model_lock) for a whole batch between two of their steps."""
        return any(row.rank <= self.most_urgent for row in self._active.values()) or \
            bool(self._waiting and self._waiting[0][0] <= self.most_urgent)

    def step(self) -> None:
        """Admit what fits, run one decoding step (prefill chunks included) for the running rows,
        and hand out what it produced."""
        self._admit()
        if self._active:
            try:
                self._steps.run()
            except Exception:  # the scheduler is broken (its ``failed``): its rows go to static batches
                log.exception("continuous batching for %s failed; its rows and every later one run in static "
                              "batches", self.engine.name)
                for request_id, row in list(self._active.items()):
                    del self._active[request_id]
                    self._end_spans(row, None)
                    self._to_static(row)
        while (output := self.manager.get_result(timeout=0)) is not None:
            self._on_output(output)

    def cancel(self, task_ids: set[str]) -> None:
        """Rows of these tasks leave the batch (or never join it) and fail with CANCELLED."""
        for request_id, row in list(self._active.items()):
            if row.task_id in task_ids:
                self.manager.cancel_request(request_id)
                del self._active[request_id]
                self._fail(row, FleetError(ErrorCode.CANCELLED, f"task {row.task_id} was cancelled by its producer "
                                           f"while generating (after {row.sent} characters)"))
        kept = [entry for entry in self._waiting if entry[2].task_id not in task_ids]
        for _, _, row in (entry for entry in self._waiting if entry[2].task_id in task_ids):
            self._fail(row, FleetError(ErrorCode.CANCELLED, f"task {row.task_id} was cancelled by its producer"))
        if len(kept) != len(self._waiting):
            self._waiting = kept
            heapq.heapify(self._waiting)

    def task_ids(self) -> list[str]:
        return [row.task_id for row in self._active.values()] + [entry[2].task_id for entry in self._waiting]

    def close(self) -> None:
        """Finish what was admitted and waiting (a SIGTERM drains), then stop the manager."""
        while self.busy and self._steps.failed is None:
            self.step()
        for _, _, row in self._waiting:
            self._to_static(row)
        self._waiting.clear()
        self._steps.close()

    # -- internals -----------------------------------------------------------------------------
    def _admit(self) -> None:
        limit = self.config.max_rows
        while self._waiting:
            rank, _, row = self._waiting[0]
            if len(self._active) >= limit + (self.config.interactive_reserve if rank <= self.most_urgent else 0):
                return
            heapq.heappop(self._waiting)
            if self._steps.failed is not None:
                self._to_static(row)
                continue
            if self.faults:
                try:
                    self.faults.check([row.prepared])
                except Exception:  # noqa: BLE001 - an injected fault: let the static path's policies handle it
                    self._to_static(row)
                    continue
            request_id = uuid.uuid4().hex
            row.admitted, row.rows_at_admission = time.monotonic(), len(self._active) + 1
            row.spans = self._start_spans(row)
            self._active[request_id] = row
            request = row.prepared.request
            sampling = {"temperature": request.temperature, "top_p": request.top_p} if request.temperature > 0 else {}
            self.manager.add_request(row.prepared.input_ids, request_id=request_id, max_new_tokens=request.max_new_tokens,
                                     streaming=row.needs_steps, eos_token_id=self.engine.stop_token_ids, **sampling)

    def _on_output(self, output: Any) -> None:
        row = self._active.get(output.request_id)
        if row is None:
            return  # a row already answered (a stop string) or cancelled
        if output.error is not None:
            log.warning("continuous batching failed row of task %s (%s); running it in a static batch",
                        row.task_id, output.error)
            del self._active[output.request_id]
            self._end_spans(row, None)
            self._to_static(row)
            return
        if not row.first_token and output.generated_tokens:
            row.first_token = time.monotonic()
        finished = output.is_finished()
        tokens = output.generated_tokens
        if row.needs_steps and not finished:
            stops = row.prepared.request.stop
            if not stops and row.sent and self.streams is not None and not self.streams.interval_passed():
                return  # no stop string to look for, and a piece would not go out before the next step's
            text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(stop in text for stop in stops):
                self.manager.cancel_request(output.request_id)
                finished = True
            elif row.streamed and not text.endswith("\ufffd"):  # never half a character
                # Hold back what could be the start of a stop string: it never reaches a reader.
                self._stream(row, text[: len(text) - max((len(s) - 1 for s in stops), default=0)])
        if finished:
            del self._active[output.request_id]
            ids, text, finish = self.engine.cut_row(row.prepared, list(tokens))
            if row.streamed:
                self._stream(row, text)
            self._answer(row, Answer(GenerateOutput(text=text.strip(), finish_reason=finish),
                                     Usage(prompt_tokens=row.prepared.prompt_tokens, completion_tokens=len(ids))))

    def _stream(self, row: _Row, text: str) -> None:
        """Stream offsets count in the unstripped text; the recorded answer is stripped."""
        if self.streams is not None and len(text) > row.sent:
            self.streams.text(row.task_id, row.sent, text[row.sent:])
            row.sent = len(text)

    def _answer(self, row: _Row, answer: Answer) -> None:
        now = time.monotonic()
        if row.streamed and self.streams is not None:
            self.streams.end(row.task_id, answer.output.finish_reason, answer.usage)  # type: ignore[union-attr]
        self._end_spans(row, answer)
        info = BatchInfo(size=row.rows_at_admission, batch_wait_ms=(row.admitted - row.submitted) * 1000.0,
                         inference_ms=(now - row.admitted) * 1000.0, continuous=True)
        row.future.set_result((answer, info))

    def _fail(self, row: _Row, error: FleetError) -> None:
        if row.streamed and self.streams is not None:
            self.streams.error(row.task_id, str(error.code), error.message)
        self._end_spans(row, None, error)
        row.future.set_exception(error)

    def _to_static(self, row: _Row) -> None:
        static = self.fallback(row.prepared, row.rank, row.span_context, row.task_id)
        static.add_done_callback(lambda done: _chain(done, row.future))

    # -- traces: the row's time in the running batch, and the model's work for it ---------------
    def _start_spans(self, row: _Row) -> tuple[Any, Any]:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(row.span_context))
        batch = tracer().start_span("autoglm.batch", context=parent, links=[trace.Link(row.span_context)]
                                    if row.span_context.is_valid else None,
                                    attributes={"autoglm.batch.mode": "continuous", "autoglm.batch.size": row.rows_at_admission,
                                                "autoglm.batch.key": f"('{self.engine.name}', 'text_generation')"})
        model = tracer().start_span("autoglm.model.text_generation", context=trace.set_span_in_context(batch),
                                    attributes={"autoglm.model": self.engine.name, "autoglm.device": str(self.engine.device),
                                                "autoglm.task_type": "text_generation",
                                                "autoglm.input_tokens": row.prepared.prompt_tokens})
        return batch, model

    def _end_spans(self, row: _Row, answer: Answer | None, error: FleetError | None = None) -> None:
        if row.spans is None:
            return
        batch, model = row.spans
        row.spans = None
        if answer is not None:
            model.set_attribute("autoglm.output_tokens", answer.usage.completion_tokens)
            if row.first_token:
                model.set_attribute("autoglm.time_to_first_token_ms", (row.first_token - row.admitted) * 1000.0)
        if error is not None:
            model.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        model.end()
        batch.end()


def _chain(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())
