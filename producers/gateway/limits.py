"""Who may send a body, and how much, decided before a byte of it is read (pure ASGI middleware).

FastAPI reads and parses a route's body (JSON, or a multipart upload spooled to a temp file)
before the route's dependencies run, so a check in a dependency comes too late: a 300 MB JSON body
with no token was read whole (gateway RSS 88 -> 984 MB) before its 401, and a 300 MB upload was
written to disk first. Here, for every ``/v1/`` request that carries a body:

1. the bearer token is verified first: no valid token, 401 at once, the body never read;
2. a declared ``Content-Length`` over the route's limit is refused (413 PAYLOAD_TOO_LARGE) at once;
3. a body without one (chunked) is counted as it streams in and cut off at the limit, by
   Starlette's own ``RequestBodyLimitResponder`` (413, answered by errors.py as PAYLOAD_TOO_LARGE
   naming the limit).

The principal found in step 1 is kept in the request's state, so the route's own auth dependency
does not verify the token twice. Limits: ``gateway.max_file_bytes`` for uploads (POST /v1/files),
``gateway.max_body_bytes`` for everything else.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from producers.auth import verify
from producers.gateway.errors import too_large
from shared.config import GatewayConfig
from shared.errors import ErrorCode, FleetError

UPLOAD_PATH = "/v1/files"
BODY_METHODS = {"POST", "PUT", "PATCH"}


def limit_for(config: GatewayConfig, method: str, path: str) -> int:
    return config.max_file_bytes if method == "POST" and path.rstrip("/") == UPLOAD_PATH else config.max_body_bytes


async def _answer(send: Send, error: FleetError, status: int | None = None) -> None:
    body = json.dumps({"error": error.to_dict()}).encode()
    # Connection: close - the unread body must not be taken for the next request on this connection.
    await send({"type": "http.response.start", "status": status or error.http_status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    def __init__(self, app: ASGIApp, config: GatewayConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authorization = headers.get("authorization", "")
        if not authorization.lower().startswith("bearer "):
            await _answer(send, FleetError(ErrorCode.UNAUTHENTICATED))
            return
        try:
            principal = verify(authorization.split(" ", 1)[1].strip(), self.config)
        except FleetError as exc:
            await _answer(send, exc)
            return
        scope.setdefault("state", {})["principal"] = principal
        limit = limit_for(self.config, scope["method"], scope["path"])
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _answer(send, too_large(limit))
            return
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)


def install(app: Any, config: GatewayConfig) -> None:
    app.add_middleware(BodyLimits, config=config)
