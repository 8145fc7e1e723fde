"""The OpenAI Batch API's machinery: uploaded files, batch jobs run by the backfill, results in
OpenAI's line format. Routes are in routes/batches.py; this module has no HTTP in it.

A batch is the backfill (producers/backfill.py) run by the gateway in a thread: resumable through
its journal (a gateway restarted mid-batch picks the batch up where it was, no line gets a second
task), bounded in flight and by queue depth, every line at bulk priority. A Redis lease per batch
makes one gateway replica run it; the others serve its status. Files and batch state live under
``gateway.files_dir`` on the gateway's disk (replicas share a volume to share batches).

Disk layout, per tenant:  files/<tenant>/<file_id>  (+ .json: the file object)
                          batches/<tenant>/<batch_id>/batch.json, input.jsonl, out.jsonl,
                          out.errors.jsonl, out.journal
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from producers.backfill import repeated_ids, run_backfill
from producers.client import FleetClient
from shared.errors import ErrorCode, FleetError, invalid_input

log = logging.getLogger(__name__)
ENDPOINTS = ("/v1/chat/completions", "/v1/tasks")
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
LEASE_KEY = "autoglm:batch-lease:{}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: readers never see half a file."""
    tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class Store:
    """Files and batches on disk, per tenant. Ids are random and checked to be plain tokens, so a
    path never leaves the tenant's folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def _checked(name: str) -> str:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise FleetError(ErrorCode.NOT_FOUND, f"no such id {name!r}")
        return name

    # -- files ---------------------------------------------------------------------------------
    def file_dir(self, tenant: str) -> Path:
        return self.root / "files" / self._checked(tenant)

    def usage(self, tenant: str) -> int:
        """Bytes of files the tenant keeps (uploads and batch outputs)."""
        return sum(f["bytes"] for f in self.files(tenant))

    def add_file(self, tenant: str, filename: str, purpose: str, content: bytes | BinaryIO,
                 quota: int | None = None) -> dict[str, Any]:
        """Store a file (bytes, or a file object copied in chunks). ``quota``: QUOTA_EXCEEDED, nothing
        kept, when the tenant's files would pass it (batch outputs are stored without one: a batch's
        answers are never thrown away for space)."""
        file_id = f"file-{uuid.uuid4().hex}"
        folder = self.file_dir(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        used = self.usage(tenant) if quota is not None else 0
        target = folder / file_id
        size = 0
        with target.open("wb") as out:
            source = io.BytesIO(content) if isinstance(content, bytes) else content
            while chunk := source.read(1 << 20):
                size += len(chunk)
                if quota is not None and used + size > quota:
                    out.close()
                    target.unlink(missing_ok=True)
                    raise FleetError(ErrorCode.QUOTA_EXCEEDED, f"tenant {tenant} keeps {used:,} bytes of files; this one "
                                     f"would pass its quota of {quota:,}; delete files (DELETE /v1/files/{{id}})")
                out.write(chunk)
        meta = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        _write_json(folder / f"{file_id}.json", meta)
        return meta

    def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        self.file(tenant, file_id)  # NOT_FOUND unless it is this tenant's
        folder = self.file_dir(tenant)
        (folder / f"{file_id}.json").unlink(missing_ok=True)  # the file object first: it is gone to readers now
        (folder / file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def file(self, tenant: str, file_id: str) -> dict[str, Any]:
        path = self.file_dir(tenant) / f"{self._checked(file_id)}.json"
        if not path.exists():
            raise FleetError(ErrorCode.NOT_FOUND, f"no file {file_id} for tenant {tenant}")
        return json.loads(path.read_text())

    def file_path(self, tenant: str, file_id: str) -> Path:
        self.file(tenant, file_id)
        return self.file_dir(tenant) / file_id

    def files(self, tenant: str) -> list[dict[str, Any]]:
        folder = self.file_dir(tenant)
        return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda f: f["created_at"]) \
            if folder.exists() else []

    # -- batches -------------------------------------------------------------------------------
    def batch_dir(self, tenant: str, batch_id: str) -> Path:
        return self.root / "batches" / self._checked(tenant) / self._checked(batch_id)

    def batch(self, tenant: str, batch_id: str) -> dict[str, Any]:
        folder = self.batch_dir(tenant, batch_id)
        if not (folder / "batch.json").exists():
            raise FleetError(ErrorCode.NOT_FOUND, f"no batch {batch_id} for tenant {tenant}")
        batch = json.loads((folder / "batch.json").read_text())
        if batch["status"] in RUNNING and (folder / "cancel").exists():
            batch["status"] = "cancelling"  # a marker file: the runner's own writes never undo a cancel
        return batch

    def request_cancel(self, tenant: str, batch_id: str) -> None:
        """Atomic, like every write here: a runner reading the marker never sees it half written."""
        _write_json(self.batch_dir(tenant, batch_id) / "cancel", {"at": int(time.time())})

    def cancelled_at(self, tenant: str, batch_id: str) -> int:
        try:
            return int(json.loads((self.batch_dir(tenant, batch_id) / "cancel").read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return int(time.time())

    def cancel_requested(self, tenant: str, batch_id: str) -> bool:
        return (self.batch_dir(tenant, batch_id) / "cancel").exists()

    def save(self, tenant: str, batch: dict[str, Any]) -> None:
        _write_json(self.batch_dir(tenant, batch["id"]) / "batch.json", batch)

    def batches(self, tenant: str) -> list[dict[str, Any]]:
        folder = self.root / "batches" / self._checked(tenant)
        found = [json.loads(p.read_text()) for p in folder.glob("*/batch.json")] if folder.exists() else []
        return sorted(found, key=lambda b: b["created_at"], reverse=True)

    def unfinished(self) -> list[tuple[str, str]]:
        """(tenant, batch id) of every batch not yet in a final state (resumed at gateway start)."""
        found = []
        for path in (self.root / "batches").glob("*/*/batch.json"):
            if json.loads(path.read_text())["status"] in RUNNING:
                found.append((path.parent.parent.name, path.parent.name))
        return found


class InvalidBatch(Exception):
    """The input file as a whole cannot run (OpenAI's batch ``failed`` status, with ``errors``)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} line(s) refused")
        self.errors = errors


def new_batch(store: Store, tenant: str, input_file_id: str, endpoint: str, window: str,
              metadata: dict[str, str] | None) -> dict[str, Any]:
    store.file(tenant, input_file_id)  # NOT_FOUND unless this tenant uploaded it
    if endpoint not in ENDPOINTS:
        raise FleetError(ErrorCode.INVALID_INPUT, f"endpoint: {endpoint!r} is not served; use one of {list(ENDPOINTS)}")
    now = int(time.time())
    batch = {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
             "input_file_id": input_file_id, "completion_window": window, "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
             "expires_at": now + 86_400, "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or {}}
    store.batch_dir(tenant, batch["id"]).mkdir(parents=True)
    store.save(tenant, batch)
    return batch


# Fields of a /v1/tasks body that are the gateway's to set, never the line's: a batch runs at bulk
# priority whatever a body says (it must not reach the interactive queue, nor spend another
# tenant's share there), on behalf of the batch's tenant, timed by the gateway's clock.
GATEWAY_FIELDS = ("priority", "tenant", "submitted_at")


def fleet_request(endpoint: str, body: Any, to_task: Callable[[dict[str, Any], str], dict[str, Any]],
                  tenant: str) -> dict[str, Any]:
    """One input line's body as a bulk fleet request of ``tenant`` (``to_task``: the chat completions mapping)."""
    if not isinstance(body, dict):
        raise FleetError(ErrorCode.INVALID_INPUT, f"body: a JSON object, not {type(body).__name__}")
    if "custom_id" in body:
        raise FleetError(ErrorCode.INVALID_INPUT, "body.custom_id: custom_id belongs on the line, next to body, not "
                         "inside it")
    if endpoint == "/v1/chat/completions":
        return to_task(body, tenant)
    return {**{k: v for k, v in body.items() if k not in GATEWAY_FIELDS}, "priority": "bulk", "tenant": tenant}


class Runner:
    """Runs batches in threads of the gateway process, one per batch, and resumes unfinished ones."""

    def __init__(self, store: Store, client: FleetClient, to_task: Callable[[dict[str, Any], str], dict[str, Any]],
                 to_body: Callable[[str, dict[str, Any]], dict[str, Any]], lease_s: float = 30.0,
                 check_model: Callable[[str, str | None, str], None] | None = None,
                 new_client: Callable[[], FleetClient] | None = None) -> None:
        """``lease_s``: a replica that stops renewing its batch's lease (it died) loses the batch to
        another replica, or to its own restart, after this long. ``new_client``: each batch thread
        waits for results through a client of its own (Celery's result listener is not safe to share
        between threads: celery#4363, #6335); None: share ``client`` (tests with one batch)."""
        self.store, self.client, self.to_task, self.to_body = store, client, to_task, to_body
        self.new_client = new_client
        self.lease_s = lease_s
        self.check_model = check_model  # (tenant, model, task type): FleetError for a model the tenant may not use
        self.redis = client.registry.client
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()

    def start(self, tenant: str, batch_id: str) -> None:
        if batch_id in self._threads and self._threads[batch_id].is_alive():
            return
        thread = threading.Thread(target=self._run, args=(tenant, batch_id), name=f"batch-{batch_id}", daemon=True)
        self._threads[batch_id] = thread
        thread.start()

    def resume_all(self) -> None:
        for tenant, batch_id in self.store.unfinished():
            self.start(tenant, batch_id)

    def stop(self) -> None:
        """Gateway shutdown: batches stop submitting; their journals let the next start resume them."""
        self._stopping.set()

    def cancel(self, tenant: str, batch_id: str) -> dict[str, Any]:
        batch = self.store.batch(tenant, batch_id)
        if batch["status"] in RUNNING and batch["status"] != "cancelling":
            self.store.request_cancel(tenant, batch_id)
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            self.start(tenant, batch_id)  # a replica that does not hold the lease returns at once
        return batch

    # -- one batch -----------------------------------------------------------------------------
    def _take_lease(self, tenant: str, batch_id: str, me: str) -> bool:
        """The batch's lease, waiting out one a stopped replica left (it expires in lease_s);
        False when another live replica runs the batch, or it finished meanwhile."""
        key = LEASE_KEY.format(batch_id)
        deadline = time.monotonic() + 2 * self.lease_s
        while not self._stopping.is_set():
            if self.redis.set(key, me, nx=True, ex=max(1, int(self.lease_s))):
                return True
            if time.monotonic() > deadline or self.store.batch(tenant, batch_id)["status"] not in RUNNING:
                return False
            time.sleep(1.0)
        return False

    def _renew(self, batch_id: str, me: str, done: threading.Event) -> None:
        """Keep the lease while the batch runs, however long a wait inside the backfill takes."""
        key = LEASE_KEY.format(batch_id)
        while not done.wait(self.lease_s / 3):
            if self.redis.get(key) == me:
                self.redis.expire(key, max(1, int(self.lease_s)))

    def _run(self, tenant: str, batch_id: str) -> None:
        me, done = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:6]}", threading.Event()
        if not self._take_lease(tenant, batch_id, me):
            return
        threading.Thread(target=self._renew, args=(batch_id, me, done), daemon=True).start()
        try:
            self._run_leased(tenant, batch_id)
        except InvalidBatch as exc:  # nothing was submitted; the errors name the lines
            batch = self.store.batch(tenant, batch_id)
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": exc.errors[:100]})
            self.store.save(tenant, batch)
        except Exception:  # noqa: BLE001 - a batch that breaks is marked failed, the gateway lives on
            log.exception("batch %s failed", batch_id)
            batch = self.store.batch(tenant, batch_id)
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": [{"code": "INTERNAL", "message": "the batch runner failed; "
                                                             "see the gateway's log", "line": None}]})
            self.store.save(tenant, batch)
        finally:
            done.set()
            if self.redis.get(LEASE_KEY.format(batch_id)) == me:
                self.redis.delete(LEASE_KEY.format(batch_id))

    def _run_leased(self, tenant: str, batch_id: str) -> None:
        folder = self.store.batch_dir(tenant, batch_id)
        batch = self.store.batch(tenant, batch_id)
        source, out, errors = folder / "input.jsonl", folder / "out.jsonl", folder / "out.errors.jsonl"
        if not source.exists():  # validating (a torn conversion is redone: it writes both files afresh)
            total = self._convert(tenant, batch, source.with_suffix(".partial"), errors)
            source.with_suffix(".partial").replace(source)
            batch.update(status="cancelling" if self.store.cancel_requested(tenant, batch_id) else "in_progress",
                         in_progress_at=int(time.time()),
                         request_counts={"total": total, "completed": 0, "failed": _lines(errors)})
            self.store.save(tenant, batch)
        counts = batch["request_counts"]
        counts.update(completed=_lines(out), failed=_failed_lines(errors))
        last_save = [0.0]

        def settled(ok: bool) -> None:
            counts["completed" if ok else "failed"] += 1
            now = time.monotonic()
            if now - last_save[0] > 0.5:  # progress on disk at most twice a second
                last_save[0] = now
                self._save_counts(tenant, batch_id, counts)

        def cancelled() -> bool:
            return self._stopping.is_set() or self.store.cancel_requested(tenant, batch_id)

        if batch["status"] in ("in_progress", "cancelling"):
            client = self.new_client() if self.new_client is not None else self.client
            try:
                run_backfill(client, source, out, errors, on_settled=settled, cancelled=cancelled)
            finally:
                if client is not self.client:
                    client.close()
            if self._stopping.is_set() and not self.store.cancel_requested(tenant, batch_id):
                self._save_counts(tenant, batch_id, counts)
                return  # gateway shutdown: resumed by the next start
        batch = self.store.batch(tenant, batch_id)
        batch["request_counts"] = counts
        was_cancelled = self.store.cancel_requested(tenant, batch_id)
        if was_cancelled:
            batch["cancelling_at"] = self.store.cancelled_at(tenant, batch_id)
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        self.store.save(tenant, batch)
        self._finalize(tenant, batch, out, errors)
        final = "cancelled" if was_cancelled else "completed"
        batch.update(status=final, **{f"{final}_at": int(time.time())})
        self.store.save(tenant, batch)

    def _save_counts(self, tenant: str, batch_id: str, counts: dict[str, int]) -> None:
        batch = self.store.batch(tenant, batch_id)
        batch["request_counts"] = dict(counts)
        self.store.save(tenant, batch)

    def _convert(self, tenant: str, batch: dict[str, Any], source: Path, errors: Path) -> int:
        """The uploaded file as backfill input lines (``custom_id`` + fleet request). Every non-blank
        line yields exactly one line here: a valid request, or an INVALID_INPUT error line naming its
        line number and its custom_id when it has one (never an invented id that could shadow a real
        one). Nothing a line holds (not JSON, a 5,000-digit number, 3,000-deep nesting, a body of the
        wrong shape) fails more than that line. Returns the lines."""
        # JSONL lines end at "\n" alone (str.splitlines also splits at \x1e, \u2028 ... inside a line's text)
        raw = [line.rstrip("\r") for line in self.store.file_path(tenant, batch["input_file_id"]).read_text(
            errors="replace").split("\n")]
        total = 0
        ids: list[tuple[str, int]] = []
        with source.open("w") as good, errors.open("w") as bad:
            for number, line in enumerate(raw, 1):
                if not line.strip():
                    continue
                total += 1
                custom_id: str | None = _leading_custom_id(line)  # for the error line, if it cannot be read
                recorded = False
                try:
                    custom_id, entry = self._line_entry(line, number)
                    ids.append((custom_id, number))
                    recorded = True
                    good.write(json.dumps({**self._line_request(tenant, batch, entry), "custom_id": custom_id}) + "\n")
                except (ValueError, RecursionError, KeyError, TypeError, AttributeError, ValidationError,
                        FleetError) as exc:
                    error = _line_error(exc, number)
                    if custom_id is not None and not recorded:
                        ids.append((custom_id, number))  # a repeated id is a repeat even on a broken line
                    bad.write(json.dumps({"custom_id": custom_id, "line": number, "task_id": None, "status": "failed",
                                          "error": error.to_dict()}) + "\n")
        duplicates = [{"code": "duplicate_custom_id", "line": number, "message": (
                          f"custom_id {custom_id!r} is also on line {numbers[0]}; each request's custom_id must be "
                          "unique in the batch")}
                      for custom_id, numbers in repeated_ids(ids).items() for number in numbers[1:]]
        if duplicates:  # two answers under one id: the batch is refused whole, as OpenAI does
            raise InvalidBatch(sorted(duplicates, key=lambda error: error["line"]))
        return total

    @staticmethod
    def _line_entry(line: str, number: int) -> tuple[str, dict[str, Any]]:
        entry = json.loads(line, parse_int=_bounded_int)
        if not isinstance(entry, dict):
            raise FleetError(ErrorCode.INVALID_INPUT, f"line {number} is a JSON {type(entry).__name__}, not an object "
                             "{custom_id, method, url, body}")
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise FleetError(ErrorCode.INVALID_INPUT, f"line {number}: custom_id must be a non-empty string")
        return custom_id, entry

    def _line_request(self, tenant: str, batch: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get("url", batch["endpoint"]) != batch["endpoint"]:
            raise FleetError(ErrorCode.INVALID_INPUT, f"url: {entry.get('url')!r} differs from the batch's "
                             f"endpoint {batch['endpoint']}")
        request = fleet_request(batch["endpoint"], entry["body"], self.to_task, tenant)
        if self.check_model is not None:
            self.check_model(tenant, request.get("model"), str(request.get("task_type", "")))
        return request

    def _finalize(self, tenant: str, batch: dict[str, Any], out: Path, errors: Path) -> None:
        """The backfill's result lines in OpenAI's output / error file format, as files of the tenant."""
        ok_lines, bad_lines = [], []
        for line in _read(out):
            task_id = line["task_id"]
            ok_lines.append({"id": f"batch_req_{task_id}", "custom_id": line["custom_id"], "error": None,
                             "response": {"status_code": 200, "request_id": task_id,
                                          "body": self.to_body(batch["endpoint"], {"id": task_id, **line["result"]})}})
        for line in _read(errors):
            code = line["error"]["code"]  # the backfill reports a wait that ran out as TIMEOUT
            error = FleetError(code if code in ErrorCode.__members__ else ErrorCode.DEADLINE_EXCEEDED, line["error"]["message"])
            task_id = line.get("task_id") or line.get("custom_id") or f"line{line.get('line')}"
            bad_lines.append({"id": f"batch_req_{task_id}", "custom_id": line["custom_id"],
                              "response": {"status_code": error.http_status, "request_id": line.get("task_id"),
                                           "body": {"error": error.to_dict()}},
                              "error": {"code": str(error.code), "message": error.message}})
        if ok_lines:
            batch["output_file_id"] = self.store.add_file(tenant, f"{batch['id']}_output.jsonl", "batch_output",
                                                          _jsonl(ok_lines))["id"]
        if bad_lines:
            batch["error_file_id"] = self.store.add_file(tenant, f"{batch['id']}_error.jsonl", "batch_output",
                                                         _jsonl(bad_lines))["id"]


_LEADING_ID = re.compile(r'^\s*\{\s*"custom_id"\s*:\s*("(?:[^"\\]|\\.){1,512}")')
MAX_INT_DIGITS = 64


def _bounded_int(digits: str) -> int | float:
    """A JSON integer as read here: one too long to be a count of anything reads as infinity, which
    every numeric field refuses by name (Python's own reader raised for 4,300+ digits, and that one
    line failed the whole batch)."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float("inf")


def _leading_custom_id(line: str) -> str | None:
    """The custom_id of a line that starts ``{"custom_id": "..."`` even when the rest cannot be read
    (nested too deeply, cut short): its error line is then filed under the line's own id."""
    found = _LEADING_ID.match(line)
    if not found:
        return None
    try:
        value = json.loads(found.group(1))
    except ValueError:
        return None
    return value if isinstance(value, str) and value else None


def _line_error(exc: BaseException, number: int) -> FleetError:
    """What one bad input line gets, whatever broke on it."""
    if isinstance(exc, FleetError):
        return exc
    if isinstance(exc, ValidationError):
        return invalid_input(exc)
    if isinstance(exc, RecursionError):
        return FleetError(ErrorCode.INVALID_INPUT, f"line {number}: nested too deeply to read")
    if isinstance(exc, json.JSONDecodeError):
        return FleetError(ErrorCode.INVALID_INPUT, f"line {number} is not JSON ({exc.msg} at column {exc.colno}); "
                          "each line must be one JSON object")
    if isinstance(exc, KeyError):
        return FleetError(ErrorCode.INVALID_INPUT, f"line {number}: {exc} is missing; a line is "
                          "{custom_id, method, url, body}")
    return FleetError(ErrorCode.INVALID_INPUT, f"line {number}: not a batch request line ({type(exc).__name__}: "
                      f"{str(exc)[:200]})")


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a torn last line from a crash: the backfill waited for that request again
    return lines


def _lines(path: Path) -> int:
    return len(_read(path))


def _failed_lines(path: Path) -> int:
    """Error lines that count as failed requests: a request cancelled with its batch before it was
    answered is listed in the error file (code CANCELLED) but did not fail (OpenAI's request_counts)."""
    return sum(1 for line in _read(path) if line.get("error", {}).get("code") != ErrorCode.CANCELLED)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
