"""Pipelines: named chains of task types declared in YAML (the specification's "declarative config to
build task pipelines"), run with Celery's own canvas (a ``chain``).

    pipelines:
      triage:
        steps:
          - name: sentiment
            task_type: classification
            request: {text: "{input.review}", labels: [positive, negative]}
          - name: reply
            task_type: text_generation
            request: {prompt: "Reply to this review: {input.review}", max_new_tokens: 48}
            by_label:                      # an earlier step's label picks request overrides
              step: sentiment
              requests:
                negative: {prompt: "Apologise to the customer for this: {input.review}"}

A pipeline is submitted like a task: ``{"task_type": "pipeline", "pipeline": "triage", "input":
{"review": ...}}``. Each step is a Celery task on its model's queue; each passes the growing result
to the next, and the last one's result holds every step's output. String values in a step's request
are templates: ``{input.<field>}`` is the input's field, ``{<step>.label}`` / ``{<step>.text}`` an
earlier step's output; other braces (a classification template's ``{text}``) are left alone. A failing step fails the pipeline with its own code and the step's name.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority, SubmittedAt

PIPELINE = "pipeline"
STEP_TASK = "autoglm.pipeline.step"
# {input.<field>}: a field of the pipeline's input; {<step>.label} / {<step>.text}: an earlier step's
# output. Anything else in braces ({text} of a classification template...) is left as it is.
PLACEHOLDER = re.compile(r"\{(input\.[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*\.(?:label|text))\}")
MAX_RENDERED_CHARS = 32_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ByLabel(_Strict):
    step: str = Field(description="An earlier step whose output has a label (a classification).")
    requests: dict[str, dict[str, Any]] = Field(description="Per label, fields that override the step's request.")


class StepConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    task_type: str
    model: str | None = Field(default=None, description="Model alias; None: the pipeline request's, else the task's default.")
    request: dict[str, Any] = Field(default={}, description="The step's request fields; string values are templates.")
    by_label: ByLabel | None = None


class PipelineConfig(_Strict):
    steps: Annotated[list[StepConfig], Field(min_length=1, max_length=16)]

    @model_validator(mode="after")
    def _refer_backwards(self) -> PipelineConfig:
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise ValueError(f"step names must be unique: {step.name!r} twice")
            if step.name == "input":
                raise ValueError("a step cannot be called 'input' (it names the pipeline's input in templates)")
            earlier = {ref.split(".")[0] for ref in placeholders(step) if not ref.startswith("input.")}
            if step.by_label:
                earlier.add(step.by_label.step)
            if earlier - seen:
                raise ValueError(f"step {step.name!r} refers to {sorted(earlier - seen)}, which do not run before it")
            seen.add(step.name)
        return self


class PipelineRequest(_Strict):
    """What a caller submits to run a pipeline."""

    task_type: Literal["pipeline"] = PIPELINE
    pipeline: str
    input: dict[str, Annotated[str, Field(max_length=MAX_RENDERED_CHARS)]] = {}
    model: str | None = None
    priority: Priority = Priority.INTERACTIVE
    submitted_at: SubmittedAt = Field(default_factory=time.time)
    deadline: float | None = None


def placeholders(step: StepConfig) -> set[str]:
    values = [step.request, *(step.by_label.requests.values() if step.by_label else [])]
    return {m for request in values for v in request.values() if isinstance(v, str) for m in PLACEHOLDER.findall(v)}


def _fill(template: str, input: dict[str, str], outputs: dict[str, Any], step: str) -> str:
    def value(match: re.Match[str]) -> str:
        name, field = match.group(1).split(".")
        if name == "input":
            if field not in input:
                raise FleetError(ErrorCode.INVALID_INPUT, f"input: step {step!r} needs the input field {field!r}")
            return input[field]
        return str(outputs[name]["output"].get(field, ""))

    filled = PLACEHOLDER.sub(value, template)
    if len(filled) > MAX_RENDERED_CHARS:
        raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"step {step!r}: its rendered request is over {MAX_RENDERED_CHARS} characters")
    return filled


def step_request(step: StepConfig, request: PipelineRequest, outputs: dict[str, Any]) -> dict[str, Any]:
    """The request a step submits, from its template, the pipeline input and the earlier outputs."""
    fields = {k: v for k, v in step.request.items() if k != "cache"}  # a step's answer is never served from the cache
    if step.by_label is not None:
        label = outputs[step.by_label.step]["output"].get("label")
        fields.update(step.by_label.requests.get(label, {}))
    fields = {k: _fill(v, request.input, outputs, step.name) if isinstance(v, str) else v for k, v in fields.items()}
    model = step.model or request.model
    return {**fields, "task_type": step.task_type, "priority": str(request.priority), **({"model": model} if model else {}),
            **({"deadline": request.deadline} if request.deadline else {})}


def check_input(pipeline: PipelineConfig, request: PipelineRequest) -> None:
    """Every input field the steps name is given (INVALID_INPUT naming the missing ones)."""
    needed = {ref.split(".")[1] for step in pipeline.steps for ref in placeholders(step) if ref.startswith("input.")}
    missing = sorted(needed - set(request.input))
    if missing:
        raise FleetError(ErrorCode.INVALID_INPUT, f"input: pipeline {request.pipeline!r} needs the fields {missing}")
