"""The one place a stored Celery outcome becomes what a caller sees: a TaskResult or a FleetError.

The sync handle (Celery's AsyncResult) and the asyncio client (raw backend keys) read the same
state + value pair; both decode it here, as arq's ``Job`` is the one place that decodes a result.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ErrorCode, FleetError, as_fleet_error
from shared.schemas import TaskResult

READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def decode_outcome(task_id: str, state: str, value: Any) -> TaskResult:
    """The TaskResult of a finished task; raises its FleetError (CANCELLED when revoked)."""
    if state == "SUCCESS":
        return TaskResult.parse(value)
    if state == "REVOKED":
        raise FleetError(ErrorCode.CANCELLED, f"task {task_id} was cancelled before it ran")
    raise as_fleet_error(value if isinstance(value, BaseException) else RuntimeError(f"task {task_id}: {value!r}"))
