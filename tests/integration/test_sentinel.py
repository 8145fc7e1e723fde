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

from producers.client import FleetClient, TaskHandle
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on, free_port
from workers.consumer.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.beside,
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

    def _server(self, *args: str, port: int | None = None) -> int:
        port = port or free_port()
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

    def rejoin(self, port: int) -> None:
        """Start a killed server again on its port, as a replica of the current master, and wait until
        the master has every replica again (the group is whole for the next failover)."""
        master = self.master_port()
        self.servers.pop(port)
        self._server("--replicaof", "127.0.0.1", str(master), port=port)
        want = len(self.servers) - len(self.sentinels) - 1
        deadline = time.monotonic() + 30
        while redis.Redis(port=master).info("replication").get("connected_slaves") != want:
            assert time.monotonic() < deadline, "the killed server did not rejoin as a replica"
            time.sleep(0.2)

    def replicas(self) -> list[int]:
        master = self.master_port()
        return [port for port in self.servers if port not in self.sentinels and port != master]

    def restart_sentinel(self, port: int) -> None:
        """A killed sentinel again, from its own config file (which it keeps up to date)."""
        conf = self.folder / f"sentinel-{port}.conf"
        self.servers[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).sentinel_get_master_addr_by_name(MASTER)
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, f"sentinel {port} did not start"
                time.sleep(0.1)

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


# Failovers are quick here: a worker's held messages come back 4 s after it lost them, not 15.
BROKER = {"master_name": MASTER, "min_replicas_acked": 1, "visibility_timeout_s": 4, "heartbeat_s": 1,
          "restore_interval_s": 1}
SUBMITS = 2000


@pytest.fixture(scope="module")
def sentinel_fleet(group: Group, tiny_model: dict) -> Iterator[Fleet]:
    with fleet_on(group.url, models=[tiny_model], broker=BROKER, faults={"fail_marker": "POISON"}) as fleet:
        yield fleet


def classify(text: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "priority": priority}


def test_every_part_works_through_sentinel(sentinel_fleet: Fleet, group: Group) -> None:
    handles = sentinel_fleet.client.submit_many(classify(f"Review {i}: fine.") for i in range(20))
    handles.append(sentinel_fleet.client.submit_generate("Say hi.", max_new_tokens=4, priority="interactive"))
    assert all(h.result(timeout=120) for h in handles)
    master = redis.Redis(port=group.master_port())
    assert master.exists(f"autoglm:task:{handles[0].id}")  # the ledger wrote to the master the sentinels name
    assert sentinel_fleet.client.handle("no-such-task").status() == "UNKNOWN"
    poisoned = sentinel_fleet.client.submit(classify("POISON"))  # a failure is stored by Celery's backend
    with pytest.raises(FleetError) as failed:  # (shared/result_backend.py: it waits for a replica too)
        poisoned.result(timeout=60)
    assert failed.value.code == ErrorCode.INTERNAL


def test_a_replica_and_a_sentinel_killed_cost_no_accepted_task(sentinel_fleet: Fleet, group: Group) -> None:
    """One replica of two and one sentinel of three killed: every publish still gets its one replica's
    confirmation (min_replicas_acked 1), and a client that starts now finds the master through the
    sentinels left (the one it names first is the dead one)."""
    replica, sentinel = group.replicas()[0], group.sentinels[0]
    group.kill(replica)
    group.kill(sentinel)
    client = FleetClient(group.url, sentinel_fleet.settings)
    try:
        handles = client.submit_many(classify(f"Review {i}: solid.") for i in range(50))
        handles.append(client.submit(classify("One more: fine.", "interactive")))
        assert all(h.result(timeout=60).output.label in LABELS for h in handles)  # type: ignore[union-attr]
    finally:
        client.close()
        group.restart_sentinel(sentinel)
        group.rejoin(replica)
    ledger = Ledger(group.url, 60, master_name=MASTER)
    assert [ledger.counts(h.id).get("executions") for h in handles] == [1] * len(handles)


@dataclass
class Failover:
    accepted: list[TaskHandle]
    refused: int
    served_s: float  # from the kill to the first task accepted after it being answered
    slowest_submit_s: float
    submit_s: float  # all SUBMITS together


def submit_through_a_failover(client: FleetClient, group: Group, budget_s: float) -> Failover:
    """SUBMITS tasks one after another; the master is SIGKILLed half-way. A submit either returns
    (accepted) or raises BROKER_UNAVAILABLE within its budget; the first task accepted after the
    kill is an interactive one (the bulk backlog does not stand before it) and is waited for, which
    times how soon the fleet serves new requests again."""
    accepted: list[TaskHandle] = []
    refused, served_s, slowest, killed_at, began = 0, -1.0, 0.0, 0.0, time.monotonic()
    for i in range(SUBMITS):
        if i == SUBMITS // 2:
            group.kill(group.master_port())
            killed_at = time.monotonic()
        started = time.monotonic()
        try:
            probe = bool(killed_at) and served_s < 0
            handle = client.submit(classify(f"Review {i}: it works.", "interactive" if probe else "bulk"))
        except FleetError as exc:
            assert exc.code == ErrorCode.BROKER_UNAVAILABLE, exc
            refused += 1
            continue
        finally:
            slowest = max(slowest, time.monotonic() - started)
        accepted.append(handle)
        if killed_at and served_s < 0:
            assert handle.result(timeout=30)
            served_s = time.monotonic() - killed_at
    assert slowest < budget_s + 5, f"a submit took {slowest:.1f} s, past its budget"
    return Failover(accepted, refused, served_s, slowest, time.monotonic() - began)


def answered(handles: list[TaskHandle], patience_s: float) -> list[TaskHandle]:
    """The handles whose task was answered, waiting until ``patience_s`` passes with no new answer."""
    waiting, done = list(handles), []
    last_news = time.monotonic()
    while waiting and time.monotonic() - last_news < patience_s:
        states = [(h, h.status()) for h in waiting]
        newly = [h for h, state in states if state == "SUCCESS"]
        if newly:
            done, last_news = done + newly, time.monotonic()
        waiting = [h for h, state in states if state != "SUCCESS"]
        time.sleep(0.5)
    return done


def test_with_min_replicas_acked_every_accepted_task_survives_the_masters_kill_and_is_answered_once(
        sentinel_fleet: Fleet, group: Group) -> None:
    old = group.master_port()
    run = submit_through_a_failover(sentinel_fleet.client, group, sentinel_fleet.settings.broker.publish_budget_s)
    assert group.master_port() != old
    assert 0 <= run.served_s < 30, f"the fleet served again {run.served_s:.1f} s after the kill"
    for handle in run.accepted:  # every accepted task answered...
        assert handle.result(timeout=60).output.label in LABELS  # type: ignore[union-attr]
    ledger = Ledger(group.url, 60, master_name=MASTER)
    executions = [ledger.counts(h.id).get("executions", 0) for h in run.accepted]
    assert executions == [1] * len(run.accepted)  # ...and computed exactly once
    print(f"failover with min_replicas_acked 1: {len(run.accepted)} accepted, {run.refused} refused with "
          f"BROKER_UNAVAILABLE, every accepted answered once; served again {run.served_s:.1f} s after the kill; "
          f"slowest submit {run.slowest_submit_s:.1f} s, {SUBMITS} submits in {run.submit_s:.1f} s")
    group.rejoin(old)


@pytest.mark.slow
def test_without_replica_acks_a_failover_may_lose_accepted_tasks_how_many_is_reported(
        sentinel_fleet: Fleet, group: Group) -> None:
    """Asynchronous replication: what the old master had not shipped is lost with it. A figure
    (printed), not an assertion: on one machine the replicas are rarely behind. `make test-all` runs
    it (a second 2,000-task failover, ~30 s): what `make test` asserts about a failover, the test
    above asserts with the guarantee on."""
    settings = sentinel_fleet.settings.model_copy(
        update={"broker": sentinel_fleet.settings.broker.model_copy(update={"min_replicas_acked": 0})})
    client = FleetClient(group.url, settings)
    try:
        run = submit_through_a_failover(client, group, settings.broker.publish_budget_s)
        lost = len(run.accepted) - len(answered(run.accepted, patience_s=15))
    finally:
        client.close()
    assert run.served_s < 30
    print(f"failover with min_replicas_acked 0: {len(run.accepted)} accepted, {run.refused} refused, "
          f"{lost} accepted tasks lost; served again {run.served_s:.1f} s after the kill")
