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
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from shared.errors import ErrorCode, FleetError

BACKENDS = "autoglm.backends"
TASK_TYPES = "autoglm.task_types"
PROCESSORS = "autoglm.processors"
GROUPS = (BACKENDS, TASK_TYPES, PROCESSORS)


_scanned: dict[str, dict[str, EntryPoint]] = {}


def _found(group: str, rescan: bool = False) -> dict[str, EntryPoint]:
    """The group's entry points. Reading package metadata costs milliseconds and requests look plugins
    up per message, so it is read once per process, and again only when a name is not found (a
    package installed after start is then picked up)."""
    if rescan or group not in _scanned:
        _scanned[group] = {ep.name: ep for ep in entry_points(group=group)}
    return _scanned[group]


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
