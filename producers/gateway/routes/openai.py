"""OpenAI-compatible chat completions: one interactive task, awaited or streamed.

Field policy (as OpenAI's API does for its typed fields): unknown fields are refused with
INVALID_INPUT naming them. Known OpenAI fields the fleet cannot honour are accepted only at the
value that changes nothing (``n: 1``, zero penalties) and refused otherwise.

``stream: true`` answers with server-sent events in OpenAI's chunk format (``chat.completion.chunk``
... ``data: [DONE]``), read from the task's token stream (shared/streams.py) as the worker writes
it. A client that disconnects cancels its task: the worker drops the row from its running batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.gateway.deps import Controlled, State, User, check_model, remember_owner, visible_models, within_rate
from producers.gateway.routes.tasks import ERRORS
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority, TaskResult

router = APIRouter(prefix="/v1", tags=["openai"], responses={**ERRORS, 504: ERRORS[503]})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32_000)
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The subset of OpenAI's chat completions request the fleet serves."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(default=64, ge=1, le=2048)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None

    @model_validator(mode="after")
    def _one_length(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList)
async def models(state: State, who: Controlled) -> ModelList:
    """The models this tenant may use (``gateway.tenant_models``), in OpenAI's list format (many
    OpenAI clients call this first); ``owned_by`` names the backend that answers for it."""
    started = int(state.started_at)
    visible = visible_models(state.settings, who.tenant, who.role)
    return ModelList(data=[ModelCard(id=m.name, created=started, owned_by=f"autoglm/{m.backend}")
                           for m in state.settings.models if m.name in visible])


@router.get("/models/{model_id}", response_model=ModelCard)
async def model(model_id: str, state: State, who: Controlled) -> ModelCard:
    """One model of ``GET /v1/models`` (OpenAI's ``models.retrieve``); NOT_FOUND for a model this
    tenant may not see, as for one that does not exist."""
    if model_id not in visible_models(state.settings, who.tenant, who.role):
        raise FleetError(ErrorCode.NOT_FOUND, f"no model {model_id!r} for tenant {who.tenant}; GET /v1/models lists them")
    found = state.settings.model(model_id)
    return ModelCard(id=found.name, created=int(state.started_at), owned_by=f"autoglm/{found.backend}")


def task_request(body: ChatCompletionRequest, tenant: str, priority: str = "interactive") -> dict[str, Any]:
    """A chat completions request as the fleet's generation request, on behalf of ``tenant``."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return {"task_type": "text_generation", "messages": [m.model_dump(exclude={"name"}) for m in body.messages],
            "model": body.model, "max_new_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "stop": stop, "priority": priority, "stream": body.stream, "tenant": tenant}


def batch_line_request(body: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A Batch API line's body (validated as here; raises pydantic's ValidationError) as a bulk request."""
    parsed = ChatCompletionRequest.model_validate(body)
    if parsed.stream:
        raise FleetError(ErrorCode.INVALID_INPUT, "stream: a batch line cannot stream; drop 'stream'")
    return task_request(parsed, tenant, priority="bulk")


def completion(task_id: str, result: TaskResult) -> dict[str, Any]:
    """A finished generation as OpenAI's ``chat.completion`` object."""
    output = result.output
    return {
        "id": f"chatcmpl-{task_id}", "object": "chat.completion", "created": int(time.time()), "model": result.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},  # type: ignore[union-attr]
                     "finish_reason": output.finish_reason}],  # type: ignore[union-attr]
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
                  "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens},
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, state: State, who: User) -> dict[str, Any] | StreamingResponse:
    """Awaited up to gateway.max_wait_s, then DEADLINE_EXCEEDED (504) and the task is cancelled; a
    stream is cut when no text has come for gateway.max_wait_s, however long it runs in all."""
    await within_rate(state, who, Priority.INTERACTIVE)
    check_model(state.settings, who.tenant, body.model, "text_generation", who.role)
    handle = await state.fleet.submit(task_request(body, who.tenant))
    await remember_owner(state, handle.id, who)
    wait_s = state.settings.gateway.max_wait_s
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_events(state, handle, body.model or state.settings.model_for("text_generation", None),
                                         wait_s, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = await handle.result(timeout=wait_s)
    except TimeoutError:
        await state.fleet.cancel(handle.id)
        raise FleetError(ErrorCode.DEADLINE_EXCEEDED, f"no answer within {wait_s}s; task {handle.id} cancelled") from None
    return completion(handle.id, result)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(state: Any, handle: Any, model: str, wait_s: float, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body. Runs until the end event, an error, or the client going away: Starlette then
    cancels this generator, and ``finally`` cancels the task so its row stops generating."""
    created, finished = int(time.time()), False

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _sse({"id": f"chatcmpl-{handle.id}", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in handle.stream(idle_timeout=wait_s):  # cut only when text stops coming
            yield chunk({"content": piece})
        finish, tokens = handle.finish_reason, handle.usage  # the stream's end says it: no wait for the result
        if tokens is None:  # the answer came whole (no stream), or from a worker whose end entry has no usage
            result = await handle.result(timeout=10)
            finish, tokens = result.output.finish_reason, result.usage
        yield chunk({}, finish)
        if include_usage:
            usage = {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
                     "total_tokens": tokens.prompt_tokens + tokens.completion_tokens}
            yield _sse({"id": f"chatcmpl-{handle.id}", "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": usage})
        finished = True
    except (FleetError, TimeoutError) as exc:
        error = exc if isinstance(exc, FleetError) else FleetError(ErrorCode.DEADLINE_EXCEEDED, str(exc))
        yield _sse({"error": {"code": str(error.code), "message": error.message, "retryable": error.retryable}})
        finished = not isinstance(exc, TimeoutError)
    finally:
        if not finished:  # the client left (or the wait ran out): stop generating for nobody
            task = asyncio.ensure_future(state.fleet.cancel(handle.id))
            _CANCELLING.add(task)
            task.add_done_callback(_CANCELLING.discard)
    yield "data: [DONE]\n\n"


_CANCELLING: set[asyncio.Future] = set()  # cancels in flight (a task nobody references may be collected)
