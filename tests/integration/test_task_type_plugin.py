"""A task type added by a separate package (tests/plugins/autoglm-embeddings: its own pyproject and
entry point), installed here with pip, then submitted, batched, traced and answered by a real worker:
no line of this repository knows the word "embedding". The plugin's machinery is the subject, not its
vectors' quality: the worker serves the tiny random model (conftest ``tiny_model``)."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet, fleet_on

pytestmark = pytest.mark.integration
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "autoglm-embeddings"
TEXTS = ["I love this film.", "A wonderful movie, I adored it.", "Your invoice is overdue.", "Pay the bill by Friday.",
         "The cat sat on the mat.", "Dogs bark at night."]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pip-installs the plugin package into its own folder; this process and the worker see it there."""
    site, source = tmp_path_factory.mktemp("plugin-site"), tmp_path_factory.mktemp("plugin-src") / PLUGIN.name
    shutil.copytree(PLUGIN, source)  # the build leaves build/ and egg-info beside its source: not in the repo
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def embedding_fleet(tiny_model: dict, redis_url: str, plugin_site: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path, InMemorySpanExporter]]:
    base = tiny_model
    trace_file = tmp_path_factory.mktemp("plugin-traces") / "worker-spans.jsonl"
    trace_file.touch()
    env = {"PYTHONPATH": f"{plugin_site}:{Path(__file__).resolve().parents[2]}", "AUTOGLM_TRACE_FILE": str(trace_file)}
    models = [{**base, "task_type": [*base["task_type"], "embedding"]}]
    with fleet_on(redis_url, env=env, models=models, worker={"consumers": 1},
                  batching={"max_wait_ms": 200}) as fleet:
        exporter = InMemorySpanExporter()
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
        yield fleet, trace_file, exporter


def test_a_plugin_task_type_is_validated_batched_traced_and_answered(embedding_fleet) -> None:  # noqa: ANN001
    fleet, trace_file, exporter = embedding_fleet
    handles = fleet.client.submit_many({"task_type": "embedding", "text": t} for t in TEXTS)
    results = [h.result(timeout=300) for h in handles]
    model = fleet.settings.models[0]
    assert all(r.task_type == "embedding" and r.model == model.name for r in results)
    vectors = [r.output["embedding"] for r in results]  # type: ignore[index]
    hidden = json.loads((Path(model.source) / "config.json").read_text())["hidden_size"]  # one value per hidden unit
    assert all(len(v) == r.output["dim"] == hidden for v, r in zip(vectors, results, strict=True))  # type: ignore[index]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3 for v in vectors)
    assert len({tuple(v) for v in vectors}) == len(TEXTS)  # different texts, different vectors
    assert max(r.batch_size for r in results) > 1  # batched like any other task
    # The same text embedded alone gives the vector it got inside a batch (padding is masked out; only
    # float rounding differs with the matrix shapes), and it is further from every other text's.
    alone = fleet.client.submit({"task_type": "embedding", "text": TEXTS[0]})
    again = alone.result(timeout=300).output["embedding"]  # type: ignore[index]
    cosine = [sum(a * b for a, b in zip(again, v, strict=True)) for v in vectors]
    assert cosine[0] > 0.9999 and cosine[0] > max(cosine[1:]) + 1e-3, cosine
    # Traced: the producer's trace runs through the worker's task, batch and model spans.
    span = next(s for s in exporter.get_finished_spans()
                if s.name == "autoglm.submit" and s.attributes.get("messaging.message.id") == alone.id)
    trace_id, want = f"0x{span.context.trace_id:032x}", {"run/autoglm.task.embedding", "autoglm.model.embedding"}
    deadline = time.monotonic() + 15
    while True:
        names = {s["name"] for s in map(json.loads, trace_file.read_text().splitlines()) if s["context"]["trace_id"] == trace_id}
        if want <= names or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert want <= names, names


def test_a_bad_plugin_request_fails_in_the_caller_with_the_field_named(embedding_fleet) -> None:  # noqa: ANN001
    fleet = embedding_fleet[0]
    with pytest.raises(FleetError, match="text") as caught:
        fleet.client.submit({"task_type": "embedding", "text": ""})
    assert caught.value.code == ErrorCode.INVALID_INPUT
    with pytest.raises(FleetError, match=r"unknown task type 'summarize'; installed: .*'embedding'") as caught:
        fleet.client.submit({"task_type": "summarize", "text": "x"})
    assert caught.value.code == ErrorCode.INVALID_INPUT
