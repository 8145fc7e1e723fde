"""Producers are what a web backend imports: they never pull in worker code (torch, models)."""

from __future__ import annotations

import subprocess
import sys


def test_producers_never_import_workers() -> None:
    probe = ("import sys, importlib\n"
             "for name in ['producers', 'producers.client', 'producers.aio', 'producers.backfill', 'producers.gateway']:\n"
             "    importlib.import_module(name)\n"
             "print(sorted(m for m in sys.modules if m == 'workers' or m.startswith('workers.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_no_producer_module_mentions_a_worker_import() -> None:
    """Static too: a lazy import inside a function would escape the probe above."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "producers"
    offenders = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.match(r"\s*(from|import)\s+workers\b", line)]
    assert not offenders, offenders
