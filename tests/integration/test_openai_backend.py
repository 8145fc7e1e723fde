"""The ``openai`` backend against real HTTP servers started here.

- The happy path goes through a real OpenAI-compatible server: this project's own gateway in front of
  a second fleet (its own worker with the bundled model). The local worker loads no model at all: it
  serves the alias ``remote`` by forwarding batches to that gateway.
  Its classification uses the gateway's own /v1/tasks (``classification: autoglm``): the bundled 135M
  model does not answer a chat question with a bare label.
- A scripted HTTP server on loopback gives what the real one cannot on demand: always 429 with
  Retry-After, always 503, slower than the backend's timeout, or a fixed chat answer ("Negative.",
  for ``classification: chat``), so each mapping is checked exactly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producers.auth import Role, issue
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_fleet import CLEAR_REVIEWS
from tests.integration.test_gateway import gateway_env, start_gateway

pytestmark = pytest.mark.integration
LABELS = ["positive", "negative"]
BIG_LIMITS = {"interactive": {"rate_per_s": 1000, "burst": 1000}, "bulk": {"rate_per_s": 1000, "burst": 1000}}


class Scripted(BaseHTTPRequestHandler):
    """/limited: 429 + Retry-After 1; /down: 503; /slow: answers after 2 s; /chatty: "Negative.".
    Records each call's time."""

    calls: dict[str, list[float]] = {}

    def do_POST(self) -> None:  # noqa: N802
        kind = self.path.strip("/").split("/")[0]
        self.calls.setdefault(kind, []).append(time.monotonic())
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if kind == "slow":
            time.sleep(2.0)
        status, headers = {"limited": (429, {"Retry-After": "1"}), "down": (503, {"Retry-After": "0"})}.get(kind, (200, {}))
        body = json.dumps({"error": {"message": f"scripted {status}"}} if status != 200 else
                          {"choices": [{"message": {"content": "Negative." if kind == "chatty" else "late"},
                                        "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}).encode()
        try:
            self.send_response(status)
            for key, value in {**headers, "content-type": "application/json", "content-length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except BrokenPipeError:
            pass  # /slow: the backend gave up first, as it should

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Remote:
    fleet: Fleet  # the local fleet, whose worker has only openai-backed models
    scripted: dict[str, list[float]]


@pytest.fixture(scope="module")
def remote(fleet: Fleet, redis_url: str, settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("openai-backend")
    stub = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_url = f"http://127.0.0.1:{stub.server_address[1]}"
    # the remote side: the session's real fleet, behind a gateway of its own
    env, config = gateway_env(fleet, tmp)
    gateway = start_gateway({**env, "AUTOGLM_GATEWAY__RATE_LIMITS": json.dumps(BIG_LIMITS)}, tmp)
    token = issue(config, "upstream-worker", Role.USER)
    real = settings.models[0].name

    def openai_model(name: str, base_url: str, **extra: object) -> dict:
        options = {"base_url": base_url, "api_key_env": "REMOTE_TOKEN", "remote_model": real, "timeout_s": 120}
        return {"name": name, "model_name": real, "backend": "openai", "task_type": ["text_generation", "classification"],
                "options": {**options, **extra.pop("options", {})}, **extra}  # type: ignore[dict-item]

    models = [
        openai_model("remote", f"{gateway.url}/v1", options={"classification": "autoglm"}),
        openai_model("chatty", f"{stub_url}/chatty/v1"),
        openai_model("limited", f"{stub_url}/limited/v1"),
        openai_model("down", f"{stub_url}/down/v1", fallbacks=["remote"]),
        openai_model("slow", f"{stub_url}/slow/v1", options={"timeout_s": 0.3}),
    ]
    policies = {"RATE_LIMITED": {"action": "retry", "attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 5.0},
                "ENGINE_TRANSIENT": {"action": "retry", "attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
                "MODEL_UNAVAILABLE": {"action": "fallback"}}
    try:
        with fleet_on(redis_url, env={"REMOTE_TOKEN": token}, models=models, policies=policies,
                      worker={"consumers": 1}) as local:
            yield Remote(local, Scripted.calls)
    finally:
        gateway.stop()
        stub.shutdown()


def test_generation_is_answered_by_the_remote_server(remote: Remote) -> None:
    result = remote.fleet.client.generate("What is the capital of France?", max_new_tokens=16, model="remote", timeout=300)
    assert result.model == "remote" and "Paris" in result.output.text  # type: ignore[union-attr]
    assert result.usage.completion_tokens > 0


def test_classification_is_answered_by_the_remote_server_in_batches(remote: Remote) -> None:
    handles = remote.fleet.client.submit_many(
        {"task_type": "classification", "text": text, "labels": LABELS, "model": "remote"} for text, _ in CLEAR_REVIEWS)
    results = [h.result(timeout=300) for h in handles]
    assert all(r.model == "remote" and r.output.label in LABELS for r in results)  # type: ignore[union-attr]
    correct = sum(r.output.label == gold for r, (_, gold) in zip(results, CLEAR_REVIEWS, strict=True))  # type: ignore[union-attr]
    assert correct >= 7, f"{correct}/10 clear reviews"
    assert max(r.batch_size for r in results) > 1  # forwarded as batches of concurrent calls


def test_chat_classification_matches_the_answer_to_a_label(remote: Remote) -> None:
    result = remote.fleet.client.classify("The soup was cold.", LABELS, model="chatty", timeout=300)
    assert result.output.label == "negative" and result.output.scores == {"positive": 0.0, "negative": 1.0}  # type: ignore[union-attr]
    assert result.usage.prompt_tokens == 7


def test_a_429_is_rate_limited_retried_after_retry_after(remote: Remote) -> None:
    with pytest.raises(FleetError) as caught:
        remote.fleet.client.generate("hello", max_new_tokens=4, model="limited", timeout=300)
    assert caught.value.code == ErrorCode.RATE_LIMITED and "429" in caught.value.message
    calls = remote.scripted["limited"]
    assert len(calls) == 2  # the policy's 2 attempts
    assert calls[1] - calls[0] >= 0.95  # it waited as Retry-After asked (1 s), not its own 10 ms backoff


def test_a_503_is_model_unavailable_and_falls_back_along_the_chain(remote: Remote) -> None:
    result = remote.fleet.client.generate("What is the capital of France?", max_new_tokens=16, model="down", timeout=300)
    assert result.model == "remote" and result.fallback_from == "down"
    assert remote.scripted["down"]


def test_a_remote_that_does_not_answer_in_time_is_engine_transient(remote: Remote) -> None:
    with pytest.raises(FleetError) as caught:
        remote.fleet.client.generate("hello", max_new_tokens=4, model="slow", timeout=300)
    assert caught.value.code == ErrorCode.ENGINE_TRANSIENT and "did not answer within 0.3s" in caught.value.message
