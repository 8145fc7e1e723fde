"""Pipeline declarations are checked when the config loads; a step's request is rendered from the
pipeline's input and earlier outputs, leaving a classification template's own braces alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import load_settings
from shared.errors import FleetError
from shared.pipelines import PipelineConfig, PipelineRequest, step_request

STEPS = [
    {"name": "kind", "task_type": "classification",
     "request": {"text": "{input.msg}", "labels": ["bug", "praise"], "prompt_template": 'Msg: "{text}" ({labels}):', "cache": True}},
    {"name": "answer", "task_type": "text_generation", "request": {"prompt": "Answer: {input.msg}"},
     "by_label": {"step": "kind", "requests": {"bug": {"prompt": "Triage this {kind.label}: {input.msg}"}}}},
]


def test_a_step_request_is_rendered_from_input_and_earlier_outputs() -> None:
    pipeline = PipelineConfig.model_validate({"steps": STEPS})
    request = PipelineRequest(pipeline="p", input={"msg": "It crashes"}, priority="bulk")
    first = step_request(pipeline.steps[0], request, {})
    assert first["text"] == "It crashes" and first["prompt_template"] == 'Msg: "{text}" ({labels}):'
    assert "cache" not in first and first["priority"] == "bulk" and first["task_type"] == "classification"
    second = step_request(pipeline.steps[1], request, {"kind": {"output": {"label": "bug"}}})
    assert second["prompt"] == "Triage this bug: It crashes"
    assert step_request(pipeline.steps[1], request, {"kind": {"output": {"label": "praise"}}})["prompt"] == "Answer: It crashes"
    with pytest.raises(FleetError, match="needs the input field 'msg'"):
        step_request(pipeline.steps[0], PipelineRequest(pipeline="p", input={}), {})


@pytest.mark.parametrize(("steps", "match"), [
    ([STEPS[1], STEPS[0]], r"refers to \['kind'\], which do not run before it"),
    ([STEPS[0], STEPS[0]], "step names must be unique"),
    ([{**STEPS[0], "name": "input"}], "cannot be called 'input'"),
])
def test_bad_pipelines_fail_when_the_config_loads(steps: list, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PipelineConfig.model_validate({"steps": steps})


def test_pipeline_steps_name_installed_task_types_and_configured_models() -> None:
    with pytest.raises(ValidationError, match="unknown task type 'summarize'"):
        load_settings(pipelines={"p": {"steps": [{"name": "s", "task_type": "summarize"}]}})
    with pytest.raises(ValidationError, match="unknown model 'gpt'"):
        load_settings(pipelines={"p": {"steps": [{"name": "s", "task_type": "classification", "model": "gpt"}]}})
