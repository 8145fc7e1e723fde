"""When Redis is gone: producers give up within their budget with BROKER_UNAVAILABLE, and a
stopped embedded broker takes its server with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from celery.backends.redis import RedisBackend

from producers.client import FleetClient
from shared.broker import EmbeddedRedis, NotReplicated
from shared.config import load_settings
from shared.errors import ErrorCode, FleetError
from shared.queues import make_celery

pytestmark = pytest.mark.integration
REQUEST = {"task_type": "classification", "text": "fine", "labels": ["yes", "no"]}


@pytest.mark.parametrize("call", ["submit", "submit_many"])
def test_publishing_into_an_outage_raises_broker_unavailable_within_the_budget(call: str) -> None:
    server = EmbeddedRedis().start()
    settings = load_settings(redis_url=server.url)
    client = FleetClient(server.url, settings)
    client.submit(REQUEST)  # connected and subscribed before the outage
    server.stop()
    started = time.monotonic()
    with pytest.raises(FleetError) as caught:
        client.submit(REQUEST) if call == "submit" else client.submit_many([REQUEST] * 5)
    took = time.monotonic() - started
    assert caught.value.code == ErrorCode.BROKER_UNAVAILABLE and caught.value.retryable
    assert caught.value.__cause__ is not None  # the transport's own error, chained for whoever debugs it
    assert took < settings.broker.publish_budget_s + 3, took  # a bound on giving up, not a speed target


@pytest.mark.parametrize("call", ["submit", "submit_many"])
def test_a_publish_no_replica_confirms_is_not_accepted(redis_url: str, call: str) -> None:
    """broker.min_replicas_acked: 1 on a Redis with no replica: the write reaches the master, WAIT
    sees no replica confirm it, so the submit is retried and then refused, never reported accepted."""
    settings = load_settings(redis_url=redis_url, broker={"min_replicas_acked": 1, "replica_ack_timeout_s": 0.05,
                                                          "publish_budget_s": 1.0})
    client = FleetClient(redis_url, settings)
    try:
        with pytest.raises(FleetError) as caught:
            client.submit(REQUEST) if call == "submit" else client.submit_many([REQUEST] * 5)
    finally:
        client.close()
    assert caught.value.code == ErrorCode.BROKER_UNAVAILABLE and caught.value.retryable
    assert "0 of 1 replicas confirmed" in str(caught.value.__cause__) + str(caught.value.__cause__.__cause__)


def test_a_state_the_result_backend_stores_waits_for_replicas_too(redis_url: str) -> None:
    """A failure's state is stored by Celery's backend, not the ledger: with min_replicas_acked it
    also counts only once replicas confirm it (retried by Celery's backend policy, then raised)."""
    settings = load_settings(redis_url=redis_url, broker={"min_replicas_acked": 1, "replica_ack_timeout_s": 0.05})
    backend = make_celery(settings, redis_url).backend
    with pytest.raises(NotReplicated):
        backend.set("celery-task-meta-outage-test", "{}", max_retries=1)
    assert type(make_celery(load_settings(redis_url=redis_url), redis_url).backend) is RedisBackend  # 0: Celery's own


def test_sigterm_to_autoglm_broker_stops_its_server() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "autoglm.cli", "broker"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        url = line.split()[0].removeprefix("REDIS_URL=")
        assert redis.Redis.from_url(url).ping()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    finally:
        proc.kill()


@pytest.mark.parametrize("transport", ["workers.consumer.transport:Transport", "redis"])
def test_a_channel_closed_after_its_connection_was_released_raises_only_a_connection_error(
        redis_url: str, transport: str) -> None:
    """What a worker meets when Redis restarts: Celery closes the lost connection, and the channel's
    close builds a new pool to restore the messages it holds after the connection was released.
    Stock kombu raises AttributeError there (Celery: "Unrecoverable error", the worker exits); ours
    raises a connection error, which Celery ignores before it reconnects."""
    from kombu import Connection
    from kombu.common import ignore_errors

    conn = Connection(redis_url, transport=transport)
    queue = conn.SimpleQueue(f"released-{transport}")
    queue.put([[], {}, {}], headers={"task": "autoglm.classify", "id": "released-1"})  # a Celery-shaped message
    queue.get(timeout=5)  # delivered, not acked: the close tries to restore it
    channel = queue.channel
    channel._disconnect_pools()  # the state a lost connection leaves
    channel.connection.client = None  # released
    if transport == "redis":
        with pytest.raises(AttributeError, match="hostname"):
            ignore_errors(conn, channel.close)
    else:
        ignore_errors(conn, channel.close)  # nothing escapes
        with pytest.raises(conn.connection_errors):
            channel._connparams()
