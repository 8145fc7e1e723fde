"""One path for every error the gateway answers: ``{"error": {"code", "message", "retryable"}}``.

FastAPI's own handlers answer ``{"detail": ...}`` without a code, and its 422 handler echoes the
offending input, which cannot be serialised when it is NaN or Infinity (a plain-text 500). Here
validation errors name the field and the problem, never the value; Redis failures are 503
BROKER_UNAVAILABLE with Retry-After; anything unexpected is a coded 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from shared.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)
BROKER_RETRY_AFTER_S = 2
STATUS_CODES = {400: ErrorCode.INVALID_INPUT, 401: ErrorCode.UNAUTHENTICATED, 403: ErrorCode.PERMISSION_DENIED,
                404: ErrorCode.NOT_FOUND, 405: ErrorCode.INVALID_INPUT, 413: ErrorCode.PAYLOAD_TOO_LARGE,
                415: ErrorCode.INVALID_INPUT, 422: ErrorCode.INVALID_INPUT, 429: ErrorCode.RATE_LIMITED,
                503: ErrorCode.BROKER_UNAVAILABLE}


def error_response(error: FleetError, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        headers = {**(headers or {}), "Retry-After": str(retry_after)}
    return JSONResponse({"error": error.to_dict()}, status_code=status or error.http_status, headers=headers)


def _declares_json(content_type: str) -> bool:
    """As FastAPI (strict content type, its default) decides whether to parse a body as JSON."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def validation_message(exc: RequestValidationError, limit: int = 5, content_type: str | None = None) -> str:
    """``body.max_new_tokens: Input should be a finite number; ...``: where and what, never the value.

    Two whole-body mistakes get a sentence of their own, because the field-level text ("body.47:
    JSON decode error", "body: Input should be a valid dictionary") does not say what to change: a
    body that is not JSON, and JSON sent without saying so (curl's ``-d`` sends form data).
    """
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            position = (err.get("loc") or ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            return f"the request body is not valid JSON ({reason} at character {position}); send one JSON object"
    if content_type is not None and not _declares_json(content_type) and any(
            tuple(err.get("loc", ())) == ("body",) for err in errors):
        return (f"the request body must be a JSON object sent with `Content-Type: application/json`; this request "
                f"{'said ' + repr(content_type) if content_type else 'sent none'} (curl's -d sends form data unless given -H 'Content-Type: application/json')")
    parts = []
    for err in errors[:limit]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def too_large(limit: int) -> FleetError:
    return FleetError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over this route's limit of {limit:,} bytes; "
                      "send less (batch files: split them)")


def broker_unavailable(detail: object) -> FleetError:
    error = FleetError(ErrorCode.BROKER_UNAVAILABLE, f"the broker (Redis) did not answer: {detail}; retry shortly")
    error.retry_after = BROKER_RETRY_AFTER_S  # type: ignore[attr-defined]
    return error


def install(app: FastAPI) -> None:
    @app.exception_handler(FleetError)
    async def _fleet(_: Request, exc: FleetError) -> JSONResponse:
        if exc.code == ErrorCode.BROKER_UNAVAILABLE and not getattr(exc, "retry_after", None):
            exc.retry_after = BROKER_RETRY_AFTER_S  # type: ignore[attr-defined]
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = validation_message(exc, content_type=request.headers.get("content-type", ""))
        return error_response(FleetError(ErrorCode.INVALID_INPUT, message))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, ErrorCode.INTERNAL)
        limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
        if exc.status_code == 413 and limit:  # Starlette's body limit cut a streamed body off
            return error_response(too_large(limit))
        return error_response(FleetError(code, str(exc.detail)), status=exc.status_code, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def _nested(_: Request, __: RecursionError) -> JSONResponse:
        return error_response(FleetError(ErrorCode.INVALID_INPUT, "the JSON body is nested too deeply"))

    @app.exception_handler(RedisError)
    @app.exception_handler(OperationalError)
    @app.exception_handler(TimeoutError)
    async def _broker(_: Request, exc: Exception) -> JSONResponse:
        return error_response(broker_unavailable(f"{type(exc).__name__}: {exc}"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected gateway error")
        return error_response(FleetError(ErrorCode.INTERNAL, f"{type(exc).__name__}; report it with the time of the call"))
