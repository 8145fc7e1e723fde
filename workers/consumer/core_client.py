"""A consumer's link to its engine core: start it (or attach to it), talk to it, notice when it dies.

One worker = one engine core + ``worker.consumers`` Celery consumer processes. The first consumer
owns the core: it starts it at a fixed address and restarts it there when it dies. The others attach
to that address (``worker.engine_address``) and watch the core's pid from its hello.

Each Celery task thread gets its own ZMQ DEALER socket (sockets are not thread-safe; the core's
ROUTER routes each reply back to the socket that asked). A thread waits for its reply and for the
core's exit at once (a Linux pidfd, readable when the process exits; elsewhere short polls that
check the core is alive): if the core died, the request is gone with it and the task gets
EngineLost, which the task turns into a requeue (never an ack), so the message is delivered again
once the restarted core is ready. Why not poll: a waiting thread woke five times a second, and on a
CPU worker every wake-up of a process beside the decoding threads delays a decoding step (bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from workers import wire
from workers.lifecycle import EngineCoreProcess
from workers.wire import HELLO, Answer, BatchInfo, Prepared

log = logging.getLogger(__name__)


# With a pidfd the waits need no timeout; this one only bounds how late a closing client is noticed.
WATCH_S = 5.0


class EngineLost(Exception):
    """The engine core died while (or before) it held this request; nothing was answered."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _exit_fd(pid: int) -> Iterator[int | None]:
    """A descriptor that becomes readable when process ``pid`` exits (Linux pidfd), closed after
    the block; None where there is none (another OS, an old kernel, the process already gone)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


class EngineClient:
    def __init__(self, address: str | None = None, ready_timeout_s: float = 900.0, poll_ms: int = 200,
                 core: EngineCoreProcess | None = None) -> None:
        """``address``: attach to the core listening there; else own ``core`` (a process already
        started, or one to start here) and restart it when it dies."""
        if (address is None) == (core is None):
            raise ValueError("give either the address of a core to attach to or the core to own")
        self.core = core
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self.owner = core is not None  # the owner starts and restarts the core; others attach
        self.address = core.address if core is not None else address  # type: ignore[assignment]
        self.ready_timeout_s = ready_timeout_s
        self.poll_ms = poll_ms
        self.generation = 0
        self.process: subprocess.Popen | None = None
        self.core_pid = 0
        self.models: dict[str, Any] = {}
        self._start()
        self._monitor = threading.Thread(target=self._watch, name="engine-core-monitor", daemon=True)
        self._monitor.start()

    # -- the core process ------------------------------------------------------------------------
    def _start(self) -> None:
        """(Owner: start a core, then) wait for the core's hello (models loaded), then let requests through."""
        process = None
        if self.core is not None:  # the first time it may already be running (started early)
            running = self.core.process is not None and self.core.process.poll() is None and self.generation == 0
            process = self.core.process if running else self.core.start()
        hello = self._ctx.socket(zmq.DEALER)
        hello.connect(self.address)
        try:
            hello.send(HELLO)
            waited = 0.0
            while not hello.poll(500):
                waited += 0.5
                exited = process is not None and process.poll() is not None
                if exited or waited > self.ready_timeout_s or self._closing:
                    if process is not None:
                        process.kill()
                    raise EngineLost(f"engine core at {self.address} did not become ready "
                                     f"({'exited with %s' % process.returncode if exited else 'no hello'})")
            reply = wire.decode_hello(hello.recv())
        finally:
            hello.close(linger=0)
        with self._lock:
            self.process, self.core_pid, self.models = process, reply.pid, reply.models
            self.generation += 1
        log.info("engine core pid %d ready on %s (generation %d%s)", self.core_pid, self.address, self.generation,
                 "" if self.owner else ", attached")
        self._ready.set()

    def _wait_for_exit(self) -> None:
        if self.process is not None:
            self.process.wait()
            return
        with _exit_fd(self.core_pid) as exit_fd:
            while not self._closing and _pid_alive(self.core_pid):
                if exit_fd is None:
                    time.sleep(0.1)
                elif select.select([exit_fd], [], [], WATCH_S)[0]:
                    return

    def _watch(self) -> None:
        while not self._closing:
            self._wait_for_exit()
            if self._closing:
                return
            self._ready.clear()
            with self._lock:
                self.generation += 1  # every thread waiting on the dead core gives up now
            log.error("engine core pid %d exited; its requests are requeued; %s", self.core_pid,
                      "restarting it" if self.owner else "waiting for its owner to restart it")
            while not self._closing:
                try:
                    self._start()
                    break
                except EngineLost:
                    log.exception("engine core failed to become ready; retrying in 1 s")
                    time.sleep(1.0)
                except zmq.ZMQError:
                    if self._closing:
                        return  # close() destroyed the context under this restart attempt
                    raise

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.core_pid > 0 and _pid_alive(self.core_pid)

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

    def infer(self, model: str, prepared: Prepared, rank: int, traceparent: str = "",
              task_id: str = "") -> tuple[Answer, BatchInfo]:
        """Send one prepared request to the core and wait for its batch; raises the request's
        FleetError, or EngineLost when the core died before answering."""
        waited = 0.0
        while not self._ready.wait(1.0):
            waited += 1.0
            if self._closing or waited >= self.ready_timeout_s:
                raise EngineLost("engine core not ready")
        sock, generation = self._socket()
        request_id = uuid.uuid4().bytes
        with _exit_fd(self.core_pid) as exit_fd:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if exit_fd is not None:
                poller.register(exit_fd, zmq.POLLIN)
            sock.send(wire.encode(wire.request(request_id, model, rank, traceparent, prepared, task_id)))
            while True:
                ready = dict(poller.poll(self.poll_ms if exit_fd is None else int(WATCH_S * 1000)))
                if sock in ready:
                    reply_id, outcome, info = wire.decode_reply(sock.recv())
                    if reply_id != request_id:
                        continue  # a reply to an earlier request of this thread that was given up
                    if isinstance(outcome, BaseException):
                        raise outcome
                    return outcome, info  # type: ignore[return-value]
                if exit_fd in ready or generation != self.generation or not self.alive():
                    raise EngineLost(f"engine core (generation {generation}) died with this request in it")

    def close(self) -> None:
        self._closing = True
        if self.owner and self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._ctx.destroy(linger=0)
