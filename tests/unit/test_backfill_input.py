"""Backfill input: JSONL and CSV lines become (custom_id, request) pairs; a line that is not a
request is reported as its error, and a file that repeats a custom_id is refused whole."""

from __future__ import annotations

from pathlib import Path

from producers.backfill import Journal, duplicate_ids, read_lines
from shared.errors import FleetError


def test_jsonl_and_csv_give_the_same_requests(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"custom_id": "a", "task_type": "classification", "text": "Nice", "labels": ["pos", "neg"]}\n\n'
                     '{"task_type": "text_generation", "prompt": "Hi", "max_new_tokens": 5}\n')
    csv = tmp_path / "in.csv"
    csv.write_text("custom_id,task_type,text,labels,prompt,max_new_tokens\n"
                   "a,classification,Nice,pos|neg,,\n"
                   "3,text_generation,,,Hi,5\n")
    assert [line[:2] for line in read_lines(jsonl)] == [line[:2] for line in read_lines(csv)] == [
        ("a", {"task_type": "classification", "text": "Nice", "labels": ["pos", "neg"]}),
        ("3", {"task_type": "text_generation", "prompt": "Hi", "max_new_tokens": 5}),
    ]


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.journal"
    path.write_text('{"chunk": 0, "ids": {"a": "t1"}}\n{"published": 0}\n{"chunk": 1, "ids": {"b": "t2"}}\n{"publi')
    journal = Journal(path).load()
    assert journal.submitted == {"a": "t1", "b": "t2"}
    assert journal.unconfirmed == {1: {"b": "t2"}} and journal.next_chunk == 2


def test_a_torn_last_line_is_ended_before_anything_is_appended(tmp_path: Path) -> None:
    """Appending after a crash's half-written line would glue the next result onto it: both lost."""
    from producers.backfill import _done_ids, _end_torn_line

    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "status": "succeeded"}\n{"custom_id": "b", "sta')
    _end_torn_line(out)
    with out.open("a") as f:
        f.write('{"custom_id": "c", "status": "succeeded"}\n')
    assert _done_ids(out) == {"a", "c"}  # b is waited for again; c is not lost
    _end_torn_line(out)
    assert out.read_text().endswith('"succeeded"}\n') and "\n\n" not in out.read_text()


def test_a_line_that_is_not_a_request_comes_back_as_its_error_and_the_rest_still_reads(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('not json at all\n[1, 2]\n{"custom_id": "ok", "task_type": "text_generation", "prompt": "Hi"}\n')
    first, second, third = read_lines(jsonl)
    assert isinstance(first.request, FleetError) and first.custom_id == "1" and "line 1 is not JSON" in first.request.message
    assert isinstance(second.request, FleetError) and "JSON list, not an object" in second.request.message
    assert third == ("ok", {"task_type": "text_generation", "prompt": "Hi"}, 3)
    csv = tmp_path / "in.csv"
    csv.write_text("custom_id,task_type,prompt,max_new_tokens\nx,text_generation,Hi,lots\n")
    (row,) = read_lines(csv)
    assert isinstance(row.request, FleetError) and row.request.message == "row 1: max_new_tokens: 'lots' is not a number"


def test_a_repeated_custom_id_names_every_line_it_is_on(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"custom_id": "a", "prompt": "1"}\n{"custom_id": "b", "prompt": "2"}\n{"prompt": "3"}\n'
                     '{"custom_id": "a", "prompt": "4"}\n{"custom_id": "3", "prompt": "5"}\n')
    error = duplicate_ids(read_lines(jsonl))
    assert error is not None and str(error.code) == "INVALID_INPUT"
    assert "'a' on lines 1, 4" in error.message and "'3' on lines 3, 5" in error.message  # line 3's id is its number
    assert duplicate_ids([]) is None


def test_a_file_with_a_repeated_custom_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    import pytest

    from producers.backfill import run_backfill

    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "1"}\n{"custom_id": "a", "prompt": "2"}\n')
    with pytest.raises(FleetError, match="custom_id must be unique"):
        run_backfill(client=None, source=source, output=tmp_path / "out.jsonl")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, errors or journal


def test_a_resumed_backfill_s_rate_counts_only_this_run_s_lines() -> None:
    """Lines done before a resume fill the bar but not the rate (it once read 14,229,088 lines/s)."""
    from producers.backfill import Progress

    progress = Progress(total=1000, started=100.0)
    progress.skip(900)
    progress.done += 10
    assert progress.rate(now=110.0) == 1.0 and progress.done == 910


def test_a_backfill_waiting_for_a_deep_queue_sleeps_between_looks(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Nothing in flight and the bulk queue deeper than its limit (other tenants' work): the backfill
    waits with a sleep between looks at the depth; it used to ask Redis in a tight loop."""
    from types import SimpleNamespace

    from producers import backfill
    from shared.config import load_settings

    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "task_type": "classification", "text": "Nice", "labels": ["pos", "neg"]}\n')
    looks, sleeps = [], []
    client = SimpleNamespace(settings=load_settings(), queue_depth=lambda *q: looks.append(q) or 10**9)
    monkeypatch.setattr(backfill.time, "sleep", lambda s: sleeps.append(s))
    summary = backfill.run_backfill(client, source, tmp_path / "out.jsonl", max_queue_depth=100,  # type: ignore[arg-type]
                                    cancelled=lambda: len(looks) >= 5)
    assert len(looks) == 5 and len(sleeps) >= 4 and all(s >= backfill.THROTTLE_POLL_S for s in sleeps)
    assert summary.get("submitted", 0) == 0  # nothing was published while the queue stayed deep
