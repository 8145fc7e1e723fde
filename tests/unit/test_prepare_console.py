"""Off a terminal, prepare prints its steps and sends the libraries' progress bars to a log file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.prepare.console import steps_only


def test_library_output_goes_to_the_log_and_steps_to_the_console(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "logs" / "prepare.log"
    with steps_only(log, print) as report:
        os.write(1, b"Quantizing layer 1 of 29 \r[1 of 29] |####\r")  # a library drawing a bar
        os.write(2, b"a library warning\n")
        report("quantizing ...")
    out, err = capfd.readouterr()
    assert "quantizing ..." in out and "Quantizing layer" not in out + err and "warning" not in out + err
    assert "Quantizing layer 1 of 29" in log.read_text() and "a library warning" in log.read_text()
    os.write(1, b"after\n")  # the descriptors are back
    assert "after" in capfd.readouterr().out


def test_a_failure_prints_the_logs_last_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "prepare.log"
    with pytest.raises(RuntimeError), steps_only(log, print):
        os.write(2, b"CUDA error: out of memory\n")
        raise RuntimeError("quantize failed")
    out, _ = capfd.readouterr()
    assert "CUDA error: out of memory" in out and str(log) in out
