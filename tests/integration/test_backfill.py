"""`autoglm backfill`: 1,000 lines, killed after 300, re-run: every line answered once, none twice.

The subject is the journal and exactly-once, not the answers: it runs on the tiny random model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.conftest import Fleet, cli_env
from workers.consumer.ledger import Ledger

pytestmark = pytest.mark.integration
REVIEWS = ["Great value, works perfectly.", "Broke after a day, avoid.", "Lovely staff and a calm room.",
           "Rude service and cold food.", "Best purchase this year!", "Terrible battery life."]


def _run(fleet: Fleet, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoglm.cli", "backfill", *args], env=cli_env(fleet),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_backfill_survives_a_kill_and_answers_every_line_once(tiny_fleet: Fleet, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    lines = []
    for i in range(1000):
        labels = ["only-one"] if i % 200 == 7 else ["positive", "negative"]  # 5 malformed lines
        lines.append({"custom_id": f"row-{i}", "task_type": "classification", "text": REVIEWS[i % 6], "labels": labels,
                      "prompt_template": 'Review: "{text}"\nSentiment ({labels}):'})
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    args = [str(source), "--output", str(output), "--window", "128", "--chunk", "32"]

    first = _run(tiny_fleet, args)
    deadline = time.monotonic() + 600
    while (not output.exists() or len(output.read_text().splitlines()) < 300) and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written_before = len(output.read_text().splitlines())
    assert 300 <= written_before < 995, "the kill must land halfway"

    second = _run(tiny_fleet, args)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["lines"] == 1000 and summary["skipped_already_done"] >= 300

    results = [json.loads(line) for line in output.read_text().splitlines()]
    errors = [json.loads(line) for line in output.with_suffix(".errors.jsonl").read_text().splitlines()]
    ids = Counter(r["custom_id"] for r in results + errors)
    assert len(ids) == 1000 and max(ids.values()) == 1  # one line out per line in, no duplicates
    assert {e["error"]["code"] for e in errors} == {"INVALID_INPUT"} and len(errors) == 5
    assert all(r["result"]["output"]["label"] in ("positive", "negative") for r in results)

    # Submissions: the journal gave each line exactly one task id, and each task ran once.
    journal = [json.loads(line) for line in output.with_suffix(".journal").read_text().splitlines() if line.strip()]
    assigned: dict[str, set[str]] = {}
    for entry in journal:
        for cid, task_id in entry.get("ids", {}).items():
            assigned.setdefault(cid, set()).add(task_id)
    assert len(assigned) == 995 and all(len(v) == 1 for v in assigned.values())
    ledger = Ledger(tiny_fleet.client.redis_url, 60)
    assert all(ledger.counts(r["task_id"]).get("executions") == 1 for r in results)
