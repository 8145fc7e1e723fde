"""What `autoglm models prepare` prints when nobody watches a terminal: a line per step.

GPTQModel and transformers draw progress bars; redrawn into a file (CI, `make test > log`) they
made a prepare's log tens of thousands of lines. When standard output is not a terminal, the
libraries' output goes to a log file beside the artifacts instead, the step lines still reach the
console, and a failure prints the log's last lines with where the rest is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Report = Callable[[str], None]
TAIL_LINES = 40


@contextmanager
def steps_only(log_path: Path, report: Report) -> Iterator[Report]:
    """Yield the report function to use. On a terminal: ``report`` itself and nothing changes. Else
    file descriptors 1 and 2 point at ``log_path`` until the block ends, and ``print`` (the default
    report) is replaced by one that writes to the console."""
    if sys.stdout.isatty():
        yield report
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)

    def say(line: str) -> None:
        console.write(f"{line}\n")

    log = open(log_path, "ab")  # noqa: SIM115 - closed below, after the descriptors are restored
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    say(f"(library output and progress bars: {log_path})")
    try:
        yield say if report is print else report
    except BaseException:
        sys.stdout.flush()
        sys.stderr.flush()
        lines = log_path.read_bytes().decode(errors="replace").replace("\r", "\n").splitlines()
        say(f"--- last {TAIL_LINES} lines of {log_path} ---")
        for line in [line for line in lines if line.strip()][-TAIL_LINES:]:
            say(line)
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        console.close()
