"""Pre- and post-processors (the specification's "custom instruction injection" and output filters),
declared per model (``models[].processors``) or per task type (``task_processors``) in YAML and found
by entry point (``autoglm.processors``). They run in the consumer process, around the model: ``before``
rewrites a request before it is tokenized, ``after`` rewrites the output before it is stored.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from shared import plugins
from shared.config import ProcessorConfig, Settings
from shared.errors import invalid_input


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Processor:
    """Subclass, set ``Options`` (its YAML ``options``) and ``task_types`` (None: every request),
    override ``before`` and/or ``after``, and register under ``autoglm.processors``."""

    Options: ClassVar[type[BaseModel]] = NoOptions
    task_types: ClassVar[frozenset[str] | None] = None

    def __init__(self, options: Any) -> None:
        self.options = options

    def applies(self, request: Any) -> bool:
        return self.task_types is None or str(request.task_type) in self.task_types

    def before(self, request: Any) -> Any:
        return request

    def after(self, request: Any, output: Any) -> Any:
        return output

    def rewrites_output(self) -> bool:
        """Whether ``after`` changes what the model said: then the text can only be published once
        whole (a token stream would show what the processor removes)."""
        return type(self).after is not Processor.after


def build(config: ProcessorConfig) -> Processor:
    cls = plugins.load(plugins.PROCESSORS, config.name)
    try:
        return cls(cls.Options.model_validate(config.options))
    except ValidationError as exc:
        raise invalid_input(exc) from None


class Chain:
    """A model's processors: its own (``models[].processors``), then its task types' (``task_processors``)."""

    def __init__(self, settings: Settings, model: str) -> None:
        own = settings.model(model).processors
        self.by_type = {task: [build(p) for p in own] + [build(p) for p in settings.task_processors.get(task, [])]
                        for task in settings.model(model).task_type}

    def before(self, request: Any) -> Any:
        for processor in self.by_type.get(str(request.task_type), []):
            if processor.applies(request):
                request = processor.before(request)
        return request

    def can_stream(self, request: Any) -> bool:
        """False when a processor rewrites this request's output: its stream then carries the processed
        text once, at the end, never the raw tokens (a ``redact`` would be bypassed)."""
        return not any(p.applies(request) and p.rewrites_output() for p in self.by_type.get(str(request.task_type), []))

    def after(self, request: Any, output: Any) -> Any:
        for processor in reversed(self.by_type.get(str(request.task_type), [])):
            if processor.applies(request):
                output = processor.after(request, output)
        return output
