"""Backends as plugins: lookup by entry point, and the openai backend's mapping of HTTP to codes."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError
from tenacity import RetryCallState, Retrying

from shared import plugins
from shared.config import load_settings
from shared.errors import ErrorCode, FleetError
from workers.backends.openai import http_error, match_label
from workers.core.policies import BatchPolicies


def test_the_built_in_backends_are_found_by_entry_point() -> None:
    assert {"transformers", "openai", "echo"} <= set(plugins.names(plugins.BACKENDS))


def test_an_unknown_backend_fails_at_config_load_naming_the_installed_ones() -> None:
    base = load_settings().models[0].model_dump()
    with pytest.raises(ValidationError, match=r"unknown backend 'tgi'; installed: \[.*'openai'.*\]"):
        load_settings(models=[{**base, "backend": "tgi"}])
    with pytest.raises(FleetError) as caught:
        plugins.load(plugins.BACKENDS, "tgi")
    assert caught.value.code == ErrorCode.INVALID_INPUT


def test_a_flood_of_unknown_plugin_names_costs_one_metadata_scan_not_one_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusing a request that names an unknown task type must stay cheap (a hostile client sends
    thousands); a plugin installed on a new path is still found at once."""
    import sys

    scans = []
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    monkeypatch.setattr(plugins, "RESCAN_AFTER_S", 60.0)  # no rescan falls due by time during the test
    plugins._scanned.clear()
    plugins.names(plugins.TASK_TYPES)
    assert len(scans) == 1
    scans.clear()
    for i in range(200):
        with pytest.raises(ValueError, match="unknown task type"):
            plugins.check(plugins.TASK_TYPES, f"nope-{i}")
    assert len(scans) == 0
    monkeypatch.setattr(sys, "path", [*sys.path, "/a/new/site"])  # as a test or a runtime install adds one
    with pytest.raises(ValueError):
        plugins.check(plugins.TASK_TYPES, "nope")
    assert len(scans) == 1


def test_bad_backend_options_name_the_field() -> None:
    from workers.backends.openai import OpenAIBackend

    config = load_settings().models[0].model_copy(update={"backend": "openai", "options": {"base_url": "nope"}})
    with pytest.raises(FleetError, match="base_url") as caught:
        OpenAIBackend.options(config)
    assert caught.value.code == ErrorCode.INVALID_INPUT


@pytest.mark.parametrize(("status", "code"), [
    (429, ErrorCode.RATE_LIMITED), (503, ErrorCode.MODEL_UNAVAILABLE), (401, ErrorCode.MODEL_UNAVAILABLE),
    (422, ErrorCode.INVALID_INPUT), (500, ErrorCode.ENGINE_TRANSIENT), (502, ErrorCode.ENGINE_TRANSIENT),
])
def test_http_statuses_map_to_codes_and_keep_retry_after(status: int, code: ErrorCode) -> None:
    response = httpx.Response(status, headers={"Retry-After": "3"}, json={"error": {"code": "X", "message": "slow down"}})
    error = http_error(response, "http://remote/v1/chat/completions")
    assert error.code == code and "slow down" in error.message and str(status) in error.message
    assert error.retry_after == 3.0  # type: ignore[attr-defined]


def test_the_retry_policy_waits_at_least_retry_after_up_to_its_cap() -> None:
    settings = load_settings(policies={"RATE_LIMITED": {"action": "retry", "attempts": 3, "backoff_initial_s": 0.01,
                                                        "backoff_max_s": 2.0, "jitter_s": 0.0}})
    policies = BatchPolicies(settings)

    def wait_after(retry_after: float) -> float:
        error = FleetError(ErrorCode.RATE_LIMITED, "429")
        error.retry_after = retry_after  # type: ignore[attr-defined]
        state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
        state.set_exception((FleetError, error, None))
        return policies._wait(state)

    assert wait_after(1.5) == 1.5
    assert wait_after(30.0) == 2.0  # capped by the policy
    assert wait_after(0.0) < 0.1  # no Retry-After: the policy's own backoff


@pytest.mark.parametrize(("answer", "label"), [
    ("positive", "positive"), (" Negative.", "negative"), ("**spam**", "spam"), ("not spam", "not spam"),
    ("The answer is: not spam", "not spam"), ("I think it is negative", "negative"), ("banana", None),
])
def test_a_chat_answer_is_matched_to_one_label(answer: str, label: str | None) -> None:
    assert match_label(answer, ["positive", "negative", "spam", "not spam"]) == label
