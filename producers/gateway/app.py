"""The gateway app: lifespan (typed state), audit + trace middleware, error handlers, routers."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from opentelemetry import context as otel_context
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind

from producers import gateway as package
from producers.aio import AsyncFleetClient
from producers.client import FleetClient
from producers.gateway import errors, limits
from producers.gateway.batches import Runner, Store
from producers.gateway.deps import check_model
from producers.gateway.routes import admin, batches, health, openai, tasks
from producers.gateway.state import GatewayState
from producers.ratelimit import RateLimiter
from shared.config import Settings, load_settings
from shared.schemas import TaskResult
from shared.telemetry import tracer

audit = logging.getLogger("autoglm.audit")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet = AsyncFleetClient(settings.redis_url, settings)
        app.state.gateway = GatewayState(settings, fleet, fleet.redis, RateLimiter(fleet.redis))
        app.state.batch_store = Store(settings.gateway.files_dir or settings.cache_dir / "gateway")
        app.state.batch_runner = Runner(app.state.batch_store, fleet.sync, to_task=openai.batch_line_request,
                                        to_body=_batch_body, lease_s=settings.gateway.batch_lease_s,
                                        check_model=lambda tenant, model, task: check_model(settings, tenant, model, task),
                                        new_client=lambda: FleetClient(fleet.sync.redis_url, settings))
        app.state.batch_runner.resume_all()  # batches a stopped gateway left running go on
        yield
        app.state.batch_runner.stop()
        await fleet.close()

    app = FastAPI(title="Open-AutoGLM gateway", version="1", description=package.__doc__, lifespan=lifespan)
    errors.install(app)
    for module in (tasks, openai, batches, admin, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def _audit_and_trace(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        token = otel_context.attach(extract(dict(request.headers)))  # continue the caller's traceparent
        try:
            with tracer().start_as_current_span(f"{request.method} {request.url.path}", kind=SpanKind.SERVER):
                response = await call_next(request)
        finally:
            otel_context.detach(token)
        who = getattr(request.state, "principal", None)
        if who is not None:
            audit.info(json.dumps({"tenant": who.tenant, "role": str(who.role), "subject": who.subject,
                                   "method": request.method, "route": request.url.path, "status": response.status_code,
                                   "ms": round((time.perf_counter() - started) * 1000, 1)}))
        return response

    limits.install(app, settings.gateway)  # outermost: nothing reads a body before it
    return app


def _batch_body(endpoint: str, data: dict) -> dict:
    """A batch line's answer as its endpoint would have answered it."""
    task_id, result = data.pop("id"), TaskResult.model_validate(data)
    if endpoint == "/v1/chat/completions":
        return openai.completion(task_id, result)
    return {"id": task_id, "status": "SUCCESS", "status_url": tasks.status_url(task_id), "result": result.model_dump(mode="json")}


def serve(host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from shared.telemetry import setup_logging

    settings = load_settings()
    setup_logging(settings.worker.loglevel, settings.worker.log_format)
    uvicorn.run(create_app(settings), host=host or settings.gateway.host, port=port or settings.gateway.port,
                log_config=None)
