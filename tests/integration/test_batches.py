"""The OpenAI Batch API on the gateway, driven by the official ``openai`` client: upload a JSONL
file, run it as a batch, read request_counts, the output file and the error file; cancel; tenancy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from producers.auth import Role, issue
from tests.integration.conftest import Fleet
from tests.integration.test_gateway import Gateway, gateway_env, start_gateway

pytestmark = pytest.mark.integration
CAPITAL_OF = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
              "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima"}
CAPITALS = list(CAPITAL_OF)


@pytest.fixture(scope="module")
def gateway(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Any]]:
    tmp = tmp_path_factory.mktemp("batches")
    env, config = gateway_env(fleet, tmp)
    env["AUTOGLM_GATEWAY__FILES_DIR"] = str(tmp / "files")
    env["AUTOGLM_GATEWAY__TENANT_MODELS"] = json.dumps({"no-models-co": []})
    running = start_gateway(env, tmp)
    try:
        yield running, config
    finally:
        running.stop()


def _client(gateway: tuple[Gateway, Any], tenant: str) -> Any:
    import openai

    running, config = gateway
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=issue(config, tenant, Role.USER), max_retries=0)


def _line(n: int, **body: Any) -> str:
    request = {"model": "smollm2-135m", "max_tokens": 6,
               "messages": [{"role": "user", "content": f"What is the capital of {CAPITALS[n % len(CAPITALS)]}? (#{n})"}]}
    return json.dumps({"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions", "body": {**request, **body}})


def _wait(client: Any, batch_id: str, until: tuple[str, ...], timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch.request_counts}")


def test_a_batch_of_100_lines_runs_to_completion_with_counts_and_files(gateway: tuple[Gateway, Any]) -> None:
    client = _client(gateway, "batcher")
    lines = [_line(n) for n in range(100)]
    lines += [_line(100, max_tokens=0),  # invalid: max_tokens >= 1
              json.dumps({"custom_id": "req-101", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),
              "this is not json"]
    uploaded = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    seen_progress = set()
    deadline = time.monotonic() + 900
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        seen_progress.add(batch.request_counts.completed if batch.request_counts else 0)
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (103, 100, 3)
    assert len(seen_progress) > 2, f"request_counts never moved while running: {sorted(seen_progress)}"

    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{n}" for n in range(100))
    for line in output:
        body = line["response"]["body"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] >= 1
    # A real model answered: most lines name the capital they asked for. (Not one chosen line: the
    # float model answers "L'Alma, la" to req-0 in 6 tokens; it names 31 of 48 such capitals, 8-bit 36.)
    named = sum(CAPITAL_OF[CAPITALS[int(o["custom_id"][4:]) % len(CAPITALS)]]
                in o["response"]["body"]["choices"][0]["message"]["content"] for o in output)
    assert named >= len(output) // 2, f"{named} of {len(output)} answers name the capital they asked for"

    errors = {e["custom_id"]: e for e in map(json.loads, client.files.content(batch.error_file_id).text.splitlines())}
    # The line that is not JSON has no custom_id: its error names its line number, under no invented id
    # (one could be another line's real id, and that line's answer was lost behind it).
    assert set(errors) == {"req-100", "req-101", None} and "line 103" in errors[None]["error"]["message"]
    assert all(e["error"]["code"] == "INVALID_INPUT" and e["response"]["status_code"] == 422 for e in errors.values())
    assert "max_tokens" in errors["req-100"]["error"]["message"]


def test_a_batch_that_repeats_a_custom_id_fails_whole_naming_the_lines(gateway: tuple[Gateway, Any]) -> None:
    """Two lines under one custom_id would share one answer; as OpenAI does, the batch fails validation."""
    client = _client(gateway, "repeater")
    lines = [_line(0), _line(1), _line(0)]
    uploaded = client.files.create(file=("dups.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = _wait(client, batch.id, ("failed", "completed"), timeout=120)
    assert batch.status == "failed" and batch.output_file_id is None
    (error,) = batch.errors.data
    assert (error.code, error.line) == ("duplicate_custom_id", 3) and "line 1" in error.message


def test_a_cancelled_batch_stops_submitting_and_keeps_what_finished(gateway: tuple[Gateway, Any]) -> None:
    client = _client(gateway, "canceller")
    # 400 lines: far from done when the cancel lands; short answers, so what was already sent drains fast.
    uploaded = client.files.create(file=("big.jsonl", "\n".join(_line(n, max_tokens=12) for n in range(400)).encode()),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait(client, batch.id, ("in_progress",))
    while client.batches.retrieve(batch.id).request_counts.completed < 5:
        time.sleep(0.2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, ("cancelled",), timeout=300)
    counts = batch.request_counts
    # Requests cancelled before their answer neither completed nor failed (as OpenAI counts them);
    # the error file still lists each of them with code CANCELLED, so none goes unaccounted for.
    assert counts.total == 400 and 5 <= counts.completed < 400 and counts.failed == 0
    done = client.files.content(batch.output_file_id).text.splitlines()
    assert len(done) == counts.completed
    cancelled = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert cancelled and {line["error"]["code"] for line in cancelled} == {"CANCELLED"}
    assert len(done) + len(cancelled) <= 400
    assert not {line["custom_id"] for line in cancelled} & {json.loads(line)["custom_id"] for line in done}


def test_tenants_see_only_their_own_files_and_batches(gateway: tuple[Gateway, Any]) -> None:
    import openai

    owner, other = _client(gateway, "owner-co"), _client(gateway, "other-co")
    uploaded = owner.files.create(file=("one.jsonl", _line(0).encode()), purpose="batch")
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):  # nor may another tenant's file be the input of a batch
        other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in other.batches.list()]
    assert _wait(owner, batch.id, ("completed",)).request_counts.completed == 1


def test_a_batch_survives_its_gateway_being_killed_and_answers_every_line_once(tiny_fleet: Fleet, tmp_path: Any) -> None:
    """The subject is the batch journal and its lease, not the answers: the tiny random model serves it."""
    import openai

    env, config = gateway_env(tiny_fleet, tmp_path)
    env.update({"AUTOGLM_GATEWAY__FILES_DIR": str(tmp_path / "files"), "AUTOGLM_GATEWAY__BATCH_LEASE_S": "3"})
    first = start_gateway(env, tmp_path)
    token = issue(config, "survivor", Role.USER)
    client = openai.OpenAI(base_url=f"{first.url}/v1", api_key=token, max_retries=0)
    uploaded = client.files.create(file=("r.jsonl", "\n".join(_line(n, max_tokens=12, model="tiny-random") for n in range(150)).encode()),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    while client.batches.retrieve(batch.id).request_counts.completed < 10:
        time.sleep(0.2)
    first.process.kill()  # kill -9 mid-batch: no shutdown, its lease just stops being renewed
    first.process.wait(10)
    second = start_gateway(env, tmp_path)  # same files: it resumes the batch from its journal
    try:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key=token, max_retries=0)
        done = _wait(client, batch.id, ("completed",))
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    finally:
        second.stop()
    assert done.request_counts.total == done.request_counts.completed == 150
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{n}" for n in range(150))  # each line once
    assert len({o["response"]["request_id"] for o in output}) == 150  # one task per line, none submitted twice


def test_a_tenant_uses_and_lists_only_the_models_it_may_see(gateway: tuple[Gateway, Any]) -> None:
    import openai

    client = _client(gateway, "no-models-co")  # gateway.tenant_models: {"no-models-co": []}
    assert list(client.models.list()) == []
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smollm2-135m")  # hidden from this tenant: as if it did not exist
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body["code"] == "NOT_FOUND"
    uploaded = client.files.create(file=("one.jsonl", _line(0).encode()), purpose="batch")
    batch = _wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id, ("completed",))
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 1)
    error = json.loads(client.files.content(batch.error_file_id).text)
    assert error["error"]["code"] == "NOT_FOUND" and error["response"]["status_code"] == 404
    assert [m.id for m in _client(gateway, "anyone-else").models.list()] == ["smollm2-135m"]
