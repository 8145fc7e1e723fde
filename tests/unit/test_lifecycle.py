"""How a consumer starts its engine core."""

from __future__ import annotations

from typing import Any

import pytest

from workers import lifecycle
from workers.lifecycle import EngineCoreProcess


def _started_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, str]:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(lifecycle.subprocess, "Popen", lambda args, env: seen.update(args=args, env=env))
    EngineCoreProcess(env=env).start()
    assert seen["args"][1:3] == ["-m", "workers.core.loop"]
    return seen["env"]


def test_the_core_keeps_its_openmp_threads_spinning_between_parallel_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Should a second thread in the core run torch, libgomp would throttle its spin-wait to 100
    # turns and a CPU forward pass got ~50 % slower (bench/RESULTS.md); ACTIVE bounds the damage.
    env = _started_env(monkeypatch, {"REDIS_URL": "redis://x"})
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["GOMP_SPINCOUNT"] == "300000"  # bounded: an idle core does not spin forever
    assert env["REDIS_URL"] == "redis://x"


def test_an_operator_s_own_openmp_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _started_env(monkeypatch, {"OMP_WAIT_POLICY": "PASSIVE"})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
