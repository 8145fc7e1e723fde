"""Plugins by Python entry point: a package adds a backend, a task type or a processor by declaring
it in its own pyproject, with no change to this repository.

    [project.entry-points."autoglm.backends"]
    my-backend = "my_package.backend:MyBackend"

Groups: ``autoglm.backends`` (what answers for a model: docs/plugins.md), ``autoglm.task_types``
(a request schema, how it is prepared and run in a batch) and ``autoglm.processors`` (a request
pre-processor or an output filter, declared per model or task type in YAML). This project's own
built-ins are registered the same way (pyproject.toml), so they are looked up like anybody's.
"""

from __future__ import annotations

import functools
import sys
import time
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from shared.errors import ErrorCode, FleetError

BACKENDS = "autoglm.backends"
TASK_TYPES = "autoglm.task_types"
PROCESSORS = "autoglm.processors"
GROUPS = (BACKENDS, TASK_TYPES, PROCESSORS)


RESCAN_AFTER_S = 2.0
_scanned: dict[str, tuple[dict[str, EntryPoint], float, tuple[str, ...]]] = {}


def _found(group: str, rescan: bool = False) -> dict[str, EntryPoint]:
    """The group's entry points. Reading every installed package's metadata costs milliseconds and
    requests look plugins up per message, so it is read once per process. A name not found asks for
    a rescan (a package installed after start is then picked up), granted when ``sys.path`` changed
    or the last scan is ``RESCAN_AFTER_S`` old: a flood of requests naming unknown plugins must not
    cost a scan each (it did: two per refused request, most of its refusal's CPU)."""
    entry = _scanned.get(group)
    if entry is None or (rescan and (tuple(sys.path) != entry[2] or time.monotonic() - entry[1] > RESCAN_AFTER_S)):
        entry = ({ep.name: ep for ep in entry_points(group=group)}, time.monotonic(), tuple(sys.path))
        _scanned[group] = entry
    return entry[0]


def names(group: str) -> list[str]:
    """What is installed in ``group``."""
    return sorted(_found(group, rescan=True))


def check(group: str, name: str) -> str:
    """``name`` if installed in ``group``; else ValueError naming the options (config validators
    turn it into INVALID_INPUT at load time)."""
    if name not in _found(group) and name not in _found(group, rescan=True):
        kind = group.rsplit(".", 1)[-1].rstrip("s").replace("_", " ")
        raise ValueError(f"unknown {kind} {name!r}; installed: {names(group)} (entry point group {group!r})")
    return name


@functools.cache
def _load(group: str, name: str) -> Any:
    return _found(group)[name].load()


def load(group: str, name: str) -> Any:
    """The object the entry point names (imported once per process)."""
    try:
        check(group, name)
    except ValueError as exc:
        raise FleetError(ErrorCode.INVALID_INPUT, str(exc)) from None
    return _load(group, name)
