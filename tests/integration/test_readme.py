"""README's Python code blocks run as written against a running fleet (the default configuration's
model, on this session's queues). A block that shows a file of a plugin package (its first line is a
``# path.py`` comment) is run too: it must at least import and define what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Fleet, cli_env

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


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
