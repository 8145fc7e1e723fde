"""OpenAI-compatible chat completions: one interactive task, awaited.

Field policy (as OpenAI's API does for its typed fields): unknown fields are refused with
INVALID_INPUT naming them. Known OpenAI fields the fleet cannot honour are accepted only at the
value that changes nothing (``n: 1``, ``stream: false``, zero penalties) and refused otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.gateway.deps import State, User, remember_owner, within_rate
from producers.gateway.routes.tasks import ERRORS
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority

router = APIRouter(prefix="/v1", tags=["openai"], responses={**ERRORS, 504: ERRORS[503]})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32_000)
    name: str | None = None


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
    stream: Literal[False] = False
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
async def models(state: State, who: User) -> ModelList:
    """The configured models, in OpenAI's list format (many OpenAI clients call this first). Every
    tenant sees every configured model; ``owned_by`` names the backend that answers for it."""
    started = int(state.started_at)
    return ModelList(data=[ModelCard(id=m.name, created=started, owned_by=f"autoglm/{m.backend}") for m in state.settings.models])


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: State, who: User) -> dict[str, Any]:
    """Awaited up to gateway.max_wait_s, then DEADLINE_EXCEEDED (504) and the task is cancelled."""
    await within_rate(state, who, Priority.INTERACTIVE)
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    handle = await state.fleet.submit({
        "task_type": "text_generation", "messages": [m.model_dump(exclude={"name"}) for m in body.messages],
        "model": body.model, "max_new_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "stop": stop, "priority": "interactive",
    })
    await remember_owner(state, handle.id, who)
    wait_s = state.settings.gateway.max_wait_s
    try:
        result = await handle.result(timeout=wait_s)
    except TimeoutError:
        await state.fleet.cancel(handle.id)
        raise FleetError(ErrorCode.DEADLINE_EXCEEDED, f"no answer within {wait_s}s; task {handle.id} cancelled") from None
    output = result.output
    return {
        "id": f"chatcmpl-{handle.id}", "object": "chat.completion", "created": int(time.time()), "model": result.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},  # type: ignore[union-attr]
                     "finish_reason": output.finish_reason}],  # type: ignore[union-attr]
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
                  "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens},
    }
