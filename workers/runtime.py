"""Per-process worker state: the loaded engines and the one micro-batcher that feeds them.

Built once when the Celery worker process starts (``worker_init``), before it consumes messages,
so no task ever waits for a model load.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import torch

from shared.broker import redis_client
from shared.config import Settings
from shared.dlq import DeadLetters
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest, Priority
from shared.telemetry import tracer
from workers import metrics
from workers.batcher import BatchInfo, MicroBatcher, Shape
from workers.engine import Answer, Engine, Prepared, PreparedGenerate
from workers.cache import ResultCache
from workers.faults import Faults
from workers.ledger import Ledger
from workers.models import prepared_path
from workers.policies import BatchPolicies

log = logging.getLogger(__name__)
PRIORITY_RANK = {Priority.INTERACTIVE: 0, Priority.BULK: 1}


def shape_of(prepared: Prepared) -> Shape:
    if isinstance(prepared, PreparedGenerate):
        return Shape(rows=1, width=prepared.cost_tokens)
    return Shape(rows=prepared.rows, width=prepared.width)


class Runtime:
    def __init__(self, settings: Settings, engines: dict[str, Engine]) -> None:
        self.settings = settings
        self.engines = engines
        url = settings.redis_url or ""
        self.ledger = Ledger(url, ttl_s=settings.broker.result_expires_s)
        self.dead_letters = DeadLetters(url)
        self.cache = ResultCache(url, ttl_s=settings.broker.cache_ttl_s)
        # No retries, short timeout: a peek that fails is answered "no" and never stalls the model.
        self._peek = redis_client(url, outage_s=0, timeout_s=0.5)
        consumes_interactive = Priority.INTERACTIVE in settings.worker.queues
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=lambda key: settings.max_batch_size(key[1]),
            max_batch_tokens=settings.batching.max_batch_tokens,
            max_wait_ms=settings.batching.max_wait_ms,
            max_pending=settings.worker_concurrency,
            call_policy=BatchPolicies(settings).call,
            urgent_upstream=self._interactive_queued if consumes_interactive else None,
        ).start()
        self.faults = Faults(settings.faults)
        if self.faults:
            log.warning("FAULT INJECTION IS ON (test only): %s", settings.faults)

    def _interactive_queued(self) -> bool:
        """Whether interactive messages wait in the broker (one LLEN; the batcher asks only when
        a full bulk batch is ready the moment the model is free)."""
        return bool(self._peek.llen(self.settings.queue_name(Priority.INTERACTIVE)))

    def engine_for(self, request: GenerateRequest | ClassifyRequest) -> tuple[Engine, str | None]:
        """The engine that answers, and the requested model's name when a fallback answers instead."""
        name = request.model
        if name is None:
            candidates = [e for e in self.engines.values() if request.task_type in e.config.task_type]
            if not candidates:
                raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"no loaded model serves {request.task_type}")
            return candidates[0], None
        engine = self.engines.get(name)
        if engine is not None:
            if request.task_type not in engine.config.task_type:
                raise FleetError(ErrorCode.INVALID_INPUT, f"model {name!r} does not serve {request.task_type}")
            return engine, None
        unavailable = FleetError(
            ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is not loaded on this worker (loaded: {sorted(self.engines)})"
        )
        if self.settings.policy(ErrorCode.MODEL_UNAVAILABLE).action != "fallback":
            raise unavailable
        try:
            chain = self.settings.model(name).fallbacks
        except KeyError:
            raise unavailable from None
        for fallback in chain:
            engine = self.engines.get(fallback)
            if engine is not None and request.task_type in engine.config.task_type:
                log.info("model %s unavailable; falling back to %s", name, fallback)
                return engine, name
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {name!r} and its fallbacks {chain} are not loaded on this worker (loaded: {sorted(self.engines)})",
        )

    def _run_batch(self, key: Hashable, payloads: Sequence[Prepared]) -> list[Answer]:
        model_name, kind = key  # type: ignore[misc]
        engine = self.engines[model_name]
        input_tokens = sum(p.prompt_tokens for p in payloads)
        attributes = {"autoglm.model": model_name, "autoglm.device": str(engine.device), "autoglm.task_type": str(kind),
                      "autoglm.input_tokens": input_tokens, "autoglm.batch.size": len(payloads)}
        with tracer().start_as_current_span(f"autoglm.model.{kind}", attributes=attributes) as span, \
                metrics.BATCH_SECONDS.labels(str(kind)).time():
            if self.faults:
                self.faults.check(payloads)
            answers = engine.run(list(payloads))
            span.set_attribute("autoglm.output_tokens", sum(a.usage.completion_tokens for a in answers))
        metrics.observe_batch(str(kind), len(payloads), input_tokens, answers)
        return answers

    def infer(self, engine: Engine, prepared: Prepared) -> tuple[Answer, BatchInfo]:
        """Hand one request to the batcher and wait for its batch to finish."""
        request = prepared.request
        future = self.batcher.submit(
            (engine.name, request.task_type), prepared, shape_of(prepared), PRIORITY_RANK[request.priority]
        )
        return future.result()

    def close(self) -> None:
        self.batcher.stop(timeout=30)


_runtime: Runtime | None = None


def build_runtime(settings: Settings) -> Runtime:
    if settings.worker.torch_threads:
        torch.set_num_threads(settings.worker.torch_threads)
    names = settings.worker.models or [m.name for m in settings.models]
    engines = {}
    for name in names:
        config = settings.model(name)
        engines[name] = Engine(config, prepared_path(settings, config), device=settings.worker.device)
        metrics.MODEL_LOAD.labels(name).set(engines[name].load_seconds)
    return Runtime(settings, engines)


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, "worker runtime is not initialised (models not loaded)")
    return _runtime
