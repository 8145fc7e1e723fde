"""Token streams and cancellation markers: the Redis keys both sides share.

Why Redis Streams: the worker writes a task's text as it is generated and any number of readers
(the client that submitted it, a gateway's SSE response, a second look after a reconnect) read it
from the start or from where they were, without the worker knowing who listens. Each stream is
bounded (MAXLEN) and expires (``streams.ttl_s``), so a stream nobody reads costs nothing for long.

Entries, in order:
- ``{"o": offset, "d": text}``  text from character ``offset`` of the answer on. A redelivered task
  streams again from offset 0 (greedy decoding gives the same text): a reader keeps what it has
  already passed on and drops what it has seen, so redelivery never repeats text;
- ``{"end": finish_reason, "prompt_tokens": n, "completion_tokens": m}``  the answer is complete
  (the task's result holds the final text). The token counts let a streaming reader close its
  response (an OpenAI client's last chunk carries the usage) without waiting for the result,
  which the worker stores a round trip or two after the end;
- ``{"error": code, "message": ...}``  the task failed while generating.

Cancellation: ``cancel_key(task_id)`` set (with a TTL) by the producer - ``handle.cancel()``, or a
gateway whose SSE client went away - is seen by the engine core within ``streams.cancel_poll_ms``;
the row leaves the running batch and the task ends CANCELLED.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.schemas import Usage

STREAM_PREFIX = "autoglm:stream:"
CANCEL_PREFIX = "autoglm:cancel:"
MAXLEN = 4096
CANCEL_TTL_S = 3600  # a cancel marker outlives any generation it could still stop


def stream_key(task_id: str) -> str:
    return f"{STREAM_PREFIX}{task_id}"


def cancel_key(task_id: str) -> str:
    return f"{CANCEL_PREFIX}{task_id}"


@dataclass(frozen=True)
class Event:
    """One decoded stream entry: a piece of text, or the end (``finish``), or a failure (``error``)."""

    offset: int = 0
    text: str = ""
    finish: str | None = None
    error: str | None = None
    message: str = ""
    usage: Usage | None = None  # the answer's tokens, at the end


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(fields: dict[Any, Any]) -> Event:
    fields = {_s(k): _s(v) for k, v in fields.items()}
    if "end" in fields:
        counts = fields.get("prompt_tokens"), fields.get("completion_tokens")
        usage = Usage(prompt_tokens=int(counts[0]), completion_tokens=int(counts[1])) if None not in counts else None
        return Event(finish=fields["end"], usage=usage)
    if "error" in fields:
        return Event(error=fields["error"], message=fields.get("message", ""))
    return Event(offset=int(fields.get("o", 0)), text=fields.get("d", ""))


class Reassembler:
    """Turns stream entries into new text only: drops what a redelivered run repeats."""

    def __init__(self) -> None:
        self.sent = 0  # characters already passed on

    def new_text(self, event: Event) -> str:
        end = event.offset + len(event.text)
        if end <= self.sent:
            return ""
        piece = event.text[max(0, self.sent - event.offset):]
        self.sent = end
        return piece


class Reader:
    """One reader's position in a task's stream: feed it XREAD replies, get the new text; it raises
    the task's FleetError at an error entry, and sets ``done`` and keeps the ``end`` entry (finish
    reason, usage) at the end."""

    def __init__(self, task_id: str) -> None:
        self.key, self.last, self.done = stream_key(task_id), "0-0", False
        self.end: Event | None = None
        self._seen = Reassembler()

    def feed(self, records: list[Any]) -> list[str]:
        from shared.errors import FleetError

        pieces = []
        for self.last, event in entries(records):
            if event.error is not None:
                raise FleetError(event.error, event.message)
            if event.finish is not None:
                self.done, self.end = True, event
                break
            if piece := self._seen.new_text(event):
                pieces.append(piece)
        return pieces

    def rest(self, text: str) -> str:
        """What of the task's recorded text this reader has not passed on (its stream stopped short)."""
        return text[self._seen.sent:]


def entries(records: list[Any]) -> Iterator[tuple[str, Event]]:
    """(entry id, Event) for each entry of an XREAD reply (one stream)."""
    for _key, items in records or []:
        for entry_id, fields in items:
            yield _s(entry_id), decode(fields)
