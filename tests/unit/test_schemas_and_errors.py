"""Request validation and error codes: what a caller sees when a request is wrong."""

from __future__ import annotations

import pickle
import time

import pytest
from pydantic import TypeAdapter, ValidationError

from shared.errors import CATALOG, ErrorCode, FleetError, as_fleet_error, invalid_input
from shared.schemas import ClassifyRequest, GenerateRequest, TaskRequest

adapter: TypeAdapter = TypeAdapter(TaskRequest)


def test_task_type_selects_the_request_model() -> None:
    gen = adapter.validate_python({"task_type": "text_generation", "prompt": "hi"})
    cls = adapter.validate_python({"task_type": "classification", "text": "t", "labels": ["a", "b"]})
    assert isinstance(gen, GenerateRequest) and isinstance(cls, ClassifyRequest)
    assert gen.priority == "interactive" and gen.temperature == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        {"task_type": "text_generation"},  # neither prompt nor messages
        {"task_type": "text_generation", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        {"task_type": "text_generation", "prompt": "x", "max_new_tokens": 0},
        {"task_type": "text_generation", "prompt": "x", "temperature": -1},
        {"task_type": "text_generation", "prompt": "x", "priority": "urgent"},
        {"task_type": "text_generation", "prompt": "x", "unknown_field": 1},
        {"task_type": "classification", "text": "t", "labels": ["only-one"]},
        {"task_type": "classification", "text": "t", "labels": ["a", "a"]},
        {"task_type": "classification", "text": "t", "labels": ["a", "b"], "prompt_template": "no slot"},
        {"task_type": "translation", "text": "t"},
    ],
)
def test_malformed_requests_are_refused(payload: dict) -> None:
    with pytest.raises(ValidationError):
        adapter.validate_python(payload)


def test_every_code_has_a_message_retry_advice_and_status() -> None:
    for code in ErrorCode:
        spec = CATALOG[code]
        assert spec.message and 400 <= spec.http_status < 600
    assert not FleetError(ErrorCode.INVALID_INPUT).retryable
    assert FleetError(ErrorCode.BROKER_UNAVAILABLE).retryable


def test_fleet_error_survives_the_trip_through_a_result_backend() -> None:
    error = FleetError(ErrorCode.PROMPT_TOO_LONG, "prompt is 5000 tokens")
    rebuilt = FleetError(*error.args)  # what Celery's JSON backend does with exc_message
    assert rebuilt.code == ErrorCode.PROMPT_TOO_LONG and rebuilt.message == "prompt is 5000 tokens"
    assert pickle.loads(pickle.dumps(error)).to_dict() == error.to_dict()


def test_unexpected_exceptions_get_a_code() -> None:
    assert as_fleet_error(MemoryError()).code == ErrorCode.RESOURCE_EXHAUSTED
    assert as_fleet_error(RuntimeError("CUDA out of memory")).code == ErrorCode.RESOURCE_EXHAUSTED
    assert as_fleet_error(KeyError("x")).code == ErrorCode.INTERNAL


@pytest.mark.parametrize("when", [-1.7e308, 0.0, 1.0, 4e9, float("inf")])
def test_submitted_at_must_be_a_clock_reading(when: float) -> None:
    """-1.7e308 once made every wait infinite: in results, webhooks and a worker's metrics for good."""
    with pytest.raises(ValidationError, match="submitted_at"):
        ClassifyRequest(text="x", labels=["a", "b"], submitted_at=when)
    assert ClassifyRequest(text="x", labels=["a", "b"], submitted_at=time.time() - 3600).submitted_at > 0


def test_waits_are_never_negative_or_infinite() -> None:
    from workers.consumer.metrics import elapsed_s

    assert elapsed_s(-1.7e308, time.time()) == 0.0 and elapsed_s(float("nan"), 1.0) == 0.0
    assert elapsed_s(10.0, 5.0) == 0.0 and elapsed_s(5.0, 7.5) == 2.5


def test_the_result_cache_key_is_per_tenant() -> None:
    """cached: true must never tell tenant A that tenant B asked the same thing."""
    def key(tenant: str | None) -> str | None:
        return ClassifyRequest(text="x", labels=["a", "b"], cache=True, tenant=tenant).cache_key("m")

    assert key("a") != key("b") and key("a") == key("a") and key(None) not in (key("a"), key("b"))


def test_labels_may_carry_descriptions_and_requests_examples() -> None:
    request = ClassifyRequest(text="It crashed", labels=[{"name": "technical", "description": "the product misbehaves"},
                                                         "billing"], examples=[{"text": "Charged twice", "label": "billing"}])
    assert request.labels == ["technical", "billing"]
    assert request.label_descriptions == {"technical": "the product misbehaves"}
    assert ClassifyRequest.model_validate_json(request.model_dump_json()) == request  # the wire form round-trips


@pytest.mark.parametrize(("body", "names"), [
    ({"examples": [{"text": "x", "label": "shipping"}]}, "examples[0].label: 'shipping' is not one of the labels"),
    ({"examples": [{"text": "  ", "label": "billing"}]}, "examples.0.text"),
    ({"examples": [{"text": "x", "label": "billing"}], "example_set": "support"}, "not both"),
    ({"labels": [{"name": "technical", "description": ""}, "billing"]}, "labels[0].description"),
    ({"examples": [{"text": "x", "label": "billing"}], "prompt_template": "{text}"}, "drop prompt_template"),
])
def test_a_bad_example_or_description_is_invalid_input_naming_the_field(body: dict, names: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ClassifyRequest(**{"text": "It crashed", "labels": ["technical", "billing"], **body})
    assert invalid_input(caught.value).code == ErrorCode.INVALID_INPUT
    assert names in invalid_input(caught.value).message
