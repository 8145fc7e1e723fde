"""One tenant cannot hurt another: each finding of the hostile run, reproduced against a real gateway,
a real Redis and a real worker (the zero-cost echo engine: these tests are about the fleet's
machinery, not the answers), and shown fixed. docs/security.md lists each guarantee with its test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from producers.auth import Role, issue
from shared import fairqueue, webhook_urls
from shared.config import GatewayConfig
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_gateway import Gateway, gateway_env, start_gateway

pytestmark = pytest.mark.integration
ECHO = {"name": "echo", "model_name": "echo", "backend": "echo", "task_type": ["text_generation", "classification"],
        "quantize": {"method": "none"}, "processors": [{"name": "redact", "options": {"patterns": ["secret"]}}]}
# Configured, served by no worker, falling back to echo: a tenant allowed only "cheap" must not be
# answered by echo.
CHEAP = {"name": "cheap", "model_name": "cheap", "backend": "echo", "task_type": ["text_generation", "classification"],
         "quantize": {"method": "none"}, "fallbacks": ["echo"]}
HOOKS = {"attempts": 2, "timeout_s": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_in_flight_per_tenant": 4,
         "allowed_hosts": ["127.0.0.1"]}
TENANTS = {"cheapo": ["cheap"]}
LABELS = ["positive", "negative"]


@dataclass
class Setup:
    fleet: Fleet
    gateway: Gateway
    config: GatewayConfig
    tmp: Path

    def token(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue(self.config, tenant, Role.USER)}"}


def _gateway_for(fleet: Fleet, tmp: Path, **extra: str) -> tuple[Gateway, GatewayConfig]:
    env, config = gateway_env(fleet, tmp)
    env.update({"AUTOGLM_WEBHOOKS": json.dumps(HOOKS), "AUTOGLM_GATEWAY__FILES_DIR": str(tmp / "files"),
                "AUTOGLM_GATEWAY__TENANT_MODELS": json.dumps(TENANTS), **extra})
    return start_gateway(env, tmp), config


@pytest.fixture(scope="module")
def setup(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("tenants")
    with fleet_on(redis_url, models=[ECHO, CHEAP], webhooks=HOOKS, gateway={"tenant_models": TENANTS},
                  workers=[{"worker": {"models": ["echo"]}}]) as fleet:
        gateway, config = _gateway_for(fleet, tmp, AUTOGLM_GATEWAY__FILE_QUOTA_BYTES=str(64 * 1024),
                                       AUTOGLM_GATEWAY__MAX_BODY_BYTES=str(1024 * 1024))
        try:
            yield Setup(fleet, gateway, config, tmp)
        finally:
            gateway.stop()


def classify(tenant: str, priority: str = "bulk", **extra: Any) -> dict[str, Any]:
    return {"task_type": "classification", "text": "Fine.", "labels": LABELS, "model": "echo", "priority": priority,
            "tenant": tenant, **extra}


# -- 1. webhooks off the inference path ---------------------------------------------------------------
@dataclass
class Tarpit:
    """A callback receiver that accepts and never answers (``drip_s``: or sends a byte that often)."""

    drip_s: float | None = None
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}/hook"

    def _accept(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with self.lock:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
        try:
            conn.settimeout(self.drip_s or 120)
            if self.drip_s:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(60):
                    time.sleep(self.drip_s)
                    conn.sendall(b"x")
            else:
                while conn.recv(65536):
                    pass
        except OSError:
            with self.lock:
                self.closed_by_client += 1
        finally:
            conn.close()
            with self.lock:
                self.open_now -= 1


def test_hanging_callbacks_never_hold_the_inference_threads(setup: Setup) -> None:
    """Finding 1: 100 bulk tasks whose callbacks hang; another tenant's interactive requests are answered
    while they still hang, and the hanging tenant never has more than its share of deliveries open."""
    client = setup.fleet.client
    baseline = _latencies(client, 10)
    pit = Tarpit()
    url = pit.start()
    handles = client.submit_many([classify("hanger", callback_url=url) for _ in range(100)])
    for handle in handles:
        handle.result(timeout=60)
    deadline = time.monotonic() + 30
    while pit.open_now < HOOKS["max_in_flight_per_tenant"]:
        assert time.monotonic() < deadline, f"deliveries never reached the receiver ({pit.open_now} open)"
        time.sleep(0.05)
    during = _latencies(client, 20)
    still_hanging = pit.open_now
    print(f"\ninteractive p95 before {_p95(baseline):.3f}s, while 100 callbacks hang {_p95(during):.3f}s; "
          f"callbacks open at once: at most {pit.most_open}")
    assert still_hanging >= 1  # the answers came while callbacks were hanging
    assert pit.most_open <= HOOKS["max_in_flight_per_tenant"]  # one worker: the tenant's share, no more
    status = handles[0].callback() or {}
    assert status.get("status") in ("pending", "retrying", "failed")


def test_a_trickling_receiver_is_cut_at_the_attempt_deadline(setup: Setup) -> None:
    """Finding 1: one byte every second never trips a per-read timeout; the attempt's total deadline does."""
    pit = Tarpit(drip_s=1.0)
    handle = setup.fleet.client.submit(classify("trickler", callback_url=pit.start()))
    handle.result(timeout=60)
    deadline = time.monotonic() + 60
    while (handle.callback() or {}).get("status") != "failed":
        assert time.monotonic() < deadline, handle.callback()
        time.sleep(0.1)
    outcome = handle.callback() or {}
    assert outcome["attempts"] == str(HOOKS["attempts"]) and "no answer within 3s" in outcome["last_error"]
    while pit.open_now:  # the server notices a hang-up at its next byte
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert pit.closed_by_client == HOOKS["attempts"]  # the deliverer hung up each time, long before the drip ended


def _latencies(client: Any, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.monotonic()
        client.submit(classify("other", "interactive")).result(timeout=30)
        took.append(time.monotonic() - started)
    return took


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


# -- 2. the SSRF guard ----------------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "198.18.0.1",
                                     "[fd00:ec2::254]", "[::ffff:10.0.0.1]", "[64:ff9b::a00:1]", "169.254.169.254"])
def test_private_and_special_addresses_are_refused(setup: Setup, address: str) -> None:
    with pytest.raises(FleetError, match="callback_url") as caught:
        setup.fleet.client.submit(classify("ssrf", callback_url=f"http://{address}/hook"))
    assert caught.value.code == ErrorCode.INVALID_INPUT


def test_delivery_connects_to_the_address_it_checked(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2 (DNS rebinding): the name is resolved once; the connection goes to that address with
    the name as Host, so a second answer pointing elsewhere is never used."""
    import redis.asyncio as aioredis

    from shared.config import load_settings
    from workers.consumer.webhook_delivery import deliver

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.headers["host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # the second lookup would rebind to metadata
    lookups: list[str] = []

    def lookup(host: str, _: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    monkeypatch.setattr(webhook_urls, "_lookup", lookup)
    settings = load_settings(redis_url=redis_url, webhooks={"allowed_hosts": ["127.0.0.1"], "attempts": 1})

    async def run() -> None:
        client = aioredis.from_url(redis_url)
        async with httpx.AsyncClient() as http:
            await deliver(client, http, settings, "rebind-task", f"http://rebind.test:{port}/hook", b"{}")
        await client.aclose()

    asyncio.run(run())
    server.shutdown()
    assert lookups == ["rebind.test"] and seen == [f"rebind.test:{port}"]


# -- 3. batch lines stay bulk -----------------------------------------------------------------------------
def test_batch_lines_cannot_raise_their_priority(setup: Setup, tmp_path: Path) -> None:
    """Finding 3: a /v1/tasks line saying "interactive" is published on the bulk queue. The gateway here
    has queues no worker consumes, so what it published stays where it landed."""
    queues = {"interactive": {"name": f"nobody-i-{tmp_path.name[-6:]}", "rank": 0},
              "bulk": {"name": f"nobody-b-{tmp_path.name[-6:]}", "rank": 1}}
    gateway, config = _gateway_for(setup.fleet, tmp_path, AUTOGLM_QUEUES=json.dumps(queues))
    try:
        headers = {"Authorization": f"Bearer {issue(config, 'sneaky', Role.USER)}"}
        lines = "\n".join(json.dumps({"custom_id": f"c{n}", "method": "POST", "url": "/v1/tasks",
                                      "body": {**classify("someone-else", "interactive"), "submitted_at": 1.0}})
                          for n in range(12))
        uploaded = httpx.post(f"{gateway.url}/v1/files", headers=headers, files={"file": ("b.jsonl", lines.encode())},
                              data={"purpose": "batch"}, timeout=10).json()
        batch = httpx.post(f"{gateway.url}/v1/batches", headers=headers, timeout=10, json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/tasks", "completion_window": "24h"}).json()
        redis = setup.fleet.client.registry.client
        interactive, bulk = f"{queues['interactive']['name']}.echo", f"{queues['bulk']['name']}.echo"
        deadline = time.monotonic() + 30
        while fairqueue.queue_depth(redis, bulk) < 12:
            assert time.monotonic() < deadline, httpx.get(f"{gateway.url}/v1/batches/{batch['id']}", headers=headers).text
            time.sleep(0.1)
        assert fairqueue.queue_depth(redis, interactive) == 0
        assert redis.llen(fairqueue.tenant_key(bulk, "sneaky")) == 12  # the batch's tenant, not the body's
    finally:
        gateway.stop()


# -- 4. bodies bounded before auth ----------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _stream_body(url: str, path: str, total: int, headers: dict[str, str]) -> tuple[int, int]:
    """POST a chunked body of up to ``total`` bytes; (status, bytes sent) once the server answers."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Transfer-Encoding: chunked\r\n{head}\r\n".encode())
    chunk = b"[" + b"1," * (512 * 1024) + b"1]"
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    sock.setblocking(False)
    reply = b""
    try:
        while sent < total:
            try:
                reply += sock.recv(65536)
                if reply:
                    break
            except BlockingIOError:
                pass
            try:
                sock.sendall(frame)
                sent += len(chunk)
            except BlockingIOError:
                time.sleep(0.01)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(30)
    sock.setblocking(True)
    try:
        while b"\r\n\r\n" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    except OSError:
        pass
    sock.close()
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1") else 0, sent


def test_an_unauthenticated_300_mb_body_is_refused_before_it_is_read(setup: Setup) -> None:
    """Finding 4: no token, 300 MB streamed: 401 at once, the gateway's memory does not move."""
    pid = setup.gateway.process.pid
    before = _rss_mb(pid)
    status, sent = _stream_body(setup.gateway.url, "/v1/chat/completions", 300 * 2**20, {})
    after = _rss_mb(pid)
    print(f"\ngateway RSS {before:.0f} -> {after:.0f} MB; sent {sent / 2**20:.0f} MB before the 401")
    assert status == 401 and after < 200
    status, _ = _stream_body(setup.gateway.url, "/v1/files", 300 * 2**20, {})
    assert status == 401 and _rss_mb(pid) < 200
    assert not list((setup.tmp / "files").rglob("*")) or all(p.is_dir() for p in (setup.tmp / "files").rglob("*"))


def test_bodies_over_the_limit_are_refused_by_length_or_as_they_stream(setup: Setup) -> None:
    url, headers = setup.gateway.url, setup.token("big")
    declared = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (2 * 2**20), timeout=30,
                          headers={**headers, "content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    status, _ = _stream_body(url, "/v1/chat/completions", 300 * 2**20, headers)
    assert status == 413 and _rss_mb(setup.gateway.process.pid) < 200


def test_files_have_a_quota_and_can_be_deleted(setup: Setup) -> None:
    url, headers = setup.gateway.url, setup.token("hoarder")
    blob = ("x" * 40 * 1024).encode()
    first = httpx.post(f"{url}/v1/files", headers=headers, files={"file": ("a.jsonl", blob)}, data={"purpose": "batch"})
    assert first.status_code == 200, first.text
    second = httpx.post(f"{url}/v1/files", headers=headers, files={"file": ("b.jsonl", blob)}, data={"purpose": "batch"})
    assert second.status_code == 413 and second.json()["error"]["code"] == "QUOTA_EXCEEDED"
    gone = httpx.delete(f"{url}/v1/files/{first.json()['id']}", headers=headers)
    assert gone.status_code == 200 and gone.json() == {"id": first.json()["id"], "object": "file", "deleted": True}
    assert httpx.get(f"{url}/v1/files/{first.json()['id']}", headers=headers).status_code == 404
    again = httpx.post(f"{url}/v1/files", headers=headers, files={"file": ("b.jsonl", blob)}, data={"purpose": "batch"})
    assert again.status_code == 200


# -- 5. batch lines never lost or mislabelled ---------------------------------------------------------
def test_every_hostile_batch_line_gets_exactly_one_answer_under_its_own_id(setup: Setup) -> None:
    url, headers = setup.gateway.url, setup.token("hostile")

    def line(cid: str, **body: Any) -> str:
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/tasks",
                           "body": {k: v for k, v in classify("x").items() if k != "tenant"} | body})

    lines = [line("first"), "this is not json", line("line-2"), line("huge")[:-2] + ', "n": ' + "9" * 5000 + "}}",
             line("deep")[:-2] + ', "n": ' + "[" * 3000 + "]" * 3000 + "}}", line("inner-a", custom_id="shared"),
             line("inner-b", custom_id="shared"), line("last")]
    uploaded = httpx.post(f"{url}/v1/files", headers=headers, data={"purpose": "batch"},
                          files={"file": ("hostile.jsonl", "\n".join(lines).encode())}).json()
    batch = httpx.post(f"{url}/v1/batches", headers=headers, json={"input_file_id": uploaded["id"],
                       "endpoint": "/v1/tasks", "completion_window": "24h"}).json()
    deadline = time.monotonic() + 60
    while (batch := httpx.get(f"{url}/v1/batches/{batch['id']}", headers=headers).json())["status"] not in (
            "completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch["status"] == "completed", batch
    out = [json.loads(x) for x in httpx.get(f"{url}/v1/files/{batch['output_file_id']}/content", headers=headers).text.splitlines()]
    bad = [json.loads(x) for x in httpx.get(f"{url}/v1/files/{batch['error_file_id']}/content", headers=headers).text.splitlines()]
    answered = sorted(str(x["custom_id"]) for x in out + bad)
    assert sorted(x["custom_id"] for x in out) == ["first", "last", "line-2"]
    assert answered == sorted(["first", "None", "line-2", "huge", "deep", "inner-a", "inner-b", "last"])
    assert batch["request_counts"] == {"total": 8, "completed": 3, "failed": 5}


# -- 6. timestamps from callers -------------------------------------------------------------------------
def test_a_submitted_at_from_the_far_past_is_refused_everywhere(setup: Setup) -> None:
    url, headers = setup.gateway.url, setup.token("time-traveller")
    refused = httpx.post(f"{url}/v1/tasks", headers=headers, json={**classify("x"), "submitted_at": -1.7e308})
    assert refused.status_code == 422 and "submitted_at" in refused.json()["error"]["message"]
    # A raw message that bypasses every producer is refused by the worker, not measured.
    app, queue = setup.fleet.client.app, setup.fleet.settings.queue_name("interactive", "echo")
    raw = app.send_task("autoglm.classify", args=[{k: v for k, v in classify("x").items() if k != "task_type"}
                                                  | {"submitted_at": -1.7e308}], queue=queue, routing_key=queue)
    with pytest.raises(FleetError) as caught:
        setup.fleet.client.handle(raw.id).result(timeout=30)
    assert caught.value.code == ErrorCode.INVALID_INPUT and "submitted_at" in caught.value.message


# -- 7. entitlement holds for the model that answers ------------------------------------------------------
def test_a_tenant_is_never_answered_by_a_model_it_may_not_use(setup: Setup) -> None:
    client, settings = setup.fleet.client, setup.fleet.settings
    # The producer: with no worker for "cheap", an entitled tenant goes to its fallback's queue; cheapo does not.
    assert client.route(client.build(classify("anyone", "interactive", model="cheap"))) == \
        settings.queue_name("interactive", "echo")
    assert client.route(client.build(classify("cheapo", "interactive", model="cheap"))) == \
        settings.queue_name("interactive", "cheap")
    # The worker: a message for "cheap" that reached echo's queue anyway is not answered by echo for cheapo.
    queue = settings.queue_name("interactive", "echo")
    body = {k: v for k, v in classify("cheapo", "interactive", model="cheap").items() if k != "task_type"}
    raw = client.app.send_task("autoglm.classify", args=[body], queue=queue, routing_key=queue)
    with pytest.raises(FleetError) as caught:
        client.handle(raw.id).result(timeout=30)
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE
    fallback = client.submit(classify("anyone", "interactive", model="cheap")).result(timeout=30)
    assert fallback.model == "echo" and fallback.fallback_from == "cheap"  # others still get the fallback
    # The gateway never names models a tenant may not see.
    unknown = httpx.post(f"{setup.gateway.url}/v1/tasks", headers=setup.token("cheapo"),
                         json={**classify("x"), "model": "gpt-17"})
    assert unknown.status_code == 422 and "echo" not in unknown.json()["error"]["message"]


# -- 8. streams carry the processed text -------------------------------------------------------------------
def test_a_stream_never_shows_what_a_processor_removes(setup: Setup) -> None:
    client = setup.fleet.client
    whole = client.generate("my secret word", model="echo", timeout=30).output.text  # type: ignore[union-attr]
    streamed = "".join(client.stream("my secret word", model="echo", timeout=30))
    assert "secret" not in whole and "[redacted]" in whole and streamed == whole
    with httpx.stream("POST", f"{setup.gateway.url}/v1/chat/completions", headers=setup.token("sse"), timeout=30,
                      json={"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a secret"}]}) as sse:
        events = [json.loads(x[6:]) for x in sse.iter_lines() if x.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert "secret" not in text and "[redacted]" in text, events


# -- fair share between tenants inside a priority -------------------------------------------------------
def test_a_small_tenant_is_not_stuck_behind_a_large_backlog(setup: Setup) -> None:
    """Tenant A enqueues 2,000 bulk tasks, then tenant B enqueues 20: B's 20 finish before A's 1,000th.
    The worker stops taking bulk work while both are enqueued, so the whole of A's backlog is queued
    ahead of B's, as when A's backfill has been running for hours."""
    client, queue = setup.fleet.client, setup.fleet.settings.queue_name("bulk", "echo")
    mine: list[str] = []
    deadline = time.monotonic() + 60
    while len(mine) < setup.fleet.settings.worker_consumers:  # every consumer process is up (they start one by one)
        assert time.monotonic() < deadline, mine
        mine = [name for reply in client.app.control.ping(timeout=1) for name in reply
                if name.startswith(setup.fleet.worker.hostname_prefix)]
    stopped = client.app.control.cancel_consumer(queue, destination=mine, reply=True, timeout=10)
    assert len(stopped) == len(mine) == setup.fleet.settings.worker_consumers, (mine, stopped)
    try:
        big = client.submit_many([classify("tenant-a") for _ in range(2000)])
        small = client.submit_many([classify("tenant-b") for _ in range(20)])
    finally:
        client.app.control.add_consumer(queue, destination=mine, reply=True, timeout=10)
    for handle in small:
        handle.result(timeout=120)
    a_done = _answered(client, [h.id for h in big])
    print(f"\nwhen tenant B's 20 were all answered, tenant A had {a_done} of 2,000 answered")
    assert a_done < 1000
    for handle in big:
        handle.result(timeout=300)


def _answered(client: Any, ids: list[str]) -> int:
    """How many of these tasks have a stored outcome, read in one round trip (a snapshot)."""
    backend = client.app.backend
    stored = client.registry.client.mget([backend.get_key_for_task(i) for i in ids])
    return sum(raw is not None and backend.decode_result(raw)["status"] in ("SUCCESS", "FAILURE") for raw in stored)


def test_huge_chat_requests_are_refused_cheaply_and_leave_no_memory_behind(tiny_fleet: Fleet) -> None:
    """Finding 8: 2 MB chat requests (64 turns of 32,000 characters) cost a consumer seconds of CPU to
    tokenize before they were refused, and its memory grew 416 -> 1,079 MB over eight of them. Now a
    prefix is counted and the request refused; the worker's processes end where they started."""
    worker = psutil.Process(tiny_fleet.worker.process.pid)

    def rss_mb() -> float:
        return sum(p.memory_info().rss for p in [worker, *worker.children(recursive=True)]) / 2**20

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "lorem ipsum " * 2666} for i in range(63)]
    body = {"task_type": "text_generation", "messages": [*turns, {"role": "user", "content": "so?"}], "priority": "bulk"}
    tiny_fleet.client.generate("warm up", max_new_tokens=2, timeout=60)
    before = rss_mb()
    for _ in range(8):
        with pytest.raises(FleetError) as caught:
            tiny_fleet.client.submit(body).result(timeout=60)
        assert caught.value.code == ErrorCode.PROMPT_TOO_LONG and "first" in caught.value.message
    after = rss_mb()
    print(f"\nworker processes' RSS {before:.0f} -> {after:.0f} MB over eight 2 MB requests")
    assert after - before < 150
