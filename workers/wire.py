"""What a consumer process and the engine core say to each other: typed, torch-free messages.

A consumer validates and tokenizes a request (its backend's request side), then sends a ``Request``
holding one prepared item over ZMQ; the engine core batches items of one model and answers each
with a ``Reply``. As in vLLM V1, the messages are msgspec Structs encoded as msgpack: arrays on the
wire (``array_like``), named fields in code, the item kinds tagged. Importing this module imports
neither torch nor transformers, so a consumer, the openai backend and the echo backend stay free of
them (tests/unit/test_layering.py).

The pydantic models inside (a request, an output, usage) travel as their JSON-mode dicts and are
rebuilt in the core without validating again: the consumer validated them before it sent them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from pydantic import BaseModel

from shared import task_types
from shared.errors import FleetError, as_fleet_error
from shared.schemas import ClassifyRequest, GenerateRequest, Usage

#: a consumer's first message on a new socket; the core answers with a ``Hello``
HELLO = b"hello"


class Channel(msgspec.Struct, frozen=True, array_like=True):
    """The channel expert of the default method: score log P(text | "<label> prefix") per label."""

    text_ids: list[int]
    prefix_ids: list[list[int]]  # one per label, in label order


class Plain(msgspec.Struct, frozen=True, array_like=True):
    """The plain-prompt half of the default method: the label scored after a plain prompt."""

    template: str
    prompt_ids: list[int]
    label_ids: list[list[int]]


class Examples(msgspec.Struct, frozen=True, array_like=True):
    """The prototype expert of a classification with examples: the text's tokens, each example's
    tokens and its label's index (the core embeds them and scores the text against each label's
    mean example)."""

    text_ids: list[int]
    example_ids: list[list[int]]
    labels: list[int]


class Encoded(msgspec.Struct, frozen=True, array_like=True):
    """The sentence encoder's experts (``classification_encoder``), in its own tokenizer's ids: the
    text; each label's phrase (the zero-shot expert; empty with a caller's template); each example
    and its label's index (the prototype expert; empty without examples)."""

    text_ids: list[int]
    phrase_ids: list[list[int]]
    example_ids: list[list[int]]
    labels: list[int]


class PreparedGenerate(msgspec.Struct, frozen=True, array_like=True, tag="generate"):
    request: GenerateRequest
    input_ids: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def cost_tokens(self) -> int:
        return len(self.input_ids) + self.request.max_new_tokens


class PreparedClassify(msgspec.Struct, frozen=True, array_like=True, tag="classify"):
    request: ClassifyRequest
    template: str | None  # None: the chat method (the request side's classify_ids)
    prompt_ids: list[int]
    label_ids: list[list[int]]
    channel: Channel | None = None
    plain: Plain | None = None
    examples: Examples | None = None
    encoded: Encoded | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @staticmethod
    def _direct(label_ids: list[list[int]]) -> int:
        return max(1, sum(len(ids) > 1 for ids in label_ids))

    @property
    def rows(self) -> int:
        """Sequences this request adds to a batch (one scoring row per multi-token label, per
        channel prefix, and per plain-prompt label): what the llama_cpp engine scores, an upper
        bound where the transformers engine packs a prompt's multi-token labels into one row."""
        rows = self._direct(self.label_ids) + (len(self.channel.prefix_ids) if self.channel else 0)
        return rows + (self._direct(self.plain.label_ids) if self.plain else 0) + (1 if self.examples else 0)

    @property
    def width(self) -> int:
        width = len(self.prompt_ids) + max(len(ids) for ids in self.label_ids) - 1
        if self.channel is not None:
            width = max(width, len(self.channel.text_ids) + max(len(ids) for ids in self.channel.prefix_ids))
        if self.plain is not None:
            width = max(width, len(self.plain.prompt_ids) + max(len(ids) for ids in self.plain.label_ids) - 1)
        if self.examples is not None:
            width = max(width, len(self.examples.text_ids))
        return width

    @property
    def cost_tokens(self) -> int:
        return self.rows * self.width


class PreparedTask(msgspec.Struct, frozen=True, array_like=True, tag="task"):
    """A plugin task type's prepared request (workers/handlers.py): its own payload (anything
    msgpack can carry: token ids, ...) and what it costs a batch, in rows x width tokens."""

    request: Any  # the task type's request model; rebuilt by name in the core (``decode_request``)
    payload: Any
    rows: int = 1
    width: int = 1
    prompt_tokens: int = 0

    @property
    def cost_tokens(self) -> int:
        return self.rows * self.width


Prepared = PreparedGenerate | PreparedClassify | PreparedTask


class Answer(msgspec.Struct, frozen=True):
    """One item's result: its task type's output model and the tokens it used."""

    output: Any
    usage: Usage


class BatchInfo(msgspec.Struct, frozen=True, array_like=True):
    """The batch an item ran in. ``leader``: its first member, so batch-level metrics are counted once
    per batch by whichever consumer gets it. ``continuous``: a continuously batched generation row;
    ``size`` is then the rows decoding when it joined, and the times are its own."""

    size: int
    batch_wait_ms: float
    inference_ms: float
    leader: bool = False
    continuous: bool = False


class Request(msgspec.Struct, frozen=True, array_like=True):
    """A prepared item for the core. ``rank``: its queue class's rank (lower is served first);
    ``task_id`` names the task's token stream and cancellation marker (shared/streams.py)."""

    id: bytes
    model: str
    rank: int
    traceparent: str
    item: Prepared
    task_id: str = ""
    task_type: str = ""  # a plugin item's task type: how the core rebuilds its request


class Failure(msgspec.Struct, frozen=True, array_like=True):
    code: str
    message: str
    history: list[Any] = []


class Reply(msgspec.Struct, frozen=True, array_like=True):
    """The core's answer to one Request: an output (with its task type and batch) or a failure."""

    id: bytes
    task_type: str = ""
    output: dict[str, Any] | None = None
    usage: Usage | None = None
    batch: BatchInfo | None = None
    failure: Failure | None = None


class Hello(msgspec.Struct, frozen=True):
    """The core's answer to HELLO: the pid a consumer watches for its death, and the models loaded
    (name -> load_seconds, device, kernels)."""

    pid: int
    models: dict[str, dict[str, Any]]


def _encode_hook(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise NotImplementedError(f"{type(obj).__name__} cannot go between a consumer and the engine core")


def _decode_hook(kind: type, obj: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(obj, dict):
        return kind.model_construct(**obj)
    raise NotImplementedError(f"cannot rebuild {kind!r}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_hook)
_requests = msgspec.msgpack.Decoder(Request, dec_hook=_decode_hook)
_replies = msgspec.msgpack.Decoder(Reply, dec_hook=_decode_hook)
_hellos = msgspec.msgpack.Decoder(Hello)


def encode(message: Request | Reply | Hello) -> bytes:
    return _encoder.encode(message)


def request(request_id: bytes, model: str, rank: int, traceparent: str, prepared: Prepared,
            task_id: str = "") -> Request:
    task_type = str(prepared.request.task_type) if isinstance(prepared, PreparedTask) else ""
    return Request(request_id, model, rank, traceparent, prepared, task_id, task_type)


def decode_request(data: bytes) -> Request:
    message = _requests.decode(data)
    if isinstance(message.item, PreparedTask):
        item = message.item
        rebuilt = task_types.get(message.task_type).request.model_construct(**item.request)
        message = msgspec.structs.replace(message, item=msgspec.structs.replace(item, request=rebuilt))
    return message


def answer(request_id: bytes, task_type: str, result: Answer, info: BatchInfo) -> Reply:
    return Reply(request_id, task_type, result.output.model_dump(mode="json"), result.usage, info)


def failure(request_id: bytes, exc: BaseException) -> Reply:
    error = as_fleet_error(exc)
    history = msgspec.to_builtins(getattr(exc, "history", []), enc_hook=str)
    return Reply(request_id, failure=Failure(str(error.code), error.message, history))


def decode_reply(data: bytes) -> tuple[bytes, Answer | FleetError, BatchInfo | None]:
    """(request id, the answer or the error the core raised, the batch it ran in)."""
    reply = _replies.decode(data)
    if reply.failure is not None:
        error = FleetError(reply.failure.code, reply.failure.message)
        error.history = reply.failure.history  # type: ignore[attr-defined]
        return reply.id, error, None
    output = task_types.get(reply.task_type).output.model_validate(reply.output)
    return reply.id, Answer(output, reply.usage or Usage()), reply.batch


def decode_hello(data: bytes) -> Hello:
    return _hellos.decode(data)
