"""Task schemas: what a producer puts on the queue and what a worker stores as the result.

Both sides validate with the same models, so a request the producer accepts is one the worker can
parse; requests that bypass the producer (raw messages) are validated again by the worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared import templates

MAX_TEXT_CHARS = 32_000
MAX_LABELS = 32
MAX_LABEL_CHARS = 64
MAX_DESCRIPTION_CHARS = 300
MAX_EXAMPLES = 64
MAX_EXAMPLE_CHARS = 2_000
# A producer's clock may be a little ahead of the worker's, and a bulk message may wait in its queue
# for days; a timestamp outside this window is not a clock reading (``submitted_at: -1.7e308`` made
# every wait infinite, in results, webhooks and the worker's metrics for the rest of its life).
SUBMITTED_AT_PAST_S = 30 * 86_400
SUBMITTED_AT_FUTURE_S = 3_600
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
# The tenant of requests that name none (the Python client's own callers): one share of the fair bulk
# queues and of webhook delivery slots. The pattern above cannot produce it.
ANONYMOUS_TENANT = "_"


def _clock_reading(value: float) -> float:
    now = time.time()
    if not now - SUBMITTED_AT_PAST_S <= value <= now + SUBMITTED_AT_FUTURE_S:
        raise ValueError("must be an epoch time in seconds within the last 30 days (or leave it out: the "
                         "producer's clock is used)")
    return value


SubmittedAt = Annotated[float, AfterValidator(_clock_reading)]


class TaskType(StrEnum):
    TEXT_GENERATION = "text_generation"
    CLASSIFICATION = "classification"


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class _Strict(BaseModel):
    # NaN and Infinity are not numbers a request can mean (a NaN deadline compares false with
    # everything, so it never expires): refused, like any other invalid value.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class TaskRequestBase(_Strict):
    """What every request carries, whatever its task type (a task-type plugin's request subclasses
    this and adds a ``task_type: Literal["<name>"]`` field and its own inputs)."""

    model: str | None = Field(
        default=None, description="Model alias from the config; None picks the default for the task."
    )
    priority: Priority = Priority.INTERACTIVE
    submitted_at: SubmittedAt = Field(default_factory=time.time, description="Producer wall clock, epoch s: within "
                                "the last 30 days and at most an hour ahead of the reader's clock.")
    deadline: float | None = Field(
        default=None, description="Epoch seconds after which the request must not run."
    )
    callback_url: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None,
        description="POSTed the outcome (signed, retried) once the task is done (shared/webhook_urls.py).",
    )
    cache: bool = Field(
        default=False,
        description="Answer from the result cache when an identical deterministic request was answered "
        "before (generation needs temperature 0) for the same tenant; the result says cached=true.",
    )
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)] | None = Field(
        default=None,
        description="Who asked: the gateway sets it from the caller's token (a body's own value is replaced). "
        "It keys the result cache, webhook concurrency, bulk fair share and model entitlement.",
    )


    def cache_key(self, model: str) -> str | None:
        """Identity of a deterministic request on one model; None when it must not be cached."""
        if not self.cache or getattr(self, "temperature", 0.0) > 0:
            return None
        fields = self.model_dump(mode="json", exclude={"priority", "submitted_at", "deadline", "cache", "model", "callback_url"})
        digest = hashlib.sha256(json.dumps([model, fields], sort_keys=True).encode()).hexdigest()
        return f"autoglm:cache:{digest}"


class GenerateRequest(TaskRequestBase):
    """Chat-style text generation. Give ``prompt`` (one user turn) or ``messages``."""

    task_type: Literal[TaskType.TEXT_GENERATION] = TaskType.TEXT_GENERATION
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 64
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=8)] = []
    chat_template: bool = Field(
        default=True, description="Wrap the prompt in the model's chat template (instruct models)."
    )
    stream: bool = Field(
        default=False, description="Publish the text as it is generated (read it with handle.stream(), or SSE "
        "from the gateway); the result is recorded as usual."
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class LabelSpec(_Strict):
    """A label with what it means (``labels: [{"name": ..., "description": ...}]``)."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
    description: Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)] | None = None


class LabelledExample(_Strict):
    """One example of a label: the model is shown it before the text to classify."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_EXAMPLE_CHARS)]
    label: Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be blank")
        return text


def _label_objects(data: Any) -> Any:
    """``labels`` given as objects: their names stay in ``labels`` (what every backend reads) and
    their descriptions go to ``label_descriptions``."""
    if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
        return data
    if not any(isinstance(label, dict) for label in data["labels"]):
        return data
    names, descriptions = [], dict(data.get("label_descriptions") or {})
    for index, label in enumerate(data["labels"]):
        if not isinstance(label, dict):
            names.append(label)
            continue
        try:
            spec = LabelSpec.model_validate(label)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"labels[{index}].{where}: {error['msg']}") from None
        names.append(spec.name)
        if spec.description is not None:
            descriptions[spec.name] = spec.description
    return {**data, "labels": names, "label_descriptions": descriptions or None}


class ClassifyRequest(TaskRequestBase):
    """Classification: pick the most likely of ``labels`` for ``text``.

    ``labels`` are names, or objects ``{"name", "description"}`` (descriptions are shown to the model
    with the label list). ``examples`` (``[{"text", "label"}]``) or ``example_set`` (a named set of
    the model's config, ``classification_examples``) show the model labelled texts first: the
    default method only (not with ``prompt_template``).

    ``prompt_template`` must contain ``{text}``; it may contain ``{labels}`` (comma-joined); no
    other placeholders, format specs or conversions (shared/templates.py).
    """

    task_type: Literal[TaskType.CLASSIFICATION] = TaskType.CLASSIFICATION
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]], Field(min_length=2, max_length=MAX_LABELS)
    ]
    label_descriptions: dict[str, Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)]] | None = None
    examples: Annotated[list[LabelledExample], Field(min_length=1, max_length=MAX_EXAMPLES)] | None = None
    example_set: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    prompt_template: str | None = None

    _labels_as_objects = model_validator(mode="before")(_label_objects)

    @model_validator(mode="after")
    def _examples_name_the_labels(self) -> ClassifyRequest:
        for name in self.label_descriptions or {}:
            if name not in self.labels:
                raise ValueError(f"label_descriptions: {name!r} is not one of the labels")
        for index, example in enumerate(self.examples or []):
            if example.label not in self.labels:
                raise ValueError(f"examples[{index}].label: {example.label!r} is not one of the labels {self.labels}")
        if self.examples and self.example_set:
            raise ValueError("give examples or example_set, not both")
        if self.prompt_template is not None and (self.examples or self.example_set or self.label_descriptions):
            raise ValueError("examples, example_set and label descriptions work with the default method: drop "
                             "prompt_template, or write them into it")
        return self

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(not label.strip() for label in labels):
            raise ValueError("labels must not be blank")
        return labels

    @field_validator("prompt_template")
    @classmethod
    def _template_is_safe(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                templates.check(template)
            except templates.TemplateError as exc:
                raise ValueError(f"prompt_template {exc}") from None
        return template


TaskRequest = Annotated[GenerateRequest | ClassifyRequest, Field(discriminator="task_type")]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(BaseModel):
    """Where the request's time went, in milliseconds (wall clocks of producer and worker)."""

    queue_wait_ms: float = 0.0  # producer submit -> worker picked the message
    batch_wait_ms: float = 0.0  # handed to the batcher -> its batch started
    inference_ms: float = 0.0  # the batch's model time (shared by all members)
    total_ms: float = 0.0  # producer submit -> result ready


class GenerateOutput(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]


class ClassifyOutput(BaseModel):
    label: str
    scores: dict[str, float]  # probability per label, sums to 1


class TaskResult(BaseModel):
    """What a worker stores for a successful request (a plugin task type's output is its own
    model's JSON: validate it with ``shared.task_types.get(task_type).output``)."""

    task_type: str
    model: str
    output: GenerateOutput | ClassifyOutput | dict[str, Any]
    usage: Usage
    timings: Timings
    batch_size: int
    worker: str = ""
    fallback_from: str | None = Field(default=None, description="The requested model, when a fallback answered.")
    cached: bool = Field(default=False, description="Answered from the result cache, not by the model.")

    @classmethod
    def parse(cls, data: dict[str, Any]) -> TaskResult:
        return cls.model_validate(data)
