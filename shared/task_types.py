"""Task types as plugins: what a request of a kind looks like, what its answer looks like, and which
worker code prepares and runs it.

A task type is a ``TaskTypeSpec`` registered under the ``autoglm.task_types`` entry point group.
Producers need only its schemas (validation before anything is enqueued); workers import its
``handler`` ("module:attr") as well, which prepares a request in the consumer process and runs a
batch of them in the engine core (workers/handlers.py). Generation and classification are
registered the same way (pyproject.toml), so a new type takes no change to this repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from shared import plugins
from shared.errors import ErrorCode, FleetError, invalid_input
from shared.schemas import ClassifyOutput, ClassifyRequest, GenerateOutput, GenerateRequest, TaskRequestBase, TaskType

# The Celery task names of the built-in task types (a plugin's is "autoglm.task.<name>").
GENERATE_TASK = "autoglm.generate"
CLASSIFY_TASK = "autoglm.classify"


@dataclass(frozen=True)
class TaskTypeSpec:
    name: str
    request: type[TaskRequestBase]  # with a ``task_type: Literal[name]`` field
    output: type[BaseModel]
    handler: str  # "module:attr" of the worker side: prepare(request_side, request), run(batch_side, items)
    task_name: str = ""  # the Celery task's name; default "autoglm.task.<name>"

    @property
    def celery_name(self) -> str:
        return self.task_name or f"autoglm.task.{self.name}"


GENERATION = TaskTypeSpec(TaskType.TEXT_GENERATION, GenerateRequest, GenerateOutput,
                          "workers.handlers:Generation", GENERATE_TASK)
CLASSIFICATION = TaskTypeSpec(TaskType.CLASSIFICATION, ClassifyRequest, ClassifyOutput,
                              "workers.handlers:Classification", CLASSIFY_TASK)


def get(name: str) -> TaskTypeSpec:
    """The installed task type called ``name``; INVALID_INPUT naming the installed ones."""
    spec = plugins.load(plugins.TASK_TYPES, str(name))
    if not isinstance(spec, TaskTypeSpec):
        raise FleetError(ErrorCode.INTERNAL, f"entry point {name!r} of {plugins.TASK_TYPES} is not a TaskTypeSpec")
    return spec


def installed() -> list[TaskTypeSpec]:
    return [get(name) for name in plugins.names(plugins.TASK_TYPES)]


def parse(data: dict[str, Any]) -> TaskRequestBase:
    """A request dict -> its task type's validated request (INVALID_INPUT naming the bad fields)."""
    name = data.get("task_type")
    if not isinstance(name, str):
        raise FleetError(ErrorCode.INVALID_INPUT, f"task_type: required, one of {plugins.names(plugins.TASK_TYPES)}")
    spec = get(name)
    try:
        return spec.request.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc) from None
