"""Delivering completion webhooks: a Celery task per delivery, on the fleet's webhook queue.

Why a task: a delivery published with the task's outcome survives a worker killed before it is
made (acks_late, like any task), and it never holds up the message that produced it. Retries run
with tenacity, per ``webhooks`` config (attempts, backoff); connection errors, timeouts, 5xx, 408 and
429 are retried, any other 4xx is final (the receiver refused it). Each attempt's outcome is kept
in Redis (``shared.webhooks.OUTCOME_KEY``), where the task's status shows it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from shared import webhooks
from shared.errors import FleetError

log = logging.getLogger(__name__)
RETRIED_STATUSES = {408, 429}


class Undelivered(Exception):
    """This attempt did not deliver; another may."""


def outcome(task_id: str, result: dict[str, Any] | None, error: FleetError | None) -> dict[str, Any]:
    """What a receiver gets: the task's id and state, and its result or its error."""
    return {"id": task_id, "status": "SUCCESS" if error is None else "FAILURE", "result": result,
            "error": error.to_dict() if error is not None else None}


def record(ctx: Any, task_id: str, **fields: Any) -> None:
    key = webhooks.OUTCOME_KEY.format(task_id=task_id)
    pipe = ctx.ledger.client.pipeline(transaction=False)
    pipe.hset(key, mapping={**{k: str(v) for k, v in fields.items()}, "updated_at": f"{time.time():.3f}"})
    pipe.expire(key, ctx.settings.broker.result_expires_s)
    pipe.execute()


def deliver(ctx: Any, task_id: str, url: str, payload: dict[str, Any]) -> None:
    config = ctx.settings.webhooks
    try:
        webhooks.check_url(url, config.allowed_hosts)  # again: DNS may have changed since submission
    except FleetError as exc:
        record(ctx, task_id, status="refused", attempts=0, last_error=exc.message)
        return
    body = json.dumps(payload, separators=(",", ":")).encode()
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        timestamp = int(time.time())
        headers = {"content-type": "application/json", webhooks.TIMESTAMP: str(timestamp), webhooks.TASK_ID: task_id}
        if config.secret:
            headers[webhooks.SIGNATURE] = webhooks.sign(config.secret, timestamp, body)
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=config.timeout_s, follow_redirects=False)
        except httpx.HTTPError as exc:
            record(ctx, task_id, status="retrying", attempts=attempts, last_error=f"{type(exc).__name__}: {exc}")
            raise Undelivered(str(exc)) from exc
        if response.status_code < 300:
            record(ctx, task_id, status="delivered", attempts=attempts, last_status=response.status_code, last_error="")
            return
        record(ctx, task_id, status="retrying", attempts=attempts, last_status=response.status_code,
               last_error=f"HTTP {response.status_code}")
        if response.status_code >= 500 or response.status_code in RETRIED_STATUSES:
            raise Undelivered(f"HTTP {response.status_code}")
        raise PermissionError(f"HTTP {response.status_code}")  # the receiver refused it: final

    try:
        Retrying(stop=stop_after_attempt(config.attempts), retry=retry_if_exception_type(Undelivered), reraise=True,
                 wait=wait_exponential_jitter(initial=config.backoff_initial_s, max=config.backoff_max_s, jitter=0.1))(attempt)
    except (Undelivered, PermissionError) as exc:
        record(ctx, task_id, status="failed", attempts=attempts, last_error=str(exc))
        log.warning("webhook for task %s not delivered after %d attempts: %s", task_id, attempts, exc)
