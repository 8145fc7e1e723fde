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
