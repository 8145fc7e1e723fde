"""The fleet's own task API: submit, poll (long-poll), cancel."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel

from producers.gateway.deps import Controlled, State, User, check_model, owned, remember_owner, within_rate
from shared import webhook_urls
from shared.errors import ErrorCode, FleetError
from shared.schemas import TaskRequest, TaskResult


class ErrorBody(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class TaskStatus(BaseModel):
    id: str
    status: Literal["PENDING", "STARTED", "SUCCESS", "FAILURE", "CANCELLED"]
    status_url: str
    result: TaskResult | None = None
    error: ErrorBody | None = None
    callback: dict[str, str] | None = None  # the completion webhook's delivery, when callback_url was given


ERRORS = {status: {"model": ErrorEnvelope} for status in (401, 403, 404, 422, 429, 503)}
router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=ERRORS)


def status_url(task_id: str) -> str:
    return f"/v1/tasks/{task_id}"


@router.post("", status_code=202, response_model=TaskStatus)
async def submit(body: TaskRequest, response: Response, state: State, who: User) -> TaskStatus:
    await within_rate(state, who, body.priority)
    check_model(state.settings, who.tenant, body.model, str(body.task_type), who.role)
    # Who asked, and when, are the gateway's to say: a body's own tenant or submitted_at is replaced.
    handle = await state.fleet.submit(body.model_copy(update={"tenant": who.tenant, "submitted_at": time.time()}))
    await remember_owner(state, handle.id, who)
    response.headers["Location"] = status_url(handle.id)
    return TaskStatus(id=handle.id, status="PENDING", status_url=status_url(handle.id))


async def _callback(state: State, task_id: str) -> dict[str, str] | None:
    raw = await state.redis.hgetall(webhook_urls.OUTCOME_KEY.format(task_id=task_id))
    return {k.decode(): v.decode() for k, v in raw.items()} or None


@router.get("/{task_id}", response_model=TaskStatus)
async def status(task_id: str, state: State, who: Controlled,
                 wait: Annotated[float, Query(ge=0, le=300, allow_inf_nan=False,
                                              description="long-poll up to this many seconds")] = 0) -> TaskStatus:
    await owned(state, task_id, who)
    try:
        result = await state.fleet.result(task_id, timeout=min(wait, state.settings.gateway.max_wait_s))
        return TaskStatus(id=task_id, status="SUCCESS", status_url=status_url(task_id), result=result,
                          callback=await _callback(state, task_id))
    except TimeoutError:
        current = await state.fleet.status(task_id)
        return TaskStatus(id=task_id, status=current if current in ("PENDING", "STARTED") else "PENDING",
                          status_url=status_url(task_id))
    except FleetError as exc:
        if exc.code in (ErrorCode.BROKER_UNAVAILABLE, ErrorCode.NOT_FOUND):  # 503 / 404, not a task's failure
            raise
        name = "CANCELLED" if exc.code == ErrorCode.CANCELLED else "FAILURE"
        return TaskStatus(id=task_id, status=name, status_url=status_url(task_id), error=ErrorBody(**exc.to_dict()),
                          callback=await _callback(state, task_id))


@router.delete("/{task_id}", status_code=202, response_model=TaskStatus)
async def cancel(task_id: str, state: State, who: Controlled) -> TaskStatus:
    await owned(state, task_id, who)
    await state.fleet.cancel(task_id)
    return TaskStatus(id=task_id, status="CANCELLED", status_url=status_url(task_id))
