"""FleetClient: validate a request, put it on the right queue, hand back a handle to poll.

Requests are validated with the shared schemas before anything is enqueued, so a bad request fails
in the caller's process with INVALID_INPUT instead of costing a round trip. Publishing goes by task
name: producers never import worker code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from celery import chain
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import BatchPublishError, OperationalError
from kombu.utils.uuid import uuid
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from redis.exceptions import RedisError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from producers.outcome import decode_outcome
from shared import fairqueue, streams, task_types, webhook_urls
from shared.broker import redis_client, submitted_key
from shared.config import Settings, load_settings
from shared.errors import ErrorCode, FleetError, invalid_input
from shared.pipelines import PIPELINE, STEP_TASK, PipelineRequest, check_input, step_request
from shared.queues import make_celery
from shared.registry import Registry
from shared.schemas import ANONYMOUS_TENANT, Priority, TaskRequestBase, TaskResult, TaskType, Usage
from shared.telemetry import setup_tracing, trace_headers, tracer

BROKER_ERRORS = (OperationalError, RedisError, ConnectionError)
RECHECK_S = 1.0  # TaskHandle.result reads the stored state at least this often while it waits
# Raised while publishing when Redis is gone: kombu's batch publisher wraps the failure, and
# Celery's result consumer raises RuntimeError when it cannot resubscribe for the new task id.
PUBLISH_ERRORS = (*BROKER_ERRORS, BatchPublishError, RuntimeError)
Request = TaskRequestBase  # GenerateRequest, ClassifyRequest, or a plugin task type's request


def unknown_task(task_id: str) -> FleetError:
    return FleetError(ErrorCode.NOT_FOUND, f"no task {task_id} in this fleet: it was never submitted here, or its "
                      "record expired (results are kept broker.result_expires_s)")


def _summary(request: Request) -> str:
    head = getattr(request, "text", None) or getattr(request, "prompt", None)
    head = head or (f"{len(request.messages)} messages" if getattr(request, "messages", None) else "")
    return f"[{request.task_type} {request.priority}: {head[:60]!r}]"


class TaskHandle:
    """A submitted request: poll ``status()`` or block on ``result(timeout)``."""

    def __init__(self, async_result: AsyncResult) -> None:
        self._result = async_result
        self._stream_end: streams.Event | None = None

    @property
    def finish_reason(self) -> str | None:
        """Why the answer ended (stop, length), once ``stream()`` has read its end; else None."""
        return self._stream_end.finish if self._stream_end is not None else None

    @property
    def usage(self) -> Usage | None:
        """The answer's token counts, once ``stream()`` has read its end (no round trip for the
        result, which the worker stores a moment after the end); else None."""
        return self._stream_end.usage if self._stream_end is not None else None

    @property
    def id(self) -> str:
        return self._result.id

    def status(self) -> str:
        """PENDING (queued), STARTED, SUCCESS, FAILURE, REVOKED, or UNKNOWN: this fleet never had
        the id, or its record expired (``broker.result_expires_s``). Celery alone says PENDING for
        both; the submitted marker set with every publish (shared/fairqueue.py) tells them apart."""
        state = self._result.state
        return "UNKNOWN" if state == "PENDING" and not self.known() else state

    def known(self) -> bool:
        """Whether this fleet has (or had, within the result's lifetime) a task with this id."""
        try:
            return bool(self._result.backend.client.exists(submitted_key(self.id)))
        except BROKER_ERRORS as exc:
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {self.id}'s state: {exc}") from exc

    def ready(self) -> bool:
        return self._result.ready()

    def result(self, timeout: float | None = None) -> TaskResult:
        """The TaskResult; raises FleetError with the worker's code (NOT_FOUND for an id this fleet
        does not know), or TimeoutError if not done.

        Waits on Celery's pub/sub and reads the stored state again once the subscription is
        live: Celery SUBSCRIBEs when ``get`` starts (not at publish: see ``_publish``), then
        reads the state on another connection, and Redis may run that read, then the worker's
        store and PUBLISH, then the SUBSCRIBE (MONITOR showed that order): the answer is
        published to nobody. A stream's reader asks for the result the moment the stream ends,
        which is when the worker records it, so this hit about 1 in 50 streamed requests, each
        then waiting a whole pub/sub wait (Celery's is 1 s, whatever ``get``'s timeout).
        ``_read_again`` closes it (in the first slice: later ones reuse the subscription); the
        slices of ``RECHECK_S`` (the state read at each) stay as the last resort."""
        deadline = None if timeout is None else time.monotonic() + timeout
        looked_up = False
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    value = self._result.get(timeout=RECHECK_S if left is None else max(0.01, min(RECHECK_S, left)),
                                             propagate=False, on_interval=None if looked_up else self._read_again)
                    break
                except CeleryTimeoutError:  # the next get reads the stored state again first
                    if not looked_up:  # not done at once: is there such a task at all? (once per wait)
                        looked_up = True
                        if self._result.state == "PENDING" and not self.known():
                            self._result.backend.remove_pending_result(self._result)
                            raise unknown_task(self.id) from None
                    if left is not None and left <= RECHECK_S:
                        # stop listening now: a later result() subscribes again, and a subscription left
                        # to the object's __del__ runs at interpreter exit, when redis-py cannot unsubscribe
                        self._result.backend.remove_pending_result(self._result)
                        raise TimeoutError(f"task {self.id} not finished after {timeout}s (status {self.status()})") from None
        except BROKER_ERRORS as exc:
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {self.id}'s result: {exc}") from exc
        return decode_outcome(self.id, self._result.state, value)

    def _read_again(self) -> None:
        """``get``'s ``on_interval``: Celery calls it once per ``get``, after its first wait on
        the pub/sub connection, which ends when a reply arrives there - with one waiter, the
        SUBSCRIBE's own: Redis has run it, so a state stored before it is read here and one
        stored after it is published to this caller. (Celery's own read at the start of a wait,
        its ResultConsumer.on_wait_for_pending.)"""
        self._result.backend.result_consumer.on_wait_for_pending(self._result)

    def callback(self) -> dict[str, str] | None:
        """The completion webhook's delivery (status pending/retrying/delivered/failed/refused,
        attempts, last_status, last_error), or None when the request had no callback_url."""
        client = self._result.backend.client
        raw = client.hgetall(webhook_urls.OUTCOME_KEY.format(task_id=self.id))
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()} or None

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """The answer's text, piece by piece, as the worker generates it (submit with ``stream=True``;
        other requests yield their whole text once done). Raises the task's FleetError when it
        fails, TimeoutError after ``timeout`` seconds without the end."""
        client = self._result.backend.client
        reader = streams.Reader(self.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                records = client.xread({reader.key: reader.last}, block=500, count=256)
            except BROKER_ERRORS as exc:
                raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot read task {self.id}'s stream: {exc}") from exc
            yield from reader.feed(records)
            if reader.done:
                self._stream_end = reader.end
                return
            if not records and self.ready():
                # Done without (the rest of) a stream: failed before generating, or not streamed.
                if rest := reader.rest(getattr(self.result(timeout=5).output, "text", "")):
                    yield rest
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} did not finish streaming within {timeout}s (status {self.status()})")

    def cancel(self) -> None:
        """Revoke: a worker that has not started the task skips it; its result becomes CANCELLED. A
        generation already running leaves its batch within ``streams.cancel_poll_ms`` and ends
        CANCELLED too."""
        self._result.revoke()
        self._result.backend.client.set(streams.cancel_key(self.id), 1, ex=streams.CANCEL_TTL_S)

    def __repr__(self) -> str:
        return f"TaskHandle({self.id})"


class FleetClient:
    """Sync client for web backends and scripts.

    >>> client = FleetClient()                       # REDIS_URL / config decide the broker
    >>> handle = client.submit_generate("What is deep learning?", priority="interactive")
    >>> handle.result(timeout=30).output.text
    """

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        url = redis_url or self.settings.redis_url
        if not url:
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, "no broker configured: set REDIS_URL or redis_url in the config")
        self.redis_url = url
        self.app = make_celery(self.settings, url, name="autoglm-producer")
        # One quick connection retry inside kombu per publish attempt; the attempts and the overall
        # budget are ours (below), so a caller hears BROKER_UNAVAILABLE within broker.publish_budget_s.
        self.app.conf.broker_transport_options = {
            **self.app.conf.broker_transport_options,
            "max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.2,
        }
        self.app.conf.result_backend_max_retries = 1
        setup_tracing("autoglm-producer")
        self._models = {m.name: m for m in self.settings.models}
        self.registry = Registry(redis_client(url, outage_s=0, timeout_s=0.5, master_name=self.settings.broker.master_name),
                                 self.settings)

    # -- building requests ---------------------------------------------------------------------
    def _check(self, request: Request, resolve_callback: bool = True) -> Request:
        if request.model is not None and request.model not in self._models:
            # Not configured at all: the caller's mistake (422), unlike MODEL_UNAVAILABLE (503),
            # which is a configured model that no worker has loaded right now.
            raise FleetError(
                ErrorCode.INVALID_INPUT, f"model: unknown model {request.model!r}; configured: {sorted(self._models)}"
            )
        serving = [name for name, m in self._models.items() if request.task_type in m.task_type]
        if request.model is None and not serving:
            raise FleetError(ErrorCode.INVALID_INPUT, f"task_type: no configured model serves {request.task_type}")
        if request.model is not None and request.model not in serving:
            raise FleetError(ErrorCode.INVALID_INPUT, f"model: {request.model!r} does not serve {request.task_type}; "
                             f"models that do: {serving}")
        if request.callback_url is not None and resolve_callback:  # SSRF guard: public addresses only, unless allowed
            hooks = self.settings.webhooks
            webhook_urls.resolve(request.callback_url, hooks.allowed_hosts, hooks.dns_timeout_s)
        return request

    def build(self, data: Request | dict[str, Any], resolve_callback: bool = True) -> Request:
        """A validated request of any installed task type (shared/task_types.py). ``resolve_callback``
        False: the caller has already checked the callback URL (the asyncio client does, off its loop)."""
        if isinstance(data, TaskRequestBase):
            return self._check(data, resolve_callback)
        if not isinstance(data, dict):
            raise FleetError(ErrorCode.INVALID_INPUT, f"a request is an object, not {type(data).__name__}")
        return self._check(task_types.parse(data), resolve_callback)

    # -- publishing ----------------------------------------------------------------------------
    def _retrying(self) -> Retrying:
        """Publishing survives a broker blip: exponential backoff with jitter, then BROKER_UNAVAILABLE."""
        broker = self.settings.broker
        return Retrying(
            retry=retry_if_exception_type(PUBLISH_ERRORS),
            stop=stop_after_attempt(broker.publish_attempts) | stop_after_delay(broker.publish_budget_s),
            wait=wait_exponential_jitter(multiplier=0.1, max=broker.publish_backoff_max_s, jitter=0.1),
            reraise=True,
        )

    def route(self, request: Request) -> str:
        """The queue for ``request``: its model's (or the task's default model's) at its priority;
        when no worker serves that model but one serves a model in its fallback chain, that model's
        queue (shared/registry.py)."""
        return self._queue(request.task_type, request.model, request.priority, getattr(request, "tenant", None))

    def _queue(self, task_type: str, model: str | None, priority: Priority, tenant: str | None = None) -> str:
        model = self.settings.model_for(task_type, model)
        fallbacks = [name for name in self._models[model].fallbacks if self.settings.may_use(tenant, name)]
        if fallbacks:
            try:
                model = self.registry.route(model, fallbacks)
            except RedisError:
                pass  # the publish that follows retries and reports the outage
        return self.settings.queue_name(priority, model)

    def _send(self, request: Request, task_id: str, producer: Any = None, declared: bool = False,
              headers: dict[str, str] | None = None) -> TaskHandle:
        queue = self.route(request)
        extra: dict[str, Any] = {"declare": []} if declared else {}
        result = self.app.send_task(
            task_types.get(request.task_type).celery_name,
            args=[request.model_dump(mode="json", exclude={"task_type"})],
            task_id=task_id,
            queue=queue,
            routing_key=queue,
            producer=producer,
            # A short summary for monitoring (Flower); Celery's default saferepr of the whole
            # request was a third of the enqueue cost.
            argsrepr=_summary(request),
            kwargsrepr="{}",
            # The tenant's share of a bulk queue (shared/fairqueue.py) is chosen by this header.
            headers={**(headers if headers is not None else trace_headers()),
                     fairqueue.TENANT_HEADER: getattr(request, "tenant", None) or ANONYMOUS_TENANT},
            # Without it Celery SUBSCRIBEs to the task's result channel as it publishes: one Redis
            # round trip per task that kombu's batch publishing cannot pipeline (a third of
            # submit_many's time). Waiting (handle.result) subscribes by itself and reads the
            # stored state every RECHECK_S, so nothing is missed. The tasks are ignore_result anyway: the ledger
            # records answers (workers/consumer/ledger.py), failures are stored as always.
            ignore_result=True,
            **extra,
        )
        result.ignored = False  # this handle does wait for the result
        return TaskHandle(result)

    def _unavailable(self, exc: BaseException) -> FleetError:
        return FleetError(
            ErrorCode.BROKER_UNAVAILABLE,
            f"cannot publish to {self.redis_url} (tried for up to {self.settings.broker.publish_budget_s:g}s): "
            f"{type(exc).__name__}: {exc}",
        )

    def submit(self, request: Request | PipelineRequest | dict[str, Any], resolve_callback: bool = True) -> TaskHandle:
        """Validate and enqueue one request; returns once Redis has it (or raises BROKER_UNAVAILABLE).
        A pipeline (``task_type: pipeline``) is enqueued as a Celery chain of its steps."""
        if isinstance(request, PipelineRequest) or (isinstance(request, dict) and request.get("task_type") == PIPELINE):
            return self.submit_pipeline(request)
        built, task_id = self.build(request, resolve_callback), uuid()  # one id across attempts
        attributes = {"messaging.message.id": task_id, "autoglm.task_type": str(built.task_type),
                      "autoglm.priority": str(built.priority), "messaging.destination.name": self.route(built)}
        with tracer().start_as_current_span("autoglm.submit", kind=SpanKind.PRODUCER, attributes=attributes) as span:
            try:
                return self._retrying()(self._send, built, task_id)
            except PUBLISH_ERRORS as exc:
                error = self._unavailable(exc)
                span.set_attribute("autoglm.error_code", str(error.code))
                raise error from exc

    def submit_pipeline(self, request: PipelineRequest | dict[str, Any]) -> TaskHandle:
        """Run a pipeline from the config (shared/pipelines.py): one Celery chain, a step per task on
        its model's queue; the handle's result is the last step's, holding every step's output."""
        try:
            built = request if isinstance(request, PipelineRequest) else PipelineRequest.model_validate(request)
        except ValidationError as exc:
            raise invalid_input(exc) from None
        pipeline = self.settings.pipelines.get(built.pipeline)
        if pipeline is None:
            raise FleetError(ErrorCode.INVALID_INPUT, f"pipeline: unknown pipeline {built.pipeline!r}; configured: "
                             f"{sorted(self.settings.pipelines)}")
        check_input(pipeline, built)
        self.build(step_request(pipeline.steps[0], built, {}))  # the first step's request is valid now, or never
        queues = [self._queue(step.task_type, step.model or built.model, built.priority) for step in pipeline.steps]
        state = {"task_type": PIPELINE, "model": "", "usage": {}, "timings": {}, "batch_size": 0,
                 "output": {"pipeline": built.pipeline, "request": built.model_dump(mode="json"), "steps": {}}}
        attributes = {"autoglm.task_type": PIPELINE, "autoglm.pipeline": built.pipeline, "autoglm.priority": str(built.priority)}
        with tracer().start_as_current_span("autoglm.submit", kind=SpanKind.PRODUCER, attributes=attributes) as span:
            steps = chain(*(self.app.signature(STEP_TASK, args=(state,) if i == 0 else (), queue=q, routing_key=q)
                            for i, q in enumerate(queues)))

            def publish() -> TaskHandle:
                handle = TaskHandle(steps.apply_async(headers=trace_headers()))
                # The handle is the last step's, published only when the step before it ends: its
                # marker is set now, so the pipeline is known from the start (TaskHandle.status).
                handle._result.backend.client.set(submitted_key(handle.id), 1, ex=self.settings.broker.result_expires_s)
                return handle

            try:
                handle = self._retrying()(publish)
            except PUBLISH_ERRORS as exc:
                raise self._unavailable(exc) from exc
            span.set_attribute("messaging.message.id", handle.id)
            return handle

    def submit_generate(self, prompt: str | None = None, **params: Any) -> TaskHandle:
        """Enqueue a generation. ``params``: messages, max_new_tokens, temperature, top_p, stop,
        model, priority ("interactive" default), deadline (epoch s)."""
        return self.submit({"task_type": TaskType.TEXT_GENERATION, "prompt": prompt, **params})

    def submit_classify(self, text: str, labels: list[str] | list[str | dict[str, str]], **params: Any) -> TaskHandle:
        """Enqueue a classification. ``labels``: names, or ``{"name", "description"}``. ``params``: examples
        (``[{"text", "label"}]``) or example_set, prompt_template, model, priority ("bulk" default), deadline."""
        params.setdefault("priority", Priority.BULK)
        return self.submit({"task_type": TaskType.CLASSIFICATION, "text": text, "labels": labels, **params})

    def submit_many(
        self, requests: Iterable[Request | dict[str, Any]], batch_size: int = 500, task_ids: list[str] | None = None
    ) -> list[TaskHandle]:
        """Publish many requests over one connection with kombu batch publishing (pipelined writes).

        Every request is validated before the first one is sent, so a bad line does not leave a
        half-submitted batch behind.
        """
        validated = [self.build(r) for r in requests]
        ids = task_ids if task_ids is not None else [uuid() for _ in validated]
        if len(ids) != len(validated):
            raise ValueError("task_ids must match requests one to one")
        built = list(zip(validated, ids, strict=True))
        # One trace for the whole bulk submission: every message carries this span as its parent.
        span = tracer().start_span("autoglm.submit_many", kind=SpanKind.PRODUCER, attributes={"autoglm.count": len(built)})
        with trace.use_span(span, end_on_exit=True):
            headers = trace_headers()

        def publish_all() -> list[TaskHandle]:
            # A retry re-publishes every message under the same task ids: one that got through
            # the first time is delivered twice, and the worker answers it once (workers/consumer/ledger.py).
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=batch_size):
                for queue in self.app.amqp.queues.values():  # declare once, not per message
                    producer.maybe_declare(queue)
                return [self._send(request, task_id, producer=producer, declared=True, headers=headers)
                        for request, task_id in built]

        try:
            return self._retrying()(publish_all)
        except PUBLISH_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def queue_depth(self, *queues: str) -> int:
        """Messages waiting in these queues, together (producers throttle on it)."""
        with self.app.connection_for_read() as conn:
            return fairqueue.queue_depth(conn.default_channel.client, *queues)

    def handle(self, task_id: str) -> TaskHandle:
        return TaskHandle(self.app.AsyncResult(task_id))

    # -- blocking conveniences -----------------------------------------------------------------
    def generate(self, prompt: str | None = None, timeout: float | None = 120, **params: Any) -> TaskResult:
        return self.submit_generate(prompt, **params).result(timeout)

    def stream(self, prompt: str | None = None, timeout: float | None = 120, **params: Any) -> Iterator[str]:
        """``for piece in client.stream("Tell me a story"): print(piece, end="")``"""
        yield from self.submit_generate(prompt, stream=True, **params).stream(timeout)

    def classify(self, text: str, labels: list[str] | list[str | dict[str, str]], timeout: float | None = 120,
                 **params: Any) -> TaskResult:
        params.setdefault("priority", Priority.INTERACTIVE)
        return self.submit_classify(text, labels, **params).result(timeout)

    def close(self) -> None:
        self.app.close()
        self.registry.client.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
