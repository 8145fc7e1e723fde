"""The dead-letter queue: requests the fleet could not serve, kept with their error history.

A Redis list (``autoglm:dlq``) of JSON entries, so any producer or operator can inspect it; the
original message (task name, request, queue, task id) is kept so `autoglm dlq requeue` can publish
it again under the same task id, and the original caller's handle sees the new result.

Messages that never were a valid task (bytes that are not a kombu envelope, a body that does not
decode) are put here by the worker's transport (workers/consumer/transport.py) with ``raw`` (the message as
it was on the queue) and ``reason``; they have no request to requeue.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared.broker import redis_client

DLQ_KEY = "autoglm:dlq"


class DeadLetters:
    def __init__(self, redis_url: str, master_name: str | None = None) -> None:
        # Raw bytes: a malformed message's body is kept as it was, which need not be UTF-8.
        self.client = redis_client(redis_url, decode=False, master_name=master_name)

    def push(self, task_id: str, task_name: str, request: Any, queue: str, error: dict[str, Any],
             history: list[dict[str, Any]], deliveries: int) -> None:
        self.client.rpush(DLQ_KEY, encode_entry(task_id, task_name, request, queue, error, history, deliveries))

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        return [decode_entry(raw) for raw in self.client.lrange(DLQ_KEY, 0, limit - 1)]

    def __len__(self) -> int:
        return int(self.client.llen(DLQ_KEY))

    def requeue(self, app: Any, task_ids: set[str] | None = None) -> list[str]:
        """Publish entries again (all, or those ids) under their original task ids; returns the ids."""
        requeued = []
        for raw in self.client.lrange(DLQ_KEY, 0, -1):
            entry = decode_entry(raw)
            if task_ids is not None and entry["task_id"] not in task_ids:
                continue
            if not entry.get("task_name") or entry.get("request") is None:
                continue  # a malformed message: nothing that could run
            app.send_task(entry["task_name"], args=[entry["request"]], task_id=entry["task_id"],
                          queue=entry["queue"], routing_key=entry["queue"])
            self.client.lrem(DLQ_KEY, 1, raw)
            requeued.append(entry["task_id"])
        return requeued

    def purge(self) -> int:
        count = len(self)
        self.client.delete(DLQ_KEY)
        return count

    def close(self) -> None:
        self.client.close()


def encode_entry(task_id: str | None, task_name: str | None, request: Any, queue: str, error: dict[str, Any],
                 history: list[dict[str, Any]], deliveries: int, **extra: Any) -> str:
    """One DLQ entry (``extra``: e.g. a malformed message's ``raw`` body and ``reason``)."""
    entry = {"task_id": task_id, "task_name": task_name, "request": request, "queue": queue, "error": error,
             "history": history, "deliveries": deliveries, "dead_at": time.time(), **extra}
    return json.dumps(entry, default=str)


def decode_entry(raw: bytes) -> dict[str, Any]:
    return json.loads(raw.decode("utf-8", "replace"))
