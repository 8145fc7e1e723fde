"""Configuration is data: YAML, validated, overridable by environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import load_settings
from shared.errors import FleetError
from shared.schemas import Priority, TaskType


def test_default_config_declares_the_bundled_model_for_both_tasks() -> None:
    settings = load_settings()
    model = settings.default_model(TaskType.CLASSIFICATION)
    assert model.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(model.task_type) == {TaskType.TEXT_GENERATION, TaskType.CLASSIFICATION}
    assert model.quantize.method == "gptq" and model.quantize.bits == 8
    assert settings.queue_name(Priority.INTERACTIVE) == "interactive.smollm2-135m"
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
        (  # mixed precision: an artifact no worker could load (transformers builds one bit width)
            "models:\n  - {name: a, model_name: m, source: s, quantize: {dynamic: {'+:.*down_proj.*': {bits: 8}}}}\n",
            "dynamic .*workers cannot load",
        ),
        (
            "models:\n  - {name: a, model_name: m, source: s, quantize: {alternatives: [{dynamic: {'+:.*': {bits: 8}}}]}}\n",
            "dynamic .*workers cannot load",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, yaml_text: str, complaint: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError, match=complaint):
        load_settings(path)


def test_a_config_file_that_is_missing_or_not_yaml_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not "models: Field required" (a missing file read as empty) nor a YAML parser traceback."""
    monkeypatch.setenv("AUTOGLM_CONFIG", str(tmp_path / "fleet.yaml"))
    with pytest.raises(FleetError, match=r"config file .*fleet.yaml does not exist \(AUTOGLM_CONFIG\)"):
        load_settings()
    broken = tmp_path / "broken.yaml"
    broken.write_text("batching:\n  max_batch_size: [\n")
    with pytest.raises(FleetError, match=r"broken.yaml is not valid YAML: .* at line 3, column 1"):
        load_settings(broken)


def test_batch_sizes_and_consumers_follow_the_worker_device() -> None:
    """A GPU batches 32 rows for the price of one and needs more consumer processes to feed it;
    a CPU keeps the measured 5/8 (config/default.yaml)."""
    settings = load_settings()
    cpu, cuda = settings.on_device("cpu"), settings.on_device("cuda")
    assert cpu.max_batch_size(TaskType.CLASSIFICATION) == 5 and cpu.batching.max_batch_tokens == 8192
    assert cuda.max_batch_size(TaskType.CLASSIFICATION) == 32 == cuda.max_batch_size(TaskType.TEXT_GENERATION)
    assert cuda.batching.max_batch_tokens == 16384 and cuda.worker_concurrency == 32
    assert cuda.batching.max_wait_ms == settings.batching.max_wait_ms  # unset fields keep the general value
    # one request may cost what one batch may, unless set (then per device too)
    assert (cpu.max_request_tokens, cuda.max_request_tokens) == (8192, 16384)
    assert load_settings(batching={"max_request_tokens": 40000}).on_device("cuda").max_request_tokens == 40000
    assert load_settings(worker={"device": "cpu"}).worker_consumers == 2
    assert load_settings(worker={"device": "cuda"}).worker_consumers == 4
    assert load_settings(worker={"device": "cuda", "consumers": 1}).worker_consumers == 1
    # an extra consumer (attached to a running core) never starts consumers of its own
    assert load_settings(worker={"consumers": 3, "engine_address": "ipc:///tmp/x"}).worker_consumers == 1


def test_each_model_has_its_own_queue_per_priority_and_workers_serve_priority_first() -> None:
    base = load_settings().models[0].model_dump()
    settings = load_settings(models=[base, {**base, "name": "b"}], worker={"models": ["b", "smollm2-135m"]})
    assert [q for q, _, _ in settings.all_queues()] == [
        "interactive.smollm2-135m", "interactive.b", "bulk.smollm2-135m", "bulk.b"]
    # interactive of every loaded model before bulk of any, then the models in worker.models order
    assert settings.worker_queues() == ["interactive.b", "interactive.smollm2-135m", "bulk.b", "bulk.smollm2-135m",
                                        "bulk.webhooks"]  # completion webhooks are delivered last
    assert settings.worker_queues(["b"]) == ["interactive.b", "bulk.b", "bulk.webhooks"]
    assert settings.model_for(TaskType.CLASSIFICATION, None) == "smollm2-135m"
    assert settings.model_for(TaskType.CLASSIFICATION, "b") == "b"


def test_the_cuda_decode_settings_reach_transformers_manager_and_a_cpu_keeps_its_own() -> None:
    """What a GPU sets in batching.by_device.cuda.continuous (graphs, compile level, async batching)
    resolves for a CUDA worker only, and maps one to one onto ContinuousBatchingConfig's arguments."""
    from transformers import ContinuousBatchingConfig

    cuda = {"continuous": {"use_cuda_graph": True, "compile_level": 2, "use_async_batching": True, "max_rows": 96}}
    settings = load_settings(batching={"by_device": {"cuda": cuda}})
    on_gpu, on_cpu = settings.on_device("cuda").batching.continuous, settings.on_device("cpu").batching.continuous
    assert (on_gpu.use_cuda_graph, on_gpu.compile_level, on_gpu.use_async_batching, on_gpu.max_rows) == (True, 2, True, 96)
    assert on_gpu.enabled and on_gpu.allow_block_sharing  # a partial override keeps the rest
    assert (on_cpu.use_cuda_graph, on_cpu.compile_level, on_cpu.use_async_batching) == (None, 0, None)
    options = on_gpu.manager_options()
    config = ContinuousBatchingConfig(**options)  # every key is one of the manager's own arguments
    assert config.default_compile_level == 2 and config.max_requests_per_batch == 96 + on_gpu.interactive_reserve
    assert options["auto_switch_to_flash"] is False  # classification shares the model's attention


def test_a_sentinel_url_needs_the_masters_name_and_is_read_in_celerys_form() -> None:
    from shared.broker import sentinel_endpoint

    with pytest.raises(ValidationError, match="broker.master_name"):
        load_settings(redis_url="sentinel://h1:26379;sentinel://h2:26379/0")
    settings = load_settings(redis_url="sentinel://h1:26379;sentinel://:s3cret@h2/2", broker={"master_name": "main"})
    assert settings.broker.master_name == "main"
    endpoint = sentinel_endpoint(settings.redis_url or "")
    assert endpoint.sentinels == [("h1", 26379), ("h2", 26379)] and endpoint.db == 2 and endpoint.password == "s3cret"
