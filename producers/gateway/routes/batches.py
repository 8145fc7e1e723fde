"""The OpenAI Batch API over HTTP: ``/v1/files`` and ``/v1/batches``, per tenant.

What existing client code speaks (``client.files.create(..., purpose="batch")``,
``client.batches.create(...)``, ``client.batches.retrieve(id)``, ``client.files.content(id)``); the
work is the backfill's (producers/gateway/batches.py): resumable, bounded, bulk priority.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from producers.gateway.batches import Runner, Store, new_batch
from producers.gateway.deps import Controlled, State, within_rate
from producers.gateway.routes.tasks import ERRORS
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority

router = APIRouter(prefix="/v1", tags=["batches"], responses=ERRORS)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str = Field(description="/v1/chat/completions (lines are chat completion bodies) or /v1/tasks "
                          "(lines are the fleet's own task requests)")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


def _runner(request: Request) -> tuple[Store, Runner]:
    return request.app.state.batch_store, request.app.state.batch_runner


@router.post("/files")
async def upload(request: Request, state: State, who: Controlled, file: Annotated[UploadFile, File()],
                 purpose: Annotated[str, Form()]) -> dict[str, Any]:
    """The token was checked and the size bounded (``gateway.max_file_bytes``) before the upload was
    read (gateway/limits.py); the file is copied in chunks against the tenant's quota."""
    if purpose != "batch":
        raise FleetError(ErrorCode.INVALID_INPUT, f"purpose: only 'batch' files are accepted, not {purpose!r}")
    store, _ = _runner(request)
    return await asyncio.to_thread(store.add_file, who.tenant, file.filename or "input.jsonl", purpose, file.file,
                                   state.settings.gateway.file_quota_bytes)


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request, who: Controlled) -> dict[str, Any]:
    """As OpenAI's API: frees the tenant's quota. A batch already running keeps its own copy of the input."""
    return await asyncio.to_thread(_runner(request)[0].delete_file, who.tenant, file_id)


@router.get("/files")
async def list_files(request: Request, who: Controlled) -> dict[str, Any]:
    store, _ = _runner(request)
    return {"object": "list", "data": await asyncio.to_thread(store.files, who.tenant)}


@router.get("/files/{file_id}")
async def file_info(file_id: str, request: Request, who: Controlled) -> dict[str, Any]:
    return _runner(request)[0].file(who.tenant, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request, who: Controlled) -> Response:
    path = _runner(request)[0].file_path(who.tenant, file_id)
    return FileResponse(path, media_type="application/jsonl")  # streamed from disk, never whole in memory


@router.post("/batches")
async def create_batch(body: BatchCreate, request: Request, state: State, who: Controlled) -> dict[str, Any]:
    await within_rate(state, who, Priority.BULK)
    store, runner = _runner(request)
    batch = await asyncio.to_thread(new_batch, store, who.tenant, body.input_file_id, body.endpoint,
                                    body.completion_window, body.metadata)
    runner.start(who.tenant, batch["id"])
    return batch


@router.get("/batches")
async def list_batches(request: Request, who: Controlled, limit: int = 20) -> dict[str, Any]:
    batches = (await asyncio.to_thread(_runner(request)[0].batches, who.tenant))[: max(1, min(limit, 100))]
    return {"object": "list", "data": batches, "first_id": batches[0]["id"] if batches else None,
            "last_id": batches[-1]["id"] if batches else None, "has_more": False}


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request, who: Controlled) -> dict[str, Any]:
    return _runner(request)[0].batch(who.tenant, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, who: Controlled) -> dict[str, Any]:
    return await asyncio.to_thread(_runner(request)[1].cancel, who.tenant, batch_id)
