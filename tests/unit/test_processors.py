"""Processors declared in YAML: instruction injection before the model, output filters after it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import load_settings
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyOutput, ClassifyRequest, GenerateOutput, GenerateRequest
from workers.consumer.processors import Chain


def settings_with(processors: list[dict], task_processors: dict | None = None):  # noqa: ANN201
    base = load_settings().models[0].model_dump()
    return load_settings(models=[{**base, "processors": processors}], task_processors=task_processors or {})


def test_instruction_is_injected_as_a_system_turn_before_the_conversation() -> None:
    chain = Chain(settings_with([{"name": "instruction", "options": {"text": "Answer in one word."}}]), "smollm2-135m")
    request = chain.before(GenerateRequest(prompt="Capital of France?"))
    assert request.chat_messages() == [{"role": "system", "content": "Answer in one word."},
                                       {"role": "user", "content": "Capital of France?"}]
    classify = ClassifyRequest(text="fine", labels=["a", "b"])
    assert chain.before(classify) is classify  # generation only


def test_redact_filters_generated_text_and_task_type_processors_run_after_the_model_s_own() -> None:
    chain = Chain(settings_with([{"name": "redact", "options": {"patterns": ["paris"], "replacement": "X"}}],
                                {"text_generation": [{"name": "redact", "options": {"patterns": ["X"], "replacement": "Y"}}]}),
                  "smollm2-135m")
    request = GenerateRequest(prompt="q")
    # after() runs in reverse: the task type's filter first, then the model's own
    assert chain.after(request, GenerateOutput(text="Paris, PARIS.", finish_reason="stop")).text == "X, X."
    label = ClassifyOutput(label="a", scores={"a": 1.0, "b": 0.0})
    assert chain.after(ClassifyRequest(text="t", labels=["a", "b"]), label) == label


def test_unknown_processors_and_bad_options_fail_with_the_choices_named() -> None:
    with pytest.raises(ValidationError, match=r"unknown processor 'shout'; installed: \['instruction', 'redact'"):
        settings_with([{"name": "shout"}])
    with pytest.raises(FleetError, match="patterns") as caught:
        Chain(settings_with([{"name": "redact", "options": {}}]), "smollm2-135m")
    assert caught.value.code == ErrorCode.INVALID_INPUT
