"""Backfill input: JSONL and CSV lines become (custom_id, request) pairs."""

from __future__ import annotations

from pathlib import Path

from producers.backfill import Journal, read_lines


def test_jsonl_and_csv_give_the_same_requests(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"custom_id": "a", "task_type": "classification", "text": "Nice", "labels": ["pos", "neg"]}\n\n'
                     '{"task_type": "text_generation", "prompt": "Hi", "max_new_tokens": 5}\n')
    csv = tmp_path / "in.csv"
    csv.write_text("custom_id,task_type,text,labels,prompt,max_new_tokens\n"
                   "a,classification,Nice,pos|neg,,\n"
                   "3,text_generation,,,Hi,5\n")
    assert list(read_lines(jsonl)) == list(read_lines(csv)) == [
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
