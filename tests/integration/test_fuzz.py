"""Property-based fuzzing: malformed requests always get a documented error code, never a crash.

Hypothesis generates thousands of payloads; they go (1) through the producer, which must refuse
them with INVALID_INPUT before anything is enqueued, and (2) straight onto the
queue as raw Celery messages, where the worker must answer every one with a documented code and
stay up.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CATALOG, ErrorCode, FleetError
from shared.queues import CLASSIFY_TASK, GENERATE_TASK
from shared.schemas import TaskType
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = ["task_type", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "stop", "text", "labels",
          "prompt_template", "priority", "deadline", "model", "chat_template", "submitted_at"]
# Requests shaped like real ones, with some fields of the wrong type, out of range or unknown.
request_like = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_value, max_size=8)
payloads = st.one_of(request_like, json_value)


@functools.cache
def _request_adapter() -> Any:
    from pydantic import TypeAdapter

    from shared.schemas import TaskRequest

    return TypeAdapter(TaskRequest)  # built once: building one per payload was most of this module's time


def _bad(payload: Any) -> bool:
    """True unless the payload is by chance a valid request (those are skipped, not fuzz)."""
    from pydantic import ValidationError

    try:
        _request_adapter().validate_python(payload)
    except (ValidationError, TypeError, ValueError):
        return True
    return False


def _acceptable(args: list[Any], task_type: TaskType) -> bool:
    """Whether the worker's contract accepts this raw message (those are skipped, not fuzz): one
    request object whose task type, when missing, is the task's own (the task name decides it)."""
    if len(args) != 1 or not isinstance(args[0], dict):
        return False
    if args[0].get("task_type", str(task_type)) != str(task_type):
        return False
    return not _bad({"task_type": str(task_type), **args[0]})


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=payloads)
def test_producer_refuses_malformed_requests_with_a_code(fleet: Fleet, payload: Any) -> None:
    if not _bad(payload):
        return
    with pytest.raises(FleetError) as caught:
        fleet.client.submit(payload)
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert caught.value.message


def test_worker_answers_2000_raw_malformed_messages_with_codes_and_stays_up(fleet: Fleet) -> None:
    samples: list[Any] = []

    @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=payloads, as_args=st.booleans())
    def collect(payload: Any, as_args: bool) -> None:
        samples.append((payload, as_args))

    collect()
    queue = fleet.settings.queue_name("bulk")  # type: ignore[arg-type]
    app = fleet.client.app
    sent = []
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for i, (payload, as_args) in enumerate(samples):
            args = payload if as_args and isinstance(payload, list) else [payload]
            task_type = TaskType.TEXT_GENERATION if i % 2 else TaskType.CLASSIFICATION
            if _acceptable(args, task_type):
                continue
            sent.append(app.send_task(GENERATE_TASK if i % 2 else CLASSIFY_TASK, args=args, queue=queue,
                                      routing_key=queue, producer=producer, argsrepr="fuzz"))
    assert len(sent) >= 1500
    codes: dict[str, int] = {}
    for result in sent:
        error = result.get(timeout=600, propagate=False)
        assert result.state == "FAILURE", (result.state, error)
        fleet_error = fleet.client.handle(result.id)
        with pytest.raises(FleetError) as caught:
            fleet_error.result(timeout=10)
        assert caught.value.code in CATALOG and caught.value.code != ErrorCode.INTERNAL, caught.value
        codes[caught.value.code] = codes.get(caught.value.code, 0) + 1
    assert fleet.worker.process.poll() is None  # still up
    assert fleet.client.generate("Say hi.", max_new_tokens=4, timeout=300).output.text  # type: ignore[union-attr]
    print(f"worker answered {len(sent)} malformed messages: {codes}")
