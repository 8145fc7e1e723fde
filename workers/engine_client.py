"""A consumer's link to its engine core: start it, talk to it, notice when it dies, restart it.

Each Celery task thread gets its own ZMQ DEALER socket (sockets are not thread-safe; the core's
ROUTER routes each reply back to the socket that asked). A thread waits for its reply in short polls
and checks between them that the core is still the one it sent to: if the core died, the request is
gone with it and the task gets EngineLost, which the task turns into a requeue (never an ack), so
the message is delivered again once the restarted core is ready.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import msgpack
import zmq

from workers import protocol
from workers.batcher import BatchInfo
from workers.engine import Answer, Prepared
from workers.engine_core import HELLO

log = logging.getLogger(__name__)


class EngineLost(Exception):
    """The engine core died while (or before) it held this request; nothing was answered."""


class EngineClient:
    def __init__(self, ready_timeout_s: float = 900.0, poll_ms: int = 200) -> None:
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self.ready_timeout_s = ready_timeout_s
        self.poll_ms = poll_ms
        self.generation = 0
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.models: dict[str, Any] = {}
        self._start()
        self._monitor = threading.Thread(target=self._watch, name="engine-core-monitor", daemon=True)
        self._monitor.start()

    # -- the core process ------------------------------------------------------------------------
    def _start(self) -> None:
        """Start a core, wait for its hello (models loaded), then let requests through."""
        address = f"ipc://{tempfile.gettempdir()}/autoglm-core-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        process = subprocess.Popen([sys.executable, "-m", "workers.engine_core", address, str(os.getpid())])
        hello = self._ctx.socket(zmq.DEALER)
        hello.connect(address)
        try:
            hello.send(HELLO)
            waited = 0.0
            while not hello.poll(500):
                waited += 0.5
                if process.poll() is not None or waited > self.ready_timeout_s:
                    process.kill()
                    raise EngineLost(f"engine core exited with {process.returncode} before it was ready")
            self.models = msgpack.unpackb(hello.recv())
        finally:
            hello.close(linger=0)
        with self._lock:
            self.process, self.address = process, address
            self.generation += 1
        log.info("engine core pid %d ready on %s (generation %d)", process.pid, address, self.generation)
        self._ready.set()

    def _watch(self) -> None:
        while not self._closing:
            process = self.process
            assert process is not None
            process.wait()
            if self._closing:
                return
            self._ready.clear()
            log.error("engine core pid %d exited with %s; its requests are requeued; restarting it",
                      process.pid, process.returncode)
            try:
                self._start()
            except EngineLost:
                log.exception("engine core failed to start; retrying in 1 s")
                time.sleep(1.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- requests ---------------------------------------------------------------------------------
    def _socket(self) -> tuple[zmq.Socket, int]:
        sock, generation = getattr(self._local, "sock", None), getattr(self._local, "generation", -1)
        if sock is None or generation != self.generation:
            if sock is not None:
                sock.close(linger=0)
            with self._lock:
                sock, generation = self._ctx.socket(zmq.DEALER), self.generation
                sock.connect(self.address)
            self._local.sock, self._local.generation = sock, generation
        return sock, generation

    def infer(self, model: str, prepared: Prepared, priority: int, traceparent: str = "") -> tuple[Answer, BatchInfo]:
        """Send one prepared request to the core and wait for its batch; raises the request's
        FleetError, or EngineLost when the core died before answering."""
        if not self._ready.wait(self.ready_timeout_s):
            raise EngineLost("engine core not ready")
        sock, generation = self._socket()
        request_id = uuid.uuid4().bytes
        sock.send(protocol.pack_request(request_id, model, priority, traceparent, prepared))
        while True:
            if sock.poll(self.poll_ms):
                reply_id, outcome, info = protocol.unpack_reply(sock.recv())
                if reply_id != request_id:
                    continue  # a reply to an earlier request of this thread that was given up
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome, info  # type: ignore[return-value]
            if generation != self.generation or not self.alive():
                raise EngineLost(f"engine core (generation {generation}) died with this request in it")

    def close(self) -> None:
        self._closing = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._ctx.destroy(linger=0)
