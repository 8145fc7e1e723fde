"""A Batch API input file, however hostile, becomes exactly one request or one error per line, each under
the line's own custom_id; nothing on one line fails another (property test over generated files)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.gateway.batches import InvalidBatch, Runner, Store, new_batch

GOOD_BODY = {"task_type": "classification", "text": "Fine.", "labels": ["a", "b"]}


def _runner(root: Path) -> tuple[Store, Runner]:
    store = Store(root)
    stub_client: Any = SimpleNamespace(registry=SimpleNamespace(client=None))  # _convert never talks to the fleet
    return store, Runner(store, stub_client, to_task=lambda body, tenant: body, to_body=lambda e, d: d)


def _line(cid: str, **body: Any) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/tasks", "body": {**GOOD_BODY, **body}})


HOSTILE = st.one_of(
    st.builds(lambda i: _line(f"id-{i}"), st.integers(0, 30)),
    st.builds(lambda i: _line(f"id-{i}", priority="interactive", tenant="someone-else", submitted_at=-1.7e308),
              st.integers(0, 30)),
    st.builds(lambda i: _line(f"id-{i}", custom_id=f"inner-{i % 3}"), st.integers(0, 30)),
    st.builds(lambda i, n: _line(f"id-{i}")[:-2] + f', "max_new_tokens": {"9" * n}}}}}', st.integers(0, 30),
              st.integers(1, 6000)),
    st.builds(lambda i, d: _line(f"id-{i}")[:-2] + ', "x": ' + "[" * d + "]" * d + "}}", st.integers(0, 30),
              st.integers(1, 4000)),
    st.builds(lambda i: f'line-{i}', st.integers(0, 30)),  # not JSON, and shaped like an id the runner once invented
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t and t.strip() != ""),
    st.just("[1, 2, 3]"), st.just('{"custom_id": 7, "body": {}}'), st.just('{"custom_id": "x-body", "body": []}'),
)


def _convert(lines: list[str]) -> tuple[list[dict], list[dict], Exception | None, int]:
    with tempfile.TemporaryDirectory() as tmp:
        store, runner = _runner(Path(tmp))
        meta = store.add_file("tenant-1", "in.jsonl", "batch", "\n".join(lines).encode())
        batch = new_batch(store, "tenant-1", meta["id"], "/v1/tasks", "24h", None)
        folder = store.batch_dir("tenant-1", batch["id"])
        try:
            total = runner._convert("tenant-1", batch, folder / "input.jsonl", folder / "errors.jsonl")
            failure = None
        except InvalidBatch as exc:
            total, failure = -1, exc
        good = [json.loads(x) for x in (folder / "input.jsonl").read_text().splitlines()]
        bad = [json.loads(x) for x in (folder / "errors.jsonl").read_text().splitlines()]
        return good, bad, failure, total


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(HOSTILE, min_size=1, max_size=25))
def test_every_line_is_one_request_or_one_error_under_its_own_id(lines: list[str]) -> None:
    good, bad, failure, total = _convert(lines)
    ids = [m.group(1) if (m := re.match(r'\{"custom_id": "([^"]+)"', x)) else None for x in lines]
    named = [i for i in ids if i is not None]
    if len(named) != len(set(named)):  # a repeated custom_id refuses the batch whole (as OpenAI does), naming lines
        assert isinstance(failure, InvalidBatch)
        assert {e["line"] for e in failure.errors} == {n for n, i in enumerate(ids, 1)
                                                       if i is not None and i in ids[: n - 1]}
        return
    assert failure is None and total == len(lines) == len(good) + len(bad)
    assert sorted(str(r["custom_id"]) for r in good + bad) == sorted(str(i) for i in ids)
    for request in good:  # whatever a body said: bulk, the batch's tenant, the gateway's clock
        assert request["priority"] == "bulk" and request["tenant"] == "tenant-1" and "submitted_at" not in request
    assert all(e["error"]["code"] == "INVALID_INPUT" and e["line"] >= 1 for e in bad)


def test_the_findings_of_the_hostile_run_line_by_line() -> None:
    """Non-JSON line 2 next to a valid line named ``line-2``; a 5,000-digit integer; 3,000-deep nesting;
    a body with its own custom_id: each is one error under its own line's id, the rest run."""
    lines = [_line("a"), "not json", _line("line-2"), _line("huge")[:-2] + ', "n": ' + "9" * 5000 + "}}",
             _line("deep")[:-2] + ', "n": ' + "[" * 3000 + "]" * 3000 + "}}", _line("inner", custom_id="b")]
    good, bad, failure, total = _convert(lines)
    assert failure is None and total == 6
    assert [r["custom_id"] for r in good] == ["a", "line-2", "huge"]  # huge's 5,000 digits are refused when built
    assert [(e["custom_id"], e["line"]) for e in bad] == [(None, 2), ("deep", 5), ("inner", 6)]
    assert "custom_id belongs on the line" in bad[2]["error"]["message"]


@pytest.mark.parametrize("marker", ["", "{", '{"at": "soon"}'])
def test_a_cancel_marker_read_mid_write_never_breaks_the_batch(tmp_path: Path, marker: str) -> None:
    store, _ = _runner(tmp_path)
    meta = store.add_file("t", "in.jsonl", "batch", _line("a").encode())
    batch = new_batch(store, "t", meta["id"], "/v1/tasks", "24h", None)
    (store.batch_dir("t", batch["id"]) / "cancel").write_text(marker)  # as a writer would leave it, half done
    assert store.cancelled_at("t", batch["id"]) > 0
