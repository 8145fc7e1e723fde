"""The messages between a consumer and the engine core: what goes in comes out, typed, by name."""

from __future__ import annotations

import msgspec
import pytest

from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyOutput, ClassifyRequest, GenerateOutput, GenerateRequest, Usage
from workers import wire
from workers.wire import Answer, BatchInfo, Channel, Encoded, Examples, Plain, PreparedClassify, PreparedGenerate


def _round_trip(item: wire.Prepared) -> wire.Request:
    data = wire.encode(wire.request(b"id-1", "m", 1, "00-" + "1" * 32 + "-" + "2" * 16 + "-01", item, "task-9"))
    return wire.decode_request(data)


def test_a_generation_request_arrives_with_its_fields_and_its_request_model() -> None:
    item = PreparedGenerate(GenerateRequest(prompt="hello", max_new_tokens=7), [1, 2, 3])
    got = _round_trip(item)
    assert (got.id, got.model, got.rank, got.task_id) == (b"id-1", "m", 1, "task-9")
    assert isinstance(got.item, PreparedGenerate) and isinstance(got.item.request, GenerateRequest)
    assert got.item.input_ids == [1, 2, 3] and got.item.request.max_new_tokens == 7
    assert got.item.cost_tokens == 3 + 7


def test_a_classification_keeps_its_experts_and_its_cost() -> None:
    item = PreparedClassify(ClassifyRequest(text="good", labels=["a", "b"]), None, [5, 6], [[7], [8, 9]],
                            Channel([1, 2], [[3], [4]]), Plain("T {text}", [1], [[2], [3]]))
    got = _round_trip(item).item
    assert got == item
    assert (got.rows, got.width, got.cost_tokens) == (item.rows, item.width, item.cost_tokens)


def test_a_classification_with_examples_carries_the_lms_and_the_encoders_tokens() -> None:
    request = ClassifyRequest(text="good", labels=["a", "b"], examples=[{"text": "x", "label": "b"}])
    item = PreparedClassify(request, None, [5, 6], [[7], [8]], None, None, Examples([5], [[9]], [1]),
                            Encoded([101, 5, 102], [[101, 7, 102], [101, 8, 102]], [[101, 9, 102]], [1]))
    got = _round_trip(item).item
    assert (got.examples, got.encoded) == (item.examples, item.encoded)
    assert got.request.examples == [{"text": "x", "label": "b"}]  # rebuilt unvalidated: plain dicts (shots_for reads both)


def test_a_task_item_is_rebuilt_as_its_task_types_request_model() -> None:
    """A plugin's item carries its own payload; the core rebuilds its request by the task type's name
    (shown here with an installed type, as a plugin's would be)."""
    item = wire.PreparedTask(ClassifyRequest(text="x", labels=["a", "b"]), {"ids": [1, 2]}, rows=1, width=2, prompt_tokens=2)
    got = _round_trip(item).item
    assert isinstance(got, wire.PreparedTask) and isinstance(got.request, ClassifyRequest)
    assert got.request.labels == ["a", "b"] and got.payload == {"ids": [1, 2]} and got.cost_tokens == 2


def test_an_answer_and_a_failure_come_back_typed() -> None:
    answer = Answer(ClassifyOutput(label="a", scores={"a": 0.9, "b": 0.1}), Usage(prompt_tokens=4))
    request_id, got, info = wire.decode_reply(wire.encode(wire.answer(b"r", "classification", answer, BatchInfo(3, 1.5, 2.5, True))))
    assert request_id == b"r" and got == answer and info == BatchInfo(3, 1.5, 2.5, True)

    error = FleetError(ErrorCode.PROMPT_TOO_LONG, "too long")
    error.history = [{"attempt": 1, "when": object()}]  # type: ignore[attr-defined] - anything: sent as text
    request_id, got, info = wire.decode_reply(wire.encode(wire.failure(b"r", error)))
    assert isinstance(got, FleetError) and got.code == ErrorCode.PROMPT_TOO_LONG and info is None
    assert got.message == "too long" and got.history[0]["attempt"] == 1  # type: ignore[attr-defined]

    generated = Answer(GenerateOutput(text="hi", finish_reason="stop"), Usage(completion_tokens=1))
    assert wire.decode_reply(wire.encode(wire.answer(b"g", "text_generation", generated, BatchInfo(1, 0, 0))))[1] == generated


def test_a_frame_that_is_not_a_request_is_refused_not_guessed() -> None:
    with pytest.raises(msgspec.ValidationError):
        wire.decode_request(msgspec.msgpack.encode([b"id", "m", 0, "", ["no-such-kind", 1], ""]))
