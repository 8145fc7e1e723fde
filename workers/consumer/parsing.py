"""A task message's argument -> a validated request, or INVALID_INPUT naming the bad fields.

Its own module (no Celery app, no torch) so the check every raw message meets can be exercised alone.
"""

from __future__ import annotations

from typing import Any

from shared import task_types
from shared.errors import ErrorCode, FleetError


def parse_request(args: tuple[Any, ...], kwargs: dict[str, Any], task_type: str) -> Any:
    """The one positional argument must be a request object of this task's type."""
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise FleetError(ErrorCode.INVALID_INPUT, "a task message must carry exactly one request object as its argument")
    payload = {"task_type": str(task_type), **args[0]}
    if payload["task_type"] != task_type:
        raise FleetError(ErrorCode.INVALID_INPUT, f"task_type {payload['task_type']!r} sent to the {task_type} task")
    return task_types.parse(payload)
