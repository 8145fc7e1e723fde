"""Caller-supplied prompt templates are parsed, never passed to str.format."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from shared import templates
from shared.errors import ErrorCode, FleetError
from shared.schemas import TaskType
from workers.consumer.parsing import parse_request

HOSTILE = [
    "{text}{labels:>10000000}",
    "{text}{labels:>1000000000}",
    "{text!r}",
    "{text.__class__}",
    "{text[0]}",
    "{0}{text}",
    "{text}{secret}",
    "{text}{",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_format_specs_conversions_and_other_fields_are_refused(template: str) -> None:
    with pytest.raises(templates.TemplateError):
        templates.check(template)


def test_the_format_spec_attack_is_refused_as_invalid_input_fast_and_without_memory() -> None:
    payload = {"text": "hi", "labels": ["a", "b"], "prompt_template": "{text}{labels:>1000000000}"}
    tracemalloc.start()
    started = time.process_time()
    with pytest.raises(FleetError) as caught:
        parse_request((payload,), {}, TaskType.CLASSIFICATION)  # what the worker runs first
    cpu_ms = (time.process_time() - started) * 1000
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert "format specs" in caught.value.message
    assert peak < 1_000_000, peak  # bytes: nothing was padded out
    assert cpu_ms < 50, cpu_ms


def test_rendering_substitutes_only_the_placeholders() -> None:
    out = templates.render('Review: "{text}" {{literal}}\nSentiment ({labels}):', "good {labels}", "a or b")
    assert out == 'Review: "good {labels}" {literal}\nSentiment (a or b):'


def test_the_rendered_size_is_bounded_before_anything_is_built() -> None:
    template = "{text}" * 500
    with pytest.raises(templates.RenderedTooLong):
        templates.render(template, "x" * 32_000, "a or b", max_chars=100_000)
