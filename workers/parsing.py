"""A task message's argument -> a validated request, or INVALID_INPUT naming the bad fields.

Its own module (no Celery app, no torch) so the check every raw message meets can be exercised alone.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from shared.errors import ErrorCode, FleetError, invalid_input
from shared.schemas import TaskRequest, TaskType

_request_adapter: TypeAdapter = TypeAdapter(TaskRequest)


def parse_request(args: tuple[Any, ...], kwargs: dict[str, Any], task_type: TaskType) -> Any:
    """The one positional argument must be a request object of this task's type."""
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise FleetError(ErrorCode.INVALID_INPUT, "a task message must carry exactly one request object as its argument")
    payload = {"task_type": str(task_type), **args[0]}
    if payload["task_type"] != task_type:
        raise FleetError(ErrorCode.INVALID_INPUT, f"task_type {payload['task_type']!r} sent to the {task_type} task")
    try:
        return _request_adapter.validate_python(payload)
    except ValidationError as exc:
        raise invalid_input(exc) from None
