"""The frames consumers and the engine core exchange (msgpack over ZMQ).

request:  [id, model, priority, traceparent, kind, request, ids, template, label_ids, channel, task_id]
          channel = [[text_ids, prefix_ids] | None, [plain template, prompt_ids, label_ids] | None]
          (the default method's other experts); task_id names the task's token stream and
          cancellation marker (shared/streams.py)
          a plugin task type (kind TASK): [id, model, priority, traceparent, TASK, request, payload,
          [rows, width, prompt_tokens], task_type, None, task_id]
reply:    [id, ok, body, batch]   body = {task_type, output, usage} | {code, message, history};
          batch = [size, batch_wait_ms, inference_ms, leader]  (leader: the first member of its
          batch, so batch-level metrics are counted once per batch by whichever consumer gets it)

A request arrives already validated and tokenized; the core rebuilds it without validating again.
"""

from __future__ import annotations

import msgpack

from shared import task_types
from shared.errors import FleetError, as_fleet_error
from shared.schemas import ClassifyRequest, GenerateRequest, Usage
from workers.batcher import BatchInfo
from workers.engine import Answer, Channel, Plain, Prepared, PreparedClassify, PreparedGenerate, PreparedTask

GENERATE, CLASSIFY, TASK = 0, 1, 2


def pack_request(request_id: bytes, model: str, priority: int, traceparent: str, prepared: Prepared,
                 task_id: str = "") -> bytes:
    body = prepared.request.model_dump(mode="json")
    if isinstance(prepared, PreparedGenerate):
        frame = [request_id, model, priority, traceparent, GENERATE, body, prepared.input_ids, None, None, None]
    elif isinstance(prepared, PreparedTask):
        cost = [prepared.rows, prepared.width, prepared.prompt_tokens]
        frame = [request_id, model, priority, traceparent, TASK, body, prepared.payload, cost, str(prepared.request.task_type), None]
    else:
        channel = [prepared.channel.text_ids, prepared.channel.prefix_ids] if prepared.channel else None
        plain = [prepared.plain.template, prepared.plain.prompt_ids, prepared.plain.label_ids] if prepared.plain else None
        frame = [request_id, model, priority, traceparent, CLASSIFY, body, prepared.prompt_ids, prepared.template,
                 prepared.label_ids, [channel, plain]]
    return msgpack.packb([*frame, task_id])


def unpack_request(data: bytes) -> tuple[bytes, str, int, str, Prepared, str]:
    request_id, model, priority, traceparent, kind, body, ids, template, label_ids, channel, task_id = msgpack.unpackb(data)
    if kind == GENERATE:
        prepared: Prepared = PreparedGenerate(GenerateRequest.model_construct(**body), ids)
    elif kind == TASK:
        rows, width, prompt_tokens = template
        prepared = PreparedTask(task_types.get(label_ids).request.model_construct(**body), ids, rows, width, prompt_tokens)
    else:
        channel, plain = channel
        prepared = PreparedClassify(ClassifyRequest.model_construct(**body), template, ids, label_ids,
                                    Channel(*channel) if channel else None, Plain(*plain) if plain else None)
    return request_id, model, priority, traceparent, prepared, task_id


def pack_answer(request_id: bytes, task_type: str, answer: Answer, info: BatchInfo) -> bytes:
    body = {"task_type": task_type, "output": answer.output.model_dump(mode="json"), "usage": answer.usage.model_dump()}
    return msgpack.packb([request_id, True, body, [info.size, info.batch_wait_ms, info.inference_ms, info.leader]])


def pack_error(request_id: bytes, exc: BaseException) -> bytes:
    error = as_fleet_error(exc)
    body = {"code": str(error.code), "message": error.message, "history": getattr(exc, "history", [])}
    return msgpack.packb([request_id, False, body, None], default=str)


def unpack_reply(data: bytes) -> tuple[bytes, Answer | FleetError, BatchInfo | None]:
    request_id, ok, body, batch = msgpack.unpackb(data)
    if not ok:
        error = FleetError(body["code"], body["message"])
        error.history = body["history"]  # type: ignore[attr-defined]
        return request_id, error, None
    output = task_types.get(body["task_type"]).output.model_validate(body["output"])
    size, wait_ms, inference_ms, leader = batch
    return request_id, Answer(output, Usage(**body["usage"])), BatchInfo(size, wait_ms, inference_ms, leader)
