"""Celery's Redis result backend, with every state it stores confirmed by replicas when
``broker.min_replicas_acked`` asks for it.

Why: a task's answer is recorded by the ledger (with WAIT), but a *failure* is stored by Celery's
backend itself; without WAIT a failover right after a task failed could lose that state while the
task's message is already acked, and its caller would read STARTED until the result expired. Used
only when ``min_replicas_acked`` > 0 (``shared/queues.py`` names it in the backend URL, Celery's
``module:Class+url`` form); a write fewer replicas confirm counts as a lost connection, so Celery's
own result-backend retry policy (``result_backend_always_retry``) retries it.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

from shared.broker import NotReplicated, replicated

#: the Celery setting this backend reads (set by make_celery from broker.min_replicas_acked)
SETTING = "autoglm_min_replicas_acked"
TIMEOUT_SETTING = "autoglm_replica_ack_timeout_s"


class ReplicatedRedisBackend(RedisBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_errors = (*self.connection_errors, NotReplicated)
        self.min_replicas_acked = int(self.app.conf.get(SETTING) or 0)
        self.replica_ack_timeout_s = float(self.app.conf.get(TIMEOUT_SETTING) or 1.0)

    def _set(self, key: str, value: Any, expires: int | None = None) -> None:
        """Celery's write (the state, and a PUBLISH for whoever waits on it), then WAIT."""
        expires = self.expires if expires is None else expires
        with self.client.pipeline(transaction=False) as pipe:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            replicated(pipe, self.min_replicas_acked, self.replica_ack_timeout_s)


class ReplicatedSentinelBackend(ReplicatedRedisBackend, SentinelBackend):
    """The same through Redis Sentinel."""
