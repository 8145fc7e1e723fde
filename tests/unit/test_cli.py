"""The command line answers a mistake in one line with a code and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.cli import main


def test_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "eval", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: No such file or directory: {tmp_path / 'nope.jsonl'}\n"


@pytest.mark.parametrize(("content", "says"), [
    ('{"text": "Great"}\n', 'line 1 is not {"text": "...", "label": "..."}'),
    ('{"text": "Great", "label": "positive"}\nnot json\n', "line 2 is not JSON"),
    ("\n\n", "no labelled lines"),
])
def test_models_eval_names_the_line_that_is_not_a_labelled_example(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, says: str) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text(content)
    assert main(["models", "eval", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error INVALID_INPUT: ") and says in err and "Traceback" not in err


def test_a_started_worker_is_waited_for_with_every_consumer_its_settings_give() -> None:
    """WorkerProcess.wait_ready pings each consumer the worker will start: counted from the settings
    the child reads (env, config, the device's default), not only from an explicit env var (a bench
    once measured while the second of two consumers was still loading)."""
    import os

    from autoglm.fleet import _consumers
    from shared.config import load_settings

    assert _consumers({**os.environ, "AUTOGLM_WORKER__CONSUMERS": "3"}) == 3
    assert _consumers({**os.environ, "AUTOGLM_WORKER": '{"consumers": 5}'}) == 5
    plain = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_WORKER")}
    assert _consumers(plain) == (4 if load_settings().resolved_device == "cuda" else 2)  # the device's default
    assert _consumers({**os.environ, "AUTOGLM_WORKER__ENGINE_ADDRESS": "ipc:///tmp/x"}) == 1  # an extra consumer
    assert os.environ.get("AUTOGLM_WORKER__CONSUMERS") is None  # the parent's environment is left as it was
