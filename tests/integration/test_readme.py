"""README's code blocks run as written: the Python blocks against a running fleet (the default
configuration's model, on this session's queues; a block that shows a file of a plugin package, its
first line a ``# path.py`` comment, must at least import and define what it says), the gateway
walk-through against the same fleet, `make demo` as it is (an embedded broker, the default config;
under `make test-all`),
and a shell block no test runs says why in a ``<!-- not run by the tests: ... -->`` line above it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.integration.conftest import Fleet, cli_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# Shell blocks with the line above each: what a test runs is named here, the rest say why not.
SHELL = re.findall(r"([^\n]*)\n```bash\n(.*?)```", README.read_text(), flags=re.S)
RUN_BY_A_TEST = {"make demo": "test_make_demo_prints_real_answers (make test-all; `make test` is .ci/run)",
                 "autoglm gateway": "test_the_readme_http_example_runs_as_written"}


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_a_readme_python_block_runs_as_written(fleet: Fleet, number: int, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKS[number]], env=cli_env(fleet), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README python block {number + 1}:\n{BLOCKS[number]}\n{done.stderr[-3000:]}"


def test_the_readme_http_example_runs_as_written(fleet: Fleet, tmp_path: Path) -> None:
    """The gateway walk-through: start it, issue a token, submit, long-poll the answer."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) if "autoglm gateway" in b)
    env = cli_env(fleet)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # as after `source .venv/bin/activate`
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert '"SUCCESS"' in done.stdout and '"text"' in done.stdout, done.stdout[-2000:]


def test_every_shell_block_is_run_by_a_test_or_says_why_not() -> None:
    assert len(SHELL) >= 3
    for above, block in SHELL:
        runs = [name for needle, name in RUN_BY_A_TEST.items() if needle in block]
        assert runs or above.startswith("<!-- not run by the tests:"), f"README shell block without a test:\n{block}"


def test_the_plugin_entry_point_block_names_a_group_the_fleet_reads() -> None:
    from shared.plugins import GROUPS

    (block,) = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    groups = tomllib.loads(block)["project"]["entry-points"]
    assert groups and set(groups) <= set(GROUPS), groups


@pytest.mark.slow  # a minute of the real model: `make test-all`
@pytest.mark.usefixtures("prepared_models")
def test_make_demo_prints_real_answers() -> None:
    """README's first command, as written: an embedded broker, one worker, the default config."""
    env = {k: v for k, v in os.environ.items()  # as typed in a shell: no outer make, no test settings
           if not k.startswith(("REDIS_URL", "AUTOGLM_", "MAKE", "MFLAGS")) or k == "AUTOGLM_CACHE_DIR"}
    done = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    assert len(summary["answers"]) == len(summary["prompts"]) and all(a.strip() for a in summary["answers"])
    assert "Paris" in summary["answers"][0]  # the real model answers "What is the capital of France?"
    assert len(summary["labels"]) == 64 and summary["bulk_accuracy"] >= 0.8
    assert summary["max_batch_size_seen"] > 1  # the bulk backlog was micro-batched
