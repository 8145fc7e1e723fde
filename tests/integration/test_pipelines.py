"""A pipeline declared in YAML, run end to end by a real worker through Celery's canvas: classify a
review, then answer it with a prompt chosen by the label; one trace across the steps; a failing step
reported with its code and its name."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_fleet import SENTIMENT_TEMPLATE

pytestmark = pytest.mark.integration
LABELS = ["positive", "negative"]
PIPELINES = {
    "triage": {"steps": [
        {"name": "sentiment", "task_type": "classification",
         "request": {"text": "{input.review}", "labels": LABELS, "prompt_template": SENTIMENT_TEMPLATE}},
        {"name": "reply", "task_type": "text_generation", "request": {"prompt": "Reply to: {input.review}", "max_new_tokens": 12},
         "by_label": {"step": "sentiment", "requests": {
             "positive": {"prompt": "Say thank you for this kind review: {input.review}"},
             "negative": {"prompt": "Say sorry for this ({sentiment.label}) review: {input.review}"}}}},
    ]},
    "broken": {"steps": [
        {"name": "sentiment", "task_type": "classification", "request": {"text": "{input.review}", "labels": LABELS}},
        {"name": "essay", "task_type": "text_generation", "request": {"prompt": "{input.review}", "max_new_tokens": 2048}},
    ]},
}


@pytest.fixture(scope="module")
def piped(prepared_models: None, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path, InMemorySpanExporter]]:
    trace_file = tmp_path_factory.mktemp("pipeline-traces") / "worker-spans.jsonl"
    trace_file.touch()
    with fleet_on(redis_url, env={"AUTOGLM_TRACE_FILE": str(trace_file)}, pipelines=PIPELINES,
                  worker={"consumers": 1}) as fleet:
        exporter = InMemorySpanExporter()
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
        yield fleet, trace_file, exporter


def worker_span_names(trace_file: Path, trace_id: str, want: dict[str, int], timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        names = [s["name"] for s in map(json.loads, trace_file.read_text().splitlines()) if s["context"]["trace_id"] == trace_id]
        if all(names.count(n) >= k for n, k in want.items()) or time.monotonic() > deadline:
            return names
        time.sleep(0.1)


def test_a_yaml_pipeline_runs_its_steps_in_one_trace_and_returns_every_output(piped) -> None:  # noqa: ANN001
    fleet, trace_file, exporter = piped
    handle = fleet.client.submit({"task_type": "pipeline", "pipeline": "triage",
                                  "input": {"review": "Terrible service, cold food. Never again."}})
    result = handle.result(timeout=300)
    assert result.task_type == "pipeline"
    steps = result.output["steps"]  # type: ignore[index]
    assert list(steps) == ["sentiment", "reply"]
    assert steps["sentiment"]["output"]["label"] == "negative"
    assert steps["reply"]["output"]["text"] and steps["reply"]["task_type"] == "text_generation"
    assert result.usage.prompt_tokens == steps["sentiment"]["usage"]["prompt_tokens"] + steps["reply"]["usage"]["prompt_tokens"]
    span = next(s for s in exporter.get_finished_spans()
                if s.name == "autoglm.submit" and s.attributes.get("messaging.message.id") == handle.id)
    want = {"run/autoglm.pipeline.step": 2, "autoglm.model.classification": 1, "autoglm.model.text_generation": 1}
    names = worker_span_names(trace_file, f"0x{span.context.trace_id:032x}", want)
    assert all(names.count(n) >= k for n, k in want.items()), names


def test_a_failing_step_is_reported_with_its_code_and_name(piped) -> None:  # noqa: ANN001
    fleet = piped[0]
    handle = fleet.client.submit({"task_type": "pipeline", "pipeline": "broken", "input": {"review": "Fine."}})
    with pytest.raises(FleetError) as caught:
        handle.result(timeout=300)
    assert caught.value.code == ErrorCode.PROMPT_TOO_LONG
    assert "pipeline 'broken' step 'essay' failed" in caught.value.message


def test_pipeline_requests_are_checked_before_anything_is_enqueued(piped) -> None:  # noqa: ANN001
    client = piped[0].client
    for request, match in [({"pipeline": "nope", "input": {"review": "x"}}, "unknown pipeline 'nope'; configured: "),
                           ({"pipeline": "triage", "input": {}}, r"needs the fields \['review'\]")]:
        with pytest.raises(FleetError, match=match) as caught:
            client.submit({"task_type": "pipeline", **request})
        assert caught.value.code == ErrorCode.INVALID_INPUT
