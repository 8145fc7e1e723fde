"""A pipeline step, as a Celery task of the chain a producer built (shared/pipelines.py).

The step's request is rendered from the pipeline's input and the earlier steps' outputs, then runs
the normal task path (ledger, deadline, DLQ, traces, the model's batch): a step is a task like any
other. Its answer is added to the pipeline's result, which Celery hands to the next step and which
the last step leaves as the pipeline's result. A step that fails fails the chain (Celery marks the
later steps failed with the same error), with the step's name added to the message and its code kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.errors import FleetError
from shared.pipelines import PIPELINE, PipelineRequest, step_request


def add_step(state: dict[str, Any], name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's result so far, plus one step's TaskResult: usage summed, model and batch of the last step."""
    usage = state.get("usage") or {}
    return {
        "task_type": PIPELINE, "model": result["model"], "worker": result.get("worker", ""),
        "output": {**state["output"], "steps": {**state["output"]["steps"], name: result}},
        "usage": {k: usage.get(k, 0) + result["usage"].get(k, 0) for k in ("prompt_tokens", "completion_tokens")},
        "timings": result["timings"], "batch_size": result["batch_size"],
    }


def run_step(ctx: Any, task: Any, state: dict[str, Any], handle: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    output = state["output"]
    request = PipelineRequest.model_validate(output["request"])
    config = ctx.settings.pipelines.get(request.pipeline)
    if config is None:
        raise FleetError("INVALID_INPUT", f"pipeline {request.pipeline!r} is not configured on this worker")
    step = config.steps[len(output["steps"])]
    try:
        step_args = (step_request(step, request, output["steps"]),)
        return handle(ctx, task, step.task_type, step_args, {}, finish=lambda result: add_step(state, step.name, result))
    except FleetError as exc:
        raise FleetError(exc.code, f"pipeline {request.pipeline!r} step {step.name!r} failed: {exc.message}") from None
