"""A consumer process's worker context: what its tasks need, built once from settings.

Built when the Celery worker process starts (``worker_init``), before it consumes messages: the
request side of every model (tokenizer, templates, limits), the engine core it feeds (started here,
models loaded before the first message), and the Redis-backed ledger, dead-letter queue and cache.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.config import Settings
from shared.dlq import DeadLetters
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest
from shared.telemetry import trace_headers
from workers import backends
from workers.consumer import metrics, processors
from workers.consumer.core_client import EngineClient
from workers.consumer.ledger import Ledger
from workers.consumer.middleware import default_chain
from workers.consumer.middleware.cache import ResultCache
from workers.lifecycle import EngineCoreProcess, child_env
from workers.prompts import too_costly
from workers.wire import Answer, BatchInfo, Prepared

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, preparers: dict[str, Any], engine: EngineClient) -> None:
        self.settings = settings
        self.preparers = preparers
        self.engine = engine
        url = settings.redis_url or ""
        master = settings.broker.master_name
        self.ledger = Ledger(url, ttl_s=settings.broker.result_expires_s, master_name=master,
                             min_replicas_acked=settings.broker.min_replicas_acked,
                             replica_ack_timeout_s=settings.broker.replica_ack_timeout_s)
        self.dead_letters = DeadLetters(url, master_name=master)
        self.cache = ResultCache(url, ttl_s=settings.broker.cache_ttl_s, master_name=master)
        self.middleware = default_chain()
        self.processors = {name: processors.Chain(settings, name) for name in preparers}

    def engine_for(self, request: GenerateRequest | ClassifyRequest) -> tuple[Any, str | None]:
        """The model that answers, and the requested model's name when a fallback answers instead."""
        name = request.model
        if name is None:
            tenant = getattr(request, "tenant", None)
            candidates = [p for p in self.preparers.values()
                          if request.task_type in p.config.task_type and self.settings.may_use(tenant, p.name)]
            if not candidates:
                raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"no loaded model serves {request.task_type}")
            return candidates[0], None
        preparer = self.preparers.get(name)
        if preparer is not None:
            if request.task_type not in preparer.config.task_type:
                raise FleetError(ErrorCode.INVALID_INPUT, f"model {name!r} does not serve {request.task_type}")
            return preparer, None
        unavailable = FleetError(
            ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is not loaded on this worker (loaded: {sorted(self.preparers)})"
        )
        if self.settings.policy(ErrorCode.MODEL_UNAVAILABLE).action != "fallback" or name not in self.settings.model_names:
            raise unavailable
        preparer = self.fallback_for(name, request)
        if preparer is None:
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} and the fallbacks this request may use "
                             "are not loaded on this worker")
        return preparer, name

    def fallback_for(self, name: str, request: Any) -> Any:
        """The first model of ``name``'s fallback chain loaded here that serves the request's task
        (None: none is, or the MODEL_UNAVAILABLE policy is not ``fallback``)."""
        if self.settings.policy(ErrorCode.MODEL_UNAVAILABLE).action != "fallback":
            return None
        tenant = getattr(request, "tenant", None)
        for fallback in self.settings.model(name).fallbacks:
            if not self.settings.may_use(tenant, fallback):
                continue  # entitlement holds for the model that answers, not only the one asked for
            preparer = self.preparers.get(fallback)
            if preparer is not None and request.task_type in preparer.config.task_type:
                log.info("model %s unavailable; falling back to %s", name, fallback)
                return preparer
        return None

    def infer(self, preparer: Any, prepared: Prepared, task_id: str = "") -> tuple[Answer, BatchInfo]:
        """Send one request to the engine core and wait for its batch, at its queue class's rank
        (config ``queues.<name>.rank``: lower is served first)."""
        request = prepared.request
        limit = self.settings.max_request_tokens
        if prepared.cost_tokens > limit:  # refused here: it would hold the model for every other request
            raise FleetError(ErrorCode.PROMPT_TOO_LONG, too_costly(prepared, limit))
        rank = self.settings.queue_class(request.priority).rank
        answer, info = self.engine.infer(preparer.name, prepared, rank, trace_headers().get("traceparent", ""), task_id)
        kind = str(request.task_type)
        if info.continuous:  # a generation row of the running batch: no batch of its own to count
            metrics.CONTINUOUS_ROWS.labels(kind).observe(info.size)
        elif info.leader:  # batch-level figures once per batch, by whichever consumer got its first member
            metrics.BATCH_SIZE.labels(kind).observe(info.size)
            metrics.BATCH_SECONDS.labels(kind).observe(info.inference_ms / 1000.0)
        metrics.TOKENS.labels("input").inc(prepared.prompt_tokens)
        metrics.TOKENS.labels("output").inc(answer.usage.completion_tokens)
        return answer, info

    def close(self) -> None:
        self.engine.close()


def build_runtime(settings: Settings, core: EngineCoreProcess | None = None) -> Runtime:
    """``core``: the engine core this process started before its own imports (workers/main.py);
    None: start one here (or attach to ``worker.engine_address``)."""
    names = settings.served_models()
    preparers = {name: backends.request_side(settings, settings.model(name)) for name in names}
    if core is None and not settings.worker.engine_address:
        core = EngineCoreProcess(child_env(settings))
    engine = EngineClient(settings.worker.engine_address, core=core)
    for name, info in engine.models.items():
        metrics.MODEL_LOAD.labels(name).set(info["load_seconds"])
    return Runtime(settings, preparers, engine)
