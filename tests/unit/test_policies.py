"""Per-code policies decide retries; tenacity runs them."""

from __future__ import annotations

import pytest

from shared.config import load_settings
from shared.errors import ErrorCode, FleetError
from workers.core.policies import BatchPolicies


def flaky(failures: list[BaseException]):  # noqa: ANN201
    calls = {"n": 0}

    def run() -> list[str]:
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return ["ok"]

    return run, calls


@pytest.fixture()
def policies() -> BatchPolicies:
    return BatchPolicies(load_settings(policies={
        "ENGINE_TRANSIENT": {"action": "retry", "attempts": 3, "backoff_initial_s": 0.001, "backoff_max_s": 0.01, "jitter_s": 0},
    }))


def test_transient_errors_are_retried_and_recorded(policies: BatchPolicies) -> None:
    run, calls = flaky([FleetError(ErrorCode.ENGINE_TRANSIENT), FleetError(ErrorCode.ENGINE_TRANSIENT)])
    history: list[dict] = []
    assert policies.call(run, history) == ["ok"]
    assert calls["n"] == 3 and [h["code"] for h in history] == ["ENGINE_TRANSIENT"] * 2


def test_retries_stop_at_the_policy_budget(policies: BatchPolicies) -> None:
    run, calls = flaky([FleetError(ErrorCode.ENGINE_TRANSIENT)] * 5)
    history: list[dict] = []
    with pytest.raises(FleetError):
        policies.call(run, history)
    assert calls["n"] == 3 and len(history) == 3


def test_other_codes_are_not_retried(policies: BatchPolicies) -> None:
    run, calls = flaky([RuntimeError("bug")])
    history: list[dict] = []
    with pytest.raises(RuntimeError):
        policies.call(run, history)
    assert calls["n"] == 1 and history[0]["code"] == "INTERNAL"


def test_default_config_declares_the_documented_policies() -> None:
    settings = load_settings()
    assert settings.policy(ErrorCode.ENGINE_TRANSIENT).action == "retry"
    assert settings.policy(ErrorCode.RESOURCE_EXHAUSTED).action == "split"
    assert settings.policy(ErrorCode.MODEL_UNAVAILABLE).action == "fallback"
    assert settings.policy(ErrorCode.INVALID_INPUT).action == "fail"
