"""The job a task's middleware share, and the hooks they may implement."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.errors import FleetError

if TYPE_CHECKING:
    from workers.consumer.runtime import Runtime


@dataclass
class Job:
    """One delivery of one task, as the middleware see it."""

    task: Any  # the bound Celery task (request, backend)
    task_type: str
    payload: Any  # the message's request object, as sent
    picked: float = field(default_factory=time.time)
    deliveries: int = 0
    request: Any = None  # GenerateRequest | ClassifyRequest, once parsed
    engine: Any = None  # the model's preparer, once chosen
    fallback_from: str | None = None
    executed: bool = False  # the model computed the answer in this delivery
    info: Any = None  # BatchInfo of the batch that answered it

    @property
    def task_id(self) -> str:
        return self.task.request.id

    @property
    def queue(self) -> str:
        return (self.task.request.delivery_info or {}).get("routing_key") or ""

    @property
    def delivery_tag(self) -> str:
        return (self.task.request.properties or {}).get("delivery_tag") or ""


class Middleware:
    def before_delivery(self, ctx: Runtime, job: Job) -> dict[str, Any] | None:
        return None

    def before_run(self, ctx: Runtime, job: Job) -> dict[str, Any] | None:
        return None

    def after_success(self, ctx: Runtime, job: Job, result: dict[str, Any]) -> None:
        return None

    def after_failure(self, ctx: Runtime, job: Job, error: FleetError, exc: BaseException) -> None:
        return None
