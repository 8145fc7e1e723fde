"""Completion webhooks against a real HTTP receiver on loopback: one signed POST per task, retried by
policy when the receiver fails, the outcome visible in the task status, and SSRF targets refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared import webhook_urls
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on
from tests.integration.test_fleet import SENTIMENT_TEMPLATE

pytestmark = pytest.mark.integration
SECRET = "webhook-secret-" + "y" * 24
LABELS = ["positive", "negative"]


@dataclass
class Receiver:
    url: str
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)  # (path, headers, body)
    failures_left: dict[str, int] = field(default_factory=dict)  # path -> answers 500 this many times first

    def to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.posts if p == path]


def start_receiver() -> tuple[ThreadingHTTPServer, Receiver]:
    receiver = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            receiver.posts.append((self.path, dict(self.headers.items()), body))
            left = receiver.failures_left.get(self.path, 0)
            receiver.failures_left[self.path] = left - 1
            self.send_response(500 if left > 0 else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server, receiver


@pytest.fixture(scope="module")
def hooked(tiny_model: dict, redis_url: str) -> Iterator[tuple[Fleet, Receiver]]:
    """Delivery is plumbing, whatever the answer: the tiny random model (conftest ``tiny_model``)."""
    server, receiver = start_receiver()
    config = {"secret": SECRET, "attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 5,
              "allowed_hosts": ["127.0.0.1"]}  # the receiver lives on loopback, which is refused by default
    try:
        with fleet_on(redis_url, models=[tiny_model], webhooks=config, worker={"consumers": 1}) as fleet:
            yield fleet, receiver
    finally:
        server.shutdown()


def wait_for(predicate, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_each_task_posts_one_signed_outcome(hooked: tuple[Fleet, Receiver]) -> None:
    fleet, receiver = hooked
    texts = ["Lovely staff and a great view.", "Broken on arrival, useless.", "I would come back any time."]
    handles = fleet.client.submit_many({"task_type": "classification", "text": t, "labels": LABELS, "priority": "bulk",
                                        "prompt_template": SENTIMENT_TEMPLATE, "callback_url": f"{receiver.url}/ok"}
                                       for t in texts)
    results = [h.result(timeout=300) for h in handles]
    wait_for(lambda: len(receiver.to("/ok")) >= len(texts))
    time.sleep(1.0)  # nothing more arrives: one POST per task
    posts = receiver.to("/ok")
    assert len(posts) == len(texts)
    by_id = {json.loads(body)["id"]: (headers, body) for headers, body in posts}
    assert set(by_id) == {h.id for h in handles}
    for handle, result in zip(handles, results, strict=True):
        headers, body = by_id[handle.id]
        assert webhook_urls.verify(SECRET, headers, body)
        assert not webhook_urls.verify(SECRET, headers, body + b" ")  # a changed body does not verify
        sent = json.loads(body)
        assert sent["status"] == "SUCCESS" and sent["result"]["output"]["label"] == result.output.label  # type: ignore[union-attr]
        assert headers[webhook_urls.TASK_ID] == handle.id
    wait_for(lambda: (handles[0].callback() or {}).get("status") == "delivered")
    assert handles[0].callback()["attempts"] == "1"  # type: ignore[index]


def test_a_receiver_that_fails_twice_gets_it_on_the_third_try(hooked: tuple[Fleet, Receiver]) -> None:
    fleet, receiver = hooked
    receiver.failures_left["/flaky"] = 2
    handle = fleet.client.submit_classify("Cold soup.", LABELS, prompt_template=SENTIMENT_TEMPLATE,
                                          callback_url=f"{receiver.url}/flaky")
    handle.result(timeout=300)
    wait_for(lambda: (handle.callback() or {}).get("status") == "delivered")
    assert len(receiver.to("/flaky")) == 3
    assert handle.callback()["attempts"] == "3"  # type: ignore[index]


def test_a_failed_task_is_posted_too(hooked: tuple[Fleet, Receiver]) -> None:
    fleet, receiver = hooked
    handle = fleet.client.submit_generate("x " * 3000, max_new_tokens=2000, callback_url=f"{receiver.url}/failed")
    with pytest.raises(FleetError):
        handle.result(timeout=300)
    wait_for(lambda: len(receiver.to("/failed")) == 1)
    sent = json.loads(receiver.to("/failed")[0][1])
    assert sent["status"] == "FAILURE" and sent["error"]["code"] == "PROMPT_TOO_LONG" and sent["result"] is None


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.2:8080/v1/tasks",
                                 "http://[::1]:8080/", "ftp://example.com/x"])
def test_ssrf_targets_are_refused_with_invalid_input(hooked: tuple[Fleet, Receiver], url: str) -> None:
    with pytest.raises(FleetError, match="callback_url") as caught:
        hooked[0].client.submit_classify("Fine.", LABELS, callback_url=url)
    assert caught.value.code == ErrorCode.INVALID_INPUT
