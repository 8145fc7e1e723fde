"""Every answer the gateway gives to hostile input is JSON with an error code, never a 5xx; a Redis
outage is a coded 503 with Retry-After, and a hung Redis never stalls the event loop."""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from producers.auth import Role, issue
from producers.gateway import create_app
from shared.broker import EmbeddedRedis
from shared.config import GatewayConfig, load_settings
from shared.errors import ErrorCode
from tests.integration.test_gateway import start_gateway

pytestmark = pytest.mark.integration
SECRET = "hostile-secret-" + "z" * 32
CODES = {str(code) for code in ErrorCode}
# Tokens no field accepts (non-finite numbers, integers past any bound, nesting past any parser) ...
INVALID_ANYWHERE = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", str(10**400), str(-(10**400)),
                    "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000]
# ... and type confusions some fields accept (a valid chat request must not be generated: with no
# worker behind this gateway it would wait out max_wait_s and answer 504 by design).
HOSTILE = [*INVALID_ANYWHERE, '"\\ud800"', "true", "null", "[]", "{}", '"' + "x" * 40_000 + '"']
CLASSIFY = {"task_type": "classification", "text": "Great.", "labels": ["positive", "negative"], "priority": "bulk"}
GENERATE = {"task_type": "text_generation", "prompt": "Hi", "max_new_tokens": 4, "temperature": 0.5, "top_p": 0.9,
            "deadline": 4102444800, "priority": "bulk"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "n": 1,
        "stream": False, "user": "u", "stop": ["x"]}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def _settings(url: str, tmp: Path | None = None):  # noqa: ANN202
    suffix = uuid.uuid4().hex[:6]
    return load_settings(
        redis_url=url,
        queues={"interactive": {"name": f"hostile-{suffix}-i", "rank": 0}, "bulk": {"name": f"hostile-{suffix}-b", "rank": 1}},
        gateway={"jwt_secret": SECRET, "max_wait_s": 0.2,
                 "rate_limits": {"interactive": {"rate_per_s": 1000, "burst": 100000}, "bulk": {"rate_per_s": 1000, "burst": 100000}}},
    )


@pytest.fixture(scope="module")
def client(redis_server: EmbeddedRedis) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(redis_server.url)), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer " + issue(GatewayConfig(jwt_secret=SECRET), "fuzzer", Role.ADMIN)
        yield c


def _with_hostile(base: dict, key: str, token: str) -> bytes:
    """``base`` with ``key`` (a field, a nested field, or a new one) set to a raw JSON token."""
    body = json.loads(json.dumps(base))
    target, name = body, key
    if key.startswith("messages.0."):
        target, name = body["messages"][0], key.split(".", 2)[2]
    target[name] = "__HOSTILE__"
    return json.dumps(body).replace('"__HOSTILE__"', token).encode()


def assert_coded(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    data = response.json()  # every answer is JSON
    if response.status_code >= 400:
        error = data["error"]
        assert error["code"] in CODES and isinstance(error["message"], str) and isinstance(error["retryable"], bool), data


bodies = st.one_of(
    st.tuples(st.sampled_from([CLASSIFY, GENERATE]), st.sampled_from([*GENERATE, *CLASSIFY, "unknown_field"]),
              st.sampled_from(HOSTILE)).map(lambda t: ("/v1/tasks", _with_hostile(*t))),
    st.tuples(st.just(CHAT), st.sampled_from([*CHAT, "messages.0.content", "messages.0.role", "messages.0.extra",
                                              "logit_bias", "unknown_field"]),
              st.sampled_from(INVALID_ANYWHERE)).map(lambda t: ("/v1/chat/completions", _with_hostile(*t))),
    st.tuples(st.sampled_from(["/v1/tasks", "/v1/chat/completions"]),
              st.one_of(st.binary(max_size=64), st.sampled_from([b"\xff\xfe\xfd", b'{"text": "\xc3\x28"}', b"", b"{"]))),
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies)
def test_hostile_bodies_get_coded_json_errors_never_a_5xx(client: TestClient, route_body: tuple[str, bytes]) -> None:
    route, body = route_body
    assert_coded(client.post(route, content=body, headers={"Content-Type": "application/json"}))


@hsettings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["/v1/tasks/{id}?wait={v}", "/v1/admin/dlq?limit={v}", "/v1/tasks/{v}"]),
       st.one_of(st.sampled_from(HOSTILE[:8] + ["", "-1", "%00", "%ff%fe"]), st.text(max_size=20)))
def test_hostile_paths_and_queries_get_coded_json_errors(client: TestClient, template: str, value: str) -> None:
    url = template.format(id=uuid.uuid4().hex, v=quote(value, safe="%"))
    for method in ("GET", "DELETE") if "/v1/tasks/" in template else ("GET",):
        assert_coded(client.request(method, url))


def test_unknown_routes_methods_and_auth_failures_are_coded(client: TestClient) -> None:
    for response in (client.get("/nope"), client.put("/v1/tasks"), client.post("/v1/tasks", headers={"Authorization": "Bearer x"})):
        assert response.status_code in (401, 404, 405)
        assert_coded(response)


def test_chat_completions_refuses_unknown_fields_by_name(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"1": 2}})
    assert r.status_code == 422 and "logit_bias" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2})
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_INPUT" and "n" in r.json()["error"]["message"]


def test_a_nan_deadline_is_refused(client: TestClient) -> None:
    r = client.post("/v1/tasks", content=_with_hostile(CLASSIFY, "deadline", "NaN"), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "deadline" in r.json()["error"]["message"]


def test_a_redis_outage_is_a_coded_503_and_healthz_never_waits_behind_the_dlq(tmp_path: Path) -> None:
    with EmbeddedRedis() as server:
        settings = _settings(server.url)
        env = {"REDIS_URL": server.url, "AUTOGLM_QUEUES": json.dumps({k.value: v.model_dump() for k, v in settings.queues.items()}),
               "AUTOGLM_GATEWAY__JWT_SECRET": SECRET}
        gw = start_gateway(env, tmp_path)
        headers = {"Authorization": "Bearer " + issue(GatewayConfig(jwt_secret=SECRET), "ops", Role.ADMIN)}
        try:
            os.kill(server.pid, signal.SIGSTOP)  # a hung Redis: connections open, nothing answers
            dlq: dict[str, httpx.Response] = {}
            waiter = threading.Thread(target=lambda: dlq.update(r=httpx.get(f"{gw.url}/v1/admin/dlq", headers=headers, timeout=60)))
            waiter.start()
            latencies = []
            probe = httpx.Client(timeout=10)  # one client: a new one per call costs ~40 ms of its own
            while waiter.is_alive() and len(latencies) < 200:
                started = time.perf_counter()
                health = probe.get(f"{gw.url}/healthz")
                latencies.append(time.perf_counter() - started)
                assert health.status_code == 503 and health.json()["error"]["code"] == "BROKER_UNAVAILABLE"
            waiter.join(60)
            assert len(latencies) >= 3, "the DLQ call did not wait on the hung Redis"
            assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, latencies
            assert dlq["r"].status_code == 503 and dlq["r"].json()["error"]["code"] == "BROKER_UNAVAILABLE"
            os.kill(server.pid, signal.SIGCONT)
            server.stop()  # now a refused connection
            body = {"task_type": "classification", "text": "x", "labels": ["a", "b"]}
            for response in (httpx.post(f"{gw.url}/v1/tasks", json=body, headers=headers, timeout=60),
                             httpx.get(f"{gw.url}/v1/tasks/{uuid.uuid4().hex}", headers=headers, timeout=60)):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "BROKER_UNAVAILABLE"
                assert int(response.headers["retry-after"]) >= 1
        finally:
            if server.pid:
                os.kill(server.pid, signal.SIGCONT)
            gw.process.kill()
            gw.process.wait(10)


def test_json_sent_as_form_data_is_told_to_say_content_type_json(client: TestClient) -> None:
    """curl's -d without a header sends form data: the README's own example once failed this way
    with "body: Input should be a valid dictionary", which does not say what to change."""
    body = json.dumps(CLASSIFY).encode()
    r = client.post("/v1/tasks", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_INPUT"
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert "x-www-form-urlencoded" in r.json()["error"]["message"]
    r = client.post("/v1/tasks", content=body, headers={"Content-Type": ""})  # none at all: FastAPI is strict too
    assert r.status_code == 422 and "sent none" in r.json()["error"]["message"]
    assert client.post("/v1/tasks", content=body, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 202


def test_a_body_that_is_not_json_says_so_and_where(client: TestClient) -> None:
    r = client.post("/v1/tasks", content=b'{"task_type": "classification", "text": "x"', headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.startswith("the request body is not valid JSON") and "character 43" in message  # 0-based: the end of the 43 bytes
    r = client.post("/v1/tasks", content=b"[]", headers={"Content-Type": "application/json"})  # JSON, wrong shape
    assert r.status_code == 422 and "Content-Type" not in r.json()["error"]["message"]
