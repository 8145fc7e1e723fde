"""HTTP gateway: the fleet over REST for any language, with JWT auth, per-tenant rate limits and
an audit line per call. OpenAPI schema at /openapi.json, docs at /docs.

    POST   /v1/tasks                 submit (202 + id + status URL)
    POST   /v1/chat/completions      OpenAI-style synchronous generation (interactive)
    GET    /v1/tasks/{id}[?wait=S]   status, result or error (long-poll up to S seconds)
    DELETE /v1/tasks/{id}            cancel
    GET    /v1/admin/queues          queue depths (admin)
    GET    /v1/admin/dlq             dead-lettered requests (admin)
    GET    /healthz                  liveness + broker reachability (no auth)
"""


import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry import context as otel_context
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, Field

from producers.aio import AsyncFleetClient
from producers.auth import Principal, Role, verify
from producers.ratelimit import RateLimiter
from shared.config import Settings, load_settings
from shared.dlq import DeadLetters
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority, TaskRequest, TaskResult
from shared.telemetry import tracer

audit = logging.getLogger("autoglm.audit")
OWNER_KEY = "autoglm:owner:{}"


class ErrorBody(BaseModel):
    code: str
    message: str
    retryable: bool


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completions request the fleet serves."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(default=64, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = None


class TaskStatus(BaseModel):
    id: str
    status: Literal["PENDING", "STARTED", "SUCCESS", "FAILURE", "CANCELLED"]
    status_url: str
    result: TaskResult | None = None
    error: ErrorBody | None = None


def error_response(error: FleetError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.http_status, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    config = settings.gateway
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["fleet"] = fleet = AsyncFleetClient(settings.redis_url, settings)
        state["redis"] = fleet.redis
        state["limiter"] = RateLimiter(fleet.redis)
        yield
        await fleet.close()

    app = FastAPI(title="Open-AutoGLM gateway", version="1", description=__doc__, lifespan=lifespan)

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if getattr(exc, "retry_after", None) else None
        return error_response(exc, headers)

    def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise FleetError(ErrorCode.UNAUTHENTICATED)
        who = verify(authorization.split(" ", 1)[1].strip(), config)
        request.state.principal = who  # for the audit line
        return who

    def require(*roles: Role):  # noqa: ANN202
        def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
            if who.role not in roles:
                raise FleetError(ErrorCode.PERMISSION_DENIED, f"role {who.role} may not call this; needs {'/'.join(roles)}")
            return who
        return check

    @app.middleware("http")
    async def _audit_and_trace(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        token = otel_context.attach(extract(dict(request.headers)))  # continue the caller's traceparent
        try:
            with tracer().start_as_current_span(f"{request.method} {request.url.path}", kind=SpanKind.SERVER):
                response = await call_next(request)
        finally:
            otel_context.detach(token)
        who = request.state.principal if hasattr(request.state, "principal") else None
        if who is not None:
            audit.info(json.dumps({"tenant": who.tenant, "role": str(who.role), "subject": who.subject,
                                   "method": request.method, "route": request.url.path, "status": response.status_code,
                                   "ms": round((time.perf_counter() - started) * 1000, 1)}))
        return response

    async def _owned(task_id: str, who: Principal) -> None:
        owner = await state["redis"].get(OWNER_KEY.format(task_id))
        if owner is None or (who.role != Role.ADMIN and owner.decode() != who.tenant):
            raise FleetError(ErrorCode.NOT_FOUND, f"no task {task_id} for tenant {who.tenant}")

    async def _within_rate(who: Principal, priority: Priority) -> None:
        """Take one token from the tenant's bucket for this priority, or RATE_LIMITED (429 + Retry-After)."""
        wait = await state["limiter"].take(who.tenant, str(priority), config.rate_limits[priority])
        if wait is not None:
            error = FleetError(ErrorCode.RATE_LIMITED, f"tenant {who.tenant} is over its {priority} rate; retry in {wait}s")
            error.retry_after = wait  # type: ignore[attr-defined]
            raise error

    def _status_url(task_id: str) -> str:
        return f"/v1/tasks/{task_id}"

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        try:
            await state["redis"].ping()
        except Exception as exc:  # noqa: BLE001
            raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"Redis: {exc}") from exc
        return {"status": "ok"}

    @app.post("/v1/tasks", status_code=202, response_model=TaskStatus,
              responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}})
    async def submit(body: TaskRequest, request: Request, response: Response,
                     who: Annotated[Principal, Depends(require(Role.USER, Role.ADMIN))]) -> TaskStatus:
        await _within_rate(who, body.priority)
        handle = await state["fleet"].submit(body)
        await state["redis"].set(OWNER_KEY.format(handle.id), who.tenant, ex=settings.broker.result_expires_s)
        response.headers["Location"] = _status_url(handle.id)
        return TaskStatus(id=handle.id, status="PENDING", status_url=_status_url(handle.id))

    @app.get("/v1/tasks/{task_id}", response_model=TaskStatus, responses={404: {"model": ErrorBody}})
    async def status(task_id: str, request: Request, who: Annotated[Principal, Depends(require(Role.USER, Role.ADMIN))],
                     wait: Annotated[float, Query(ge=0, le=300, description="long-poll up to this many seconds")] = 0) -> TaskStatus:
        await _owned(task_id, who)
        fleet: AsyncFleetClient = state["fleet"]
        try:
            result = await fleet.result(task_id, timeout=min(wait, config.max_wait_s))
            return TaskStatus(id=task_id, status="SUCCESS", status_url=_status_url(task_id), result=result)
        except TimeoutError:
            current = await fleet.status(task_id)
            return TaskStatus(id=task_id, status=current if current in ("PENDING", "STARTED") else "PENDING",
                              status_url=_status_url(task_id))
        except FleetError as exc:
            state_name = "CANCELLED" if exc.code == ErrorCode.CANCELLED else "FAILURE"
            return TaskStatus(id=task_id, status=state_name, status_url=_status_url(task_id), error=ErrorBody(**exc.to_dict()))

    @app.delete("/v1/tasks/{task_id}", status_code=202, response_model=TaskStatus, responses={404: {"model": ErrorBody}})
    async def cancel(task_id: str, request: Request, who: Annotated[Principal, Depends(require(Role.USER, Role.ADMIN))]) -> TaskStatus:
        await _owned(task_id, who)
        await state["fleet"].cancel(task_id)
        return TaskStatus(id=task_id, status="CANCELLED", status_url=_status_url(task_id))

    @app.post("/v1/chat/completions", responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody},
                                                 429: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def chat_completions(body: ChatCompletionRequest,
                               who: Annotated[Principal, Depends(require(Role.USER, Role.ADMIN))]) -> dict[str, Any]:
        """OpenAI-style synchronous convenience for interactive use: one queued interactive task,
        awaited up to gateway.max_wait_s (then DEADLINE_EXCEEDED; the task is cancelled)."""
        await _within_rate(who, Priority.INTERACTIVE)
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        fleet: AsyncFleetClient = state["fleet"]
        handle = await fleet.submit({
            "task_type": "text_generation", "messages": [m.model_dump() for m in body.messages], "model": body.model,
            "max_new_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p, "stop": stop,
            "priority": "interactive",
        })
        await state["redis"].set(OWNER_KEY.format(handle.id), who.tenant, ex=settings.broker.result_expires_s)
        try:
            result = await handle.result(timeout=config.max_wait_s)
        except TimeoutError:
            await fleet.cancel(handle.id)
            raise FleetError(ErrorCode.DEADLINE_EXCEEDED, f"no answer within {config.max_wait_s}s; task {handle.id} cancelled") from None
        return {
            "id": f"chatcmpl-{handle.id}", "object": "chat.completion", "created": int(time.time()), "model": result.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.output.text},  # type: ignore[union-attr]
                         "finish_reason": result.output.finish_reason}],  # type: ignore[union-attr]
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
                      "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens},
        }

    @app.get("/v1/admin/queues")
    async def queues(request: Request, who: Annotated[Principal, Depends(require(Role.ADMIN))]) -> dict[str, int]:
        return {q.name: int(await state["redis"].llen(q.name)) for q in settings.queues.values()}

    @app.get("/v1/admin/dlq")
    async def dlq(request: Request, who: Annotated[Principal, Depends(require(Role.ADMIN))],
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        letters = DeadLetters(settings.redis_url or "")
        try:
            return letters.list(limit)
        finally:
            letters.close()

    return app


def serve(host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from shared.telemetry import setup_logging

    settings = load_settings()
    setup_logging(settings.worker.loglevel, settings.worker.log_format)
    uvicorn.run(create_app(settings), host=host or settings.gateway.host, port=port or settings.gateway.port,
                log_config=None)
