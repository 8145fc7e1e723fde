"""A consumer's link to its engine core: a thread waiting for an answer learns of the core's death
from the kernel (a pidfd), not from a poll that wakes it five times a second."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest
import zmq

from shared.schemas import GenerateRequest
from workers import wire
from workers.consumer.core_client import EngineClient, EngineLost
from workers.wire import HELLO, PreparedGenerate


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only; elsewhere the wait polls")
def test_a_thread_waiting_on_a_core_that_dies_is_told_at_once_however_long_its_poll() -> None:
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the "core" whose pid is watched
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    address = f"ipc:///tmp/autoglm-test-{uuid.uuid4().hex[:8]}"
    router.bind(address)
    received = threading.Event()

    def fake_core() -> None:
        """Answers the hello with the sleeping process's pid, then takes the request and never answers."""
        identity, data = router.recv_multipart()
        assert data == HELLO
        router.send_multipart([identity, wire.encode(wire.Hello(core.pid, {}))])
        router.recv_multipart()
        received.set()

    threading.Thread(target=fake_core, daemon=True).start()
    client = EngineClient(address, poll_ms=600_000)  # a poll would look again only after ten minutes
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            client.infer("m", PreparedGenerate(GenerateRequest(prompt="hi", max_new_tokens=4), [1, 2]), 1)
        except BaseException as exc:  # noqa: BLE001 - the test reads what it was
            outcome.append(exc)

    waiter = threading.Thread(target=ask, daemon=True)
    try:
        waiter.start()
        assert received.wait(30), "the request never reached the core"
        core.kill()
        core.wait()
        waiter.join(60)  # a liveness bound, not a timing: the poll alone would take ten minutes
        assert not waiter.is_alive(), "the waiting thread did not notice the core's death"
        assert len(outcome) == 1 and isinstance(outcome[0], EngineLost)
    finally:
        core.kill()
        client.close()
        router.close(linger=0)
        ctx.term()
