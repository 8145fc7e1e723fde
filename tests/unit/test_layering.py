"""Who may import what: producers never pull in worker code (torch, models); inside workers/ the
consumer processes and the engine core are separate packages that meet only in workers/wire.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


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


# -- workers/: a process boundary is a folder boundary ---------------------------------------------------
WORKERS = Path(__file__).resolve().parents[2] / "workers"


def _loaded_after(modules: list[str]) -> set[str]:
    """The modules a fresh interpreter holds after importing ``modules``."""
    probe = ("import sys, importlib\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _family(loaded: set[str], package: str) -> list[str]:
    return sorted(m for m in loaded if m == package or m.startswith(package + "."))


def test_a_consumer_and_the_remote_and_echo_backends_import_no_torch() -> None:
    """A consumer validates and tokenizes; the model lives in the engine core. Its Celery app, its
    tasks, the wire messages and the backends without local weights load neither torch nor
    transformers (a transformers model's tokenizer is loaded when that model is configured)."""
    loaded = _loaded_after(["workers.consumer.app", "workers.consumer.tasks", "workers.wire",
                            "workers.backends.openai", "workers.backends.echo"])
    assert _family(loaded, "torch") == [] and _family(loaded, "transformers") == []
    assert _family(loaded, "workers.core") == [] and _family(loaded, "workers.prepare") == []


def test_the_engine_core_imports_neither_celery_nor_the_consumer() -> None:
    loaded = _loaded_after(["workers.core.loop"])
    assert _family(loaded, "celery") == [] and _family(loaded, "kombu") == []
    assert _family(loaded, "workers.consumer") == [] and _family(loaded, "workers.prepare") == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, lazy imports inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("consumer", ("workers.core", "workers.prepare")),
    ("core", ("celery", "kombu", "workers.consumer", "workers.prepare")),
])
def test_no_file_of_one_process_imports_the_other_or_the_preparation_tool(folder: str, forbidden: tuple[str, ...]) -> None:
    """Static too: a lazy import inside a function would escape the probes above."""
    offenders = [f"{path.relative_to(WORKERS)}:{line} {name}" for path in (WORKERS / folder).rglob("*.py")
                 for line, name in _imports(path) if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not offenders, offenders


def test_each_concept_has_one_file_name() -> None:
    """No two modules of workers/ or shared/ share a name (the old cache.py / middleware/cache.py,
    echo.py / backends/echo.py kind of twin), packages' __init__ and __main__ aside."""
    files = [p for root in (WORKERS, WORKERS.parent / "shared") for p in root.rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py")]
    names = [p.name for p in files]
    twins = sorted(str(p.relative_to(WORKERS.parent)) for p in files if names.count(p.name) > 1)
    assert not twins, twins
