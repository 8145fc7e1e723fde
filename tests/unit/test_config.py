"""Configuration is data: YAML, validated, overridable by environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import load_settings
from shared.schemas import Priority, TaskType


def test_default_config_declares_the_bundled_model_for_both_tasks() -> None:
    settings = load_settings()
    model = settings.default_model(TaskType.CLASSIFICATION)
    assert model.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(model.task_type) == {TaskType.TEXT_GENERATION, TaskType.CLASSIFICATION}
    assert model.quantize.method == "gptq" and model.quantize.bits == 4
    assert settings.queue_name(Priority.INTERACTIVE) == "interactive"
    assert settings.max_batch_size(TaskType.TEXT_GENERATION) == settings.batching.max_batch_size == 8
    assert settings.max_batch_size(TaskType.CLASSIFICATION) == 5
    assert settings.worker_concurrency == 8  # no more threads than the largest batch


def test_environment_overrides_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_BATCHING__MAX_WAIT_MS", "5")
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    settings = load_settings()
    assert settings.batching.max_wait_ms == 5
    assert settings.redis_url == "redis://example:6380/2"


def test_a_yaml_file_of_ones_own(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "batching: {max_batch_size: 16}\n"
        "models:\n"
        "  - {name: local, model_name: me/model, source: /models/x, task_type: text_generation,\n"
        "     quantize: {method: none}}\n"
    )
    settings = load_settings(path)
    assert settings.batching.max_batch_size == 16
    assert settings.model("local").task_type == [TaskType.TEXT_GENERATION]


@pytest.mark.parametrize(
    ("yaml_text", "complaint"),
    [
        ("batching: {max_batch_size: 0}\nmodels: []", "max_batch_size"),
        ("models: []", "models"),
        ("batching: {max_batch_sise: 4}\nmodels: []", "max_batch_sise"),
        (
            "models:\n  - {name: a, model_name: m, source: s, task_type: summarise}\n",
            "task_type",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, yaml_text: str, complaint: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError, match=complaint):
        load_settings(path)
