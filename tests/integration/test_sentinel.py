"""The fleet through Redis Sentinel: every part (producer, worker transport, result backend, ledger,
registry) reaches the master the sentinels name, and finds the new one after a failover.

All servers run on 127.0.0.1, started here: a master, two replicas and three sentinels
(`redis-server --sentinel`); skipped where redis-server is not installed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on, free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (Sentinel) on PATH")]
MASTER = "autoglm"
LABELS = ["positive", "negative"]


@dataclass
class Group:
    """A master, its replicas and three sentinels watching them."""

    folder: Path
    servers: dict[int, subprocess.Popen] = field(default_factory=dict)
    sentinels: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinels) + "/0"

    def master_port(self) -> int:
        _, port = redis.Redis(port=self.sentinels[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def start(self, replicas: int = 2) -> Group:
        master = self._server()
        for _ in range(replicas):
            self._server("--replicaof", "127.0.0.1", str(master))
        for _ in range(3):
            port = free_port()
            conf = self.folder / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor {MASTER} 127.0.0.1 {master} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 5000\n"
                            f"sentinel parallel-syncs {MASTER} 2\n")
            self.servers[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
            self.sentinels.append(port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # replicas in sync, every sentinel sees them all
            try:
                info = redis.Redis(port=master).info("replication")
                seen = [len(redis.Redis(port=s).sentinel_slaves(MASTER)) for s in self.sentinels]
                if info.get("connected_slaves") == replicas and min(seen) == replicas:
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise AssertionError("the Sentinel group did not come up")

    def _server(self, *args: str) -> int:
        port = free_port()
        self.servers[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--dbfilename", f"dump-{port}.rdb", *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                return port
            except redis.ConnectionError:
                assert time.monotonic() < deadline, f"redis-server on {port} did not start"
                time.sleep(0.05)

    def kill(self, port: int) -> None:
        self.servers[port].send_signal(signal.SIGKILL)
        self.servers[port].wait()

    def stop(self) -> None:
        for process in self.servers.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    running = Group(tmp_path_factory.mktemp("sentinel")).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def sentinel_fleet(group: Group, tiny_model: dict) -> Iterator[Fleet]:
    with fleet_on(group.url, models=[tiny_model], broker={"master_name": MASTER}) as fleet:
        yield fleet


def classify(text: str) -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "priority": "bulk"}


def test_every_part_works_through_sentinel(sentinel_fleet: Fleet, group: Group) -> None:
    handles = sentinel_fleet.client.submit_many(classify(f"Review {i}: fine.") for i in range(20))
    handles.append(sentinel_fleet.client.submit_generate("Say hi.", max_new_tokens=4, priority="interactive"))
    assert all(h.result(timeout=120) for h in handles)
    master = redis.Redis(port=group.master_port())
    assert master.exists(f"autoglm:task:{handles[0].id}")  # the ledger wrote to the master the sentinels name
    assert sentinel_fleet.client.handle("no-such-task").status() == "UNKNOWN"


def test_after_the_master_is_killed_the_fleet_serves_again_through_the_new_one(sentinel_fleet: Fleet, group: Group) -> None:
    """Asynchronous replication: what the old master had not shipped may be lost (a figure, printed);
    what is guaranteed here is that every part finds the new master by itself and the fleet serves."""
    old = group.master_port()
    before = sentinel_fleet.client.submit_many(classify(f"Before {i}: good.") for i in range(50))
    group.kill(old)
    killed_at = time.monotonic()
    while True:  # submits either succeed or raise BROKER_UNAVAILABLE within their budget, never hang
        started = time.monotonic()
        try:
            after = sentinel_fleet.client.submit(classify("After the failover: great."))
            break
        except FleetError as exc:
            assert exc.code == ErrorCode.BROKER_UNAVAILABLE
            assert time.monotonic() - started < sentinel_fleet.settings.broker.publish_budget_s + 5
        assert time.monotonic() - killed_at < 30, "no new master accepted a task within 30 s of the kill"
    assert after.result(timeout=60).output.label in LABELS  # type: ignore[union-attr]
    assert group.master_port() != old
    served_s = time.monotonic() - killed_at
    answered = 0
    for handle in before:
        try:
            answered += bool(handle.result(timeout=30))
        except (FleetError, TimeoutError):
            pass
    print(f"failover: a new task answered {served_s:.1f} s after the master's kill; "
          f"{answered}/50 tasks accepted before the kill answered (no WAIT: replication is asynchronous)")
