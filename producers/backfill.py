"""`autoglm backfill IN.jsonl --output OUT.jsonl`: a large file through the fleet, resumably.

Input lines use the OpenAI Batch API shape: ``{"custom_id": ..., "task_type": ..., **params}``
(CSV works too: a header row with the same field names; ``labels`` as ``a|b|c``). Output: one
line per input line, ``{"custom_id", "task_id", "status": "succeeded", "result"}``; failures go to
``--errors`` (default ``OUT.errors.jsonl``) with the error code, message and retry advice.

Resumable: a journal (``OUT.journal``) records each chunk's task ids *before* it is published
and marks it published after. Re-running after a crash or Ctrl-C skips lines already written,
waits for published ones (results are kept ``broker.result_expires_s``), and re-publishes an
unconfirmed chunk under the same task ids, which the workers answer once. No line gets a second
task id.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from kombu.utils.uuid import uuid

from producers.client import FleetClient, TaskHandle
from shared.errors import ErrorCode, FleetError, as_fleet_error
from shared.schemas import Priority

THROTTLE_POLL_S = 0.5  # how often a backfill with nothing in flight looks at a queue too deep to add to
CANCEL_POLL_S = 0.25  # with a cancel hook (the Batch API), the longest a wait for answers goes without asking it


class Line(NamedTuple):
    """One input line: its custom_id, the request, or why it cannot be one (never submitted)."""

    custom_id: str
    request: dict[str, Any] | FleetError
    number: int


def _csv_request(row: dict[str, str | None]) -> dict[str, Any]:
    data: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
    if "labels" in data:
        data["labels"] = data["labels"].split("|")
    for key, kind in (("max_new_tokens", int), ("temperature", float), ("top_p", float)):
        if key in data:
            try:
                data[key] = kind(data[key])
            except ValueError:
                raise FleetError(ErrorCode.INVALID_INPUT, f"{key}: {data[key]!r} is not a number") from None
    return data


def read_lines(path: Path) -> Iterator[Line]:
    """The file's requests from JSONL or CSV; a line without custom_id gets its line number as one.
    A line that is not a JSON object (or a CSV row with a bad number) comes back as its error, so
    it is reported with the others instead of stopping the whole file."""
    with path.open(newline="") as f:
        if path.suffix.lower() == ".csv":
            for n, row in enumerate(csv.DictReader(f), 1):
                custom_id = str(row.pop("custom_id", None) or n)
                try:
                    yield Line(custom_id, _csv_request(row), n)
                except FleetError as exc:
                    yield Line(custom_id, FleetError(exc.code, f"row {n}: {exc.message}"), n)
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Line(str(n), FleetError(ErrorCode.INVALID_INPUT, f"line {n} is not JSON ({exc.msg} at column "
                                              f"{exc.colno}); each line must be one JSON object"), n)
                continue
            if not isinstance(data, dict):
                yield Line(str(n), FleetError(ErrorCode.INVALID_INPUT, f"line {n} is a JSON {type(data).__name__}, "
                                              "not an object with custom_id and the request's fields"), n)
                continue
            custom_id = data.pop("custom_id", None)
            yield Line(str(n) if custom_id is None else str(custom_id), data, n)


def repeated_ids(ids: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """The custom_ids of (custom_id, line number) pairs that are on more than one line, with their lines."""
    seen: dict[str, list[int]] = {}
    for custom_id, number in ids:
        seen.setdefault(custom_id, []).append(number)
    return {cid: numbers for cid, numbers in seen.items() if len(numbers) > 1}


def duplicate_ids(lines: Iterable[Line]) -> FleetError | None:
    """custom_id names a line's result: two lines with one id would share a task and one answer
    (the other silently lost), and a resumed run could not tell them apart. As OpenAI's Batch API
    does, such a file is refused whole, before anything is submitted."""
    repeated = repeated_ids((line.custom_id, line.number) for line in lines)
    if not repeated:
        return None
    shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, numbers))}" for cid, numbers in list(repeated.items())[:5])
    more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
    return FleetError(ErrorCode.INVALID_INPUT, f"custom_id must be unique in the file: {shown}{more}; nothing was submitted")


@dataclass
class Journal:
    """Append-only: ``{"chunk": k, "ids": {custom_id: task_id}}`` then ``{"published": k}``."""

    path: Path
    submitted: dict[str, str] = field(default_factory=dict)
    unconfirmed: dict[int, dict[str, str]] = field(default_factory=dict)
    next_chunk: int = 0

    def load(self) -> Journal:
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a crash
                    continue
                if "chunk" in entry:
                    self.unconfirmed[entry["chunk"]] = entry["ids"]
                    self.submitted.update(entry["ids"])
                    self.next_chunk = max(self.next_chunk, entry["chunk"] + 1)
                else:
                    self.unconfirmed.pop(entry["published"], None)
        return self

    def append(self, entry: dict[str, Any], out: TextIO) -> None:
        out.write(json.dumps(entry) + "\n")
        out.flush()


def _end_torn_line(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline; appending to it would glue the
    next line onto it and lose both. End it: the torn line is skipped when read, its request waited for again."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _bulk(request: dict[str, Any]) -> dict[str, Any]:
    """A backfill is bulk work, whatever a line says: a line cannot put itself on the interactive queue."""
    return {**request, "priority": Priority.BULK}


def _done_ids(*paths: Path) -> set[str]:
    done = set()
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    done.add(json.loads(line)["custom_id"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line: that request is waited for again
    return done


@dataclass
class Progress:
    """The progress line on stderr. Lines a resumed run skips (done before) count toward the bar, not
    toward the rate: the rate and ETA are this run's (a resumed run once showed 14,229,088 lines/s)."""

    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    skipped: int = 0
    last: float = 0.0

    def skip(self, n: int) -> None:
        self.skipped += n
        self.done += n

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return (self.done - self.skipped) / max(elapsed, 1e-9)

    def tick(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self.last > 0.5:
            self.last = now
            rate = self.rate(now)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{rate:6.1f}/s ETA {eta:6.0f}s")
            sys.stderr.flush()


def _wait_a_slice(handle: TaskHandle) -> None:
    """Wait up to CANCEL_POLL_S for ``handle``'s answer (what it is, settle reads)."""
    try:
        handle.result(timeout=CANCEL_POLL_S)
    except (TimeoutError, FleetError):
        pass


def run_backfill(
    client: FleetClient, source: Path, output: Path, errors: Path | None = None, window: int = 256,
    chunk: int = 64, max_queue_depth: int = 10_000, timeout_s: float = 3600,
    on_settled: Callable[[bool], None] | None = None, cancelled: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """``on_settled(ok)`` is called once per line answered in this run (the Batch API keeps its
    request_counts with it); ``cancelled()`` is asked between chunks: once true, nothing more is
    submitted, the tasks in flight are cancelled and listed in the errors file with code CANCELLED
    (not settled: a request cancelled before its answer neither completed nor failed)."""
    errors = errors or output.with_suffix(".errors.jsonl")
    for path in (output, errors, output.with_suffix(".journal")):
        _end_torn_line(path)
    settled_hook = on_settled or (lambda ok: None)
    stop = cancelled or (lambda: False)
    journal = Journal(output.with_suffix(".journal")).load()
    done = _done_ids(output, errors)
    lines = list(read_lines(source))
    duplicated = duplicate_ids(lines)
    if duplicated is not None:
        raise duplicated
    todo = [(line.custom_id, line.request) for line in lines if line.custom_id not in done]
    counts: Counter[str] = Counter()
    progress = Progress(total=len(lines))
    progress.skip(len(lines) - len(todo))
    progress.tick(0, force=True)
    bulk_queues = client.settings.bulk_queues()
    in_flight: dict[str, TaskHandle] = {}  # custom_id -> handle
    with output.open("a") as out, errors.open("a") as err, journal.path.open("a") as jout:

        def settle(block: bool) -> None:
            for cid, handle in list(in_flight.items()):
                if not block and not handle.ready():
                    continue
                try:
                    result = handle.result(timeout=timeout_s)
                    out.write(json.dumps({"custom_id": cid, "task_id": handle.id, "status": "succeeded",
                                          "result": result.model_dump(mode="json")}) + "\n")
                    counts["succeeded"] += 1
                    settled_hook(True)
                except (FleetError, TimeoutError) as exc:
                    error = as_fleet_error(exc) if isinstance(exc, FleetError) else exc
                    code = getattr(error, "code", "TIMEOUT")
                    err.write(json.dumps({"custom_id": cid, "task_id": handle.id, "status": "failed",
                                          "error": error.to_dict() if isinstance(error, FleetError) else {"code": code, "message": str(error)}}) + "\n")
                    counts[f"failed:{code}"] += 1
                    settled_hook(False)
                del in_flight[cid]
                progress.tick()
                if block and len(in_flight) < window - chunk:
                    break
            out.flush()
            err.flush()

        # 1. Lines already submitted by an earlier run: wait for them; re-publish unconfirmed chunks.
        pending = {cid: req for cid, req in todo}
        for number, ids in journal.unconfirmed.items():
            again = [cid for cid in ids if cid in pending]
            client.submit_many([_bulk(pending[cid]) for cid in again], task_ids=[ids[cid] for cid in again])
            journal.append({"published": number}, jout)
        for cid, task_id in journal.submitted.items():
            if cid in pending:
                in_flight[cid] = client.handle(task_id)
                counts["resumed"] += 1
        fresh = [(cid, req) for cid, req in todo if cid not in journal.submitted]
        # 2. New lines, a chunk at a time, never more than `window` in flight, never flooding Redis.
        for start in range(0, len(fresh), chunk):
            while not stop() and (len(in_flight) + chunk > window or client.queue_depth(*bulk_queues) > max_queue_depth):
                if not in_flight:  # the queue is deep with others' work: wait for it, without spinning
                    time.sleep(THROTTLE_POLL_S)
                    continue
                some_ready = any(h.ready() for h in in_flight.values())
                if not some_ready and cancelled is not None:
                    # Wait a slice at a time, asking between slices: a blocking settle returns after a
                    # chunk of answers, and a cancel would land that many answers late.
                    _wait_a_slice(next(iter(in_flight.values())))
                    continue
                settle(block=not some_ready)
            if stop():
                break
            part = []
            for cid, req in fresh[start : start + chunk]:
                try:
                    if isinstance(req, FleetError):  # not a request at all (not JSON, say)
                        raise req
                    part.append((cid, client.build(_bulk(req))))
                except FleetError as exc:  # a bad line is reported, never submitted
                    err.write(json.dumps({"custom_id": cid, "task_id": None, "status": "failed", "error": exc.to_dict()}) + "\n")
                    counts[f"failed:{exc.code}"] += 1
                    settled_hook(False)
                    progress.tick()
            if not part:
                continue
            ids = {cid: uuid() for cid, _ in part}
            number = journal.next_chunk
            journal.next_chunk += 1
            journal.append({"chunk": number, "ids": ids}, jout)  # write-ahead: ids before publishing
            handles = client.submit_many([req for _, req in part], task_ids=[ids[cid] for cid, _ in part])
            journal.append({"published": number}, jout)
            counts["submitted"] += len(part)
            in_flight.update({cid: h for (cid, _), h in zip(part, handles, strict=True)})
            settle(block=False)
        while in_flight and not stop():
            if cancelled is None:
                settle(block=True)
            else:  # look up now and then whether the batch was cancelled
                settle(block=False)
                time.sleep(0.25)
        if stop():  # cancelled: what is still in flight is cancelled, and listed so (not counted as failed)
            settle(block=False)
            for cid, handle in in_flight.items():
                handle.cancel()
                err.write(json.dumps({"custom_id": cid, "task_id": handle.id, "status": "cancelled", "error": FleetError(
                    ErrorCode.CANCELLED, f"task {handle.id} was cancelled with its batch").to_dict()}) + "\n")
                counts["cancelled"] += 1
            in_flight.clear()
    progress.tick(0, force=True)
    sys.stderr.write("\n")
    summary = {"lines": len(lines), "skipped_already_done": len(lines) - len(todo), **dict(sorted(counts.items()))}
    return summary
