"""The built-in processors: ``instruction`` (inject a system instruction into generation requests)
and ``redact`` (replace what matches patterns in generated text)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.schemas import GenerateOutput, TaskType
from workers.consumer.processors import Processor


class InstructionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=4000, description="The system turn put before the conversation.")


class Instruction(Processor):
    """The specification's custom instruction injection: a system turn before every generation
    request's messages (a caller's own system turn stays, after it)."""

    Options: ClassVar[type[BaseModel]] = InstructionOptions
    task_types: ClassVar[frozenset[str] | None] = frozenset({TaskType.TEXT_GENERATION})

    def before(self, request: Any) -> Any:
        messages = [{"role": "system", "content": self.options.text}, *request.chat_messages()]
        return type(request).model_validate({**request.model_dump(), "prompt": None, "messages": messages})


class RedactOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patterns: list[str] = Field(min_length=1, description="Regular expressions (Python re), matched case-insensitively.")
    replacement: str = "[redacted]"

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            re.compile(pattern)
        return patterns


class Redact(Processor):
    """An output filter: what matches any pattern in generated text is replaced."""

    Options: ClassVar[type[BaseModel]] = RedactOptions
    task_types: ClassVar[frozenset[str] | None] = frozenset({TaskType.TEXT_GENERATION})

    def __init__(self, options: RedactOptions) -> None:
        super().__init__(options)
        self.pattern = re.compile("|".join(f"(?:{p})" for p in options.patterns), re.IGNORECASE)

    def after(self, request: Any, output: Any) -> Any:
        if not isinstance(output, GenerateOutput):
            return output
        return output.model_copy(update={"text": self.pattern.sub(self.options.replacement, output.text)})
