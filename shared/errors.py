"""Stable error codes.

Errors are data: every failure that reaches a caller carries one of these codes, a message a person
can act on, whether retrying the same request may succeed, and the HTTP status a gateway maps it to.
Codes never change meaning once shipped; add new ones instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError


class ErrorCode(StrEnum):
    INVALID_INPUT = "INVALID_INPUT"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ENGINE_TRANSIENT = "ENGINE_TRANSIENT"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    WORKER_LOST = "WORKER_LOST"
    CANCELLED = "CANCELLED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class ErrorSpec:
    """What a code means to a caller: a default message, retry advice and an HTTP status."""

    message: str
    retryable: bool
    http_status: int


CATALOG: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_INPUT: ErrorSpec(
        "The request is malformed; fix the fields named in the message and resubmit.", False, 422
    ),
    ErrorCode.PROMPT_TOO_LONG: ErrorSpec(
        "The prompt plus max_new_tokens exceeds the model's context window; shorten the prompt "
        "or lower max_new_tokens.",
        False,
        413,
    ),
    ErrorCode.DEADLINE_EXCEEDED: ErrorSpec(
        "The request's deadline passed before it could run; submit again with a later deadline.",
        False,
        504,
    ),
    ErrorCode.RATE_LIMITED: ErrorSpec(
        "Too many requests for this tenant; retry after the indicated delay.", True, 429
    ),
    ErrorCode.MODEL_UNAVAILABLE: ErrorSpec(
        "The requested model is not loaded on any worker; check the model name or prepare it "
        "with `autoglm models prepare`.",
        True,
        503,
    ),
    ErrorCode.RESOURCE_EXHAUSTED: ErrorSpec(
        "The worker ran out of memory for this request; retry with a shorter input.", True, 503
    ),
    ErrorCode.ENGINE_TRANSIENT: ErrorSpec(
        "The inference engine hit a transient fault; retrying may succeed.", True, 503
    ),
    ErrorCode.BROKER_UNAVAILABLE: ErrorSpec(
        "The message broker (Redis) cannot be reached; check REDIS_URL and that Redis is up.",
        True,
        503,
    ),
    ErrorCode.WORKER_LOST: ErrorSpec(
        "The worker running this request died; it will be redelivered.", True, 503
    ),
    ErrorCode.CANCELLED: ErrorSpec("The request was cancelled by its producer before it ran.", False, 409),
    ErrorCode.UNAUTHENTICATED: ErrorSpec(
        "Missing, expired or invalid bearer token; get a token (`autoglm token issue`) and send "
        "`Authorization: Bearer <token>`.", False, 401
    ),
    ErrorCode.PERMISSION_DENIED: ErrorSpec("Your role does not allow this call.", False, 403),
    ErrorCode.NOT_FOUND: ErrorSpec("No such task for your tenant (or its result has expired).", False, 404),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(
        "The request body is larger than this route accepts; send less (the message names the limit).", False, 413
    ),
    ErrorCode.QUOTA_EXCEEDED: ErrorSpec(
        "Your tenant's storage quota is used up; delete files you no longer need (DELETE /v1/files/{id}).",
        False, 413
    ),
    ErrorCode.INTERNAL: ErrorSpec(
        "An unexpected error occurred in the fleet; report it with the task id.", False, 500
    ),
}


class FleetError(Exception):
    """An error with a stable code.

    The constructor takes only positional strings so Celery's JSON result backend can rebuild it
    on the caller's side (it stores ``exc_type``/``exc_module``/``exc_message`` and calls
    ``FleetError(*exc_message)``).
    """

    def __new__(cls, code: str, message: str | None = None) -> FleetError:  # noqa: ARG003
        # FleetError(code, ...) builds the code's own subclass, so callers can catch one kind.
        if cls is FleetError:
            cls = _BY_CODE.get(ErrorCode(code), FleetError)
        return super().__new__(cls)

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = message or CATALOG[self.code].message
        super().__init__(str(self.code), self.message)

    @property
    def retryable(self) -> bool:
        return CATALOG[self.code].retryable

    @property
    def http_status(self) -> int:
        return CATALOG[self.code].http_status

    def to_dict(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "retryable": self.retryable}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(FleetError): ...
class PromptTooLong(FleetError): ...
class DeadlineExceeded(FleetError): ...
class RateLimited(FleetError): ...
class ModelUnavailable(FleetError): ...
class ResourceExhausted(FleetError): ...
class EngineTransient(FleetError): ...
class BrokerUnavailable(FleetError): ...
class WorkerLost(FleetError): ...
class Cancelled(FleetError): ...
class Unauthenticated(FleetError): ...
class PermissionDenied(FleetError): ...
class NotFound(FleetError): ...
class PayloadTooLarge(FleetError): ...
class QuotaExceeded(FleetError): ...
class Internal(FleetError): ...


_BY_CODE: dict[ErrorCode, type[FleetError]] = {
    ErrorCode.INVALID_INPUT: InvalidInput,
    ErrorCode.PROMPT_TOO_LONG: PromptTooLong,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.MODEL_UNAVAILABLE: ModelUnavailable,
    ErrorCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    ErrorCode.ENGINE_TRANSIENT: EngineTransient,
    ErrorCode.BROKER_UNAVAILABLE: BrokerUnavailable,
    ErrorCode.WORKER_LOST: WorkerLost,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.UNAUTHENTICATED: Unauthenticated,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.PAYLOAD_TOO_LARGE: PayloadTooLarge,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
    ErrorCode.INTERNAL: Internal,
}


def as_fleet_error(exc: BaseException) -> FleetError:
    """Map any exception to a FleetError so nothing reaches a caller without a code."""
    if isinstance(exc, FleetError):
        return exc
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return FleetError(ErrorCode.RESOURCE_EXHAUSTED, f"{type(exc).__name__}: {exc}")
    return FleetError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def invalid_input(exc: ValidationError, limit: int = 5) -> FleetError:
    """INVALID_INPUT naming each bad field, e.g. ``max_new_tokens: Input should be >= 1``."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()[:limit]]
    return FleetError(ErrorCode.INVALID_INPUT, "; ".join(parts))
