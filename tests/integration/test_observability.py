"""One trace from producer to model, JSON logs that carry it, metrics that reflect a burst.

The producer's spans are captured in memory; the worker (a separate process) writes its spans as
JSON lines to AUTOGLM_TRACE_FILE, the same span data an OTLP exporter would send. What is traced,
logged and counted is the machinery's, not the answers': the fleet serves the tiny random model
(conftest ``tiny_model``), which starts and answers in a fraction of the real model's time.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.errors import ErrorCode, FleetError
from shared.queues import CLASSIFY_TASK
from tests.integration.conftest import Fleet, fleet_on, free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = 'Review: "{text}"\nSentiment ({labels}):'


class Traced:
    def __init__(self, fleet: Fleet, trace_file: Path, metrics_port: int, producer: InMemorySpanExporter) -> None:
        self.fleet, self.trace_file, self.metrics_port, self.producer = fleet, trace_file, metrics_port, producer

    def worker_spans(self, trace_id: str, want: set[str], timeout: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            spans = [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]
            mine = [s for s in spans if s["context"]["trace_id"] == trace_id]
            if want <= {s["name"] for s in mine} or time.monotonic() > deadline:
                return mine
            time.sleep(0.1)

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture(scope="module")
def traced(tiny_model: dict, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    trace_file = tmp_path_factory.mktemp("traces") / "worker-spans.jsonl"
    trace_file.touch()
    port = free_port()
    env = {"AUTOGLM_TRACE_FILE": str(trace_file), "AUTOGLM_WORKER__METRICS_PORT": str(port), "AUTOGLM_WORKER__LOG_FORMAT": "json"}
    policies = {"ENGINE_TRANSIENT": {"action": "retry", "attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}}
    with fleet_on(redis_url, env=env, models=[tiny_model], faults={"flaky_marker": "FLAKY", "flaky_times": 1},
                  policies=policies) as fleet:
        exporter = InMemorySpanExporter()
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
        yield Traced(fleet, trace_file, port, exporter)


def _producer_trace_id(traced: Traced, task_id: str) -> str:
    span = next(s for s in traced.producer.get_finished_spans()
                if s.name == "autoglm.submit" and s.attributes.get("messaging.message.id") == task_id)
    return f"0x{span.context.trace_id:032x}"


def test_one_trace_runs_from_producer_to_model(traced: Traced) -> None:
    handle = traced.fleet.client.submit_generate("Name a fruit.", max_new_tokens=6)
    handle.result(timeout=300)
    trace_id = _producer_trace_id(traced, handle.id)
    want = {"run/autoglm.generate", "autoglm.batch", "autoglm.model.text_generation"}
    spans = traced.worker_spans(trace_id, want)
    assert want <= {s["name"] for s in spans}, [s["name"] for s in spans]
    by_name = {s["name"]: s for s in spans}
    run, batch, model = (by_name[n] for n in ("run/autoglm.generate", "autoglm.batch", "autoglm.model.text_generation"))
    assert batch["parent_id"] == run["context"]["span_id"] and model["parent_id"] == batch["context"]["span_id"]
    assert run["attributes"]["autoglm.queue_wait_ms"] >= 0 and "autoglm.batch_wait_ms" in run["attributes"]
    assert model["attributes"]["autoglm.output_tokens"] > 0 and model["attributes"]["autoglm.device"] == "cpu"


def test_a_callers_traceparent_runs_through_the_gateway_to_the_model(traced: Traced, tmp_path: Path) -> None:
    from producers.auth import Role, issue
    from tests.integration.test_gateway import gateway_env, start_gateway

    env, config = gateway_env(traced.fleet, tmp_path)
    gateway = start_gateway(env, tmp_path)
    try:
        caller_trace = uuid.uuid4().hex  # the web backend's own trace, as a W3C traceparent header
        auth = {"Authorization": f"Bearer {issue(config, 'acme', Role.USER)}"}
        body = {"task_type": "text_generation", "prompt": "Name a colour.", "max_new_tokens": 4}
        accepted = httpx.post(f"{gateway.url}/v1/tasks", json=body, timeout=10,
                              headers={**auth, "traceparent": f"00-{caller_trace}-{'ab' * 8}-01"})
        assert accepted.status_code == 202, accepted.text
        done = httpx.get(f"{gateway.url}{accepted.json()['status_url']}", params={"wait": 120}, headers=auth, timeout=130)
        assert done.json()["status"] == "SUCCESS", done.text
    finally:
        gateway.stop()
    want = {"run/autoglm.generate", "autoglm.batch", "autoglm.model.text_generation"}
    spans = traced.worker_spans(f"0x{caller_trace}", want)
    assert want <= {s["name"] for s in spans}, [s["name"] for s in spans]


def test_a_shared_batch_links_to_every_member(traced: Traced) -> None:
    handles = traced.fleet.client.submit_many(
        {"task_type": "classification", "text": f"Review number {i}: lovely.", "labels": ["positive", "negative"],
         "prompt_template": TEMPLATE} for i in range(6)
    )
    results = [h.result(timeout=300) for h in handles]
    assert max(r.batch_size for r in results) >= 2
    trace_id = _producer_trace_id_many(traced)
    deadline = time.monotonic() + 15
    while True:  # a task's run span ends (and is written) after its batch span: wait for all six
        spans = traced.worker_spans(trace_id, {"autoglm.batch"})
        runs = {s["context"]["span_id"] for s in spans if s["name"] == "run/autoglm.classify"}
        if len(runs) >= len(handles) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    batches = [s for s in spans if s["name"] == "autoglm.batch" and s["attributes"]["autoglm.batch.size"] >= 2]
    assert batches, "no shared batch in the trace"
    for batch in batches:
        linked = {link["context"]["span_id"] for link in batch["links"]}
        assert len(linked) == batch["attributes"]["autoglm.batch.size"] and linked <= runs


def _producer_trace_id_many(traced: Traced) -> str:
    span = [s for s in traced.producer.get_finished_spans() if s.name == "autoglm.submit_many"][-1]
    return f"0x{span.context.trace_id:032x}"


def test_failures_and_retries_are_on_the_spans(traced: Traced) -> None:
    flaky = traced.fleet.client.submit_classify("FLAKY yet fine", ["positive", "negative"], prompt_template=TEMPLATE)
    flaky.result(timeout=300)
    spans = traced.worker_spans(_producer_trace_id(traced, flaky.id), {"autoglm.batch"})
    events = [e for s in spans if s["name"] == "autoglm.batch" for e in s["events"]]
    assert any(e["name"] == "attempt failed" and e["attributes"]["code"] == "ENGINE_TRANSIENT" for e in events), events

    queue = traced.fleet.settings.queue_name("interactive")  # type: ignore[arg-type]
    with trace.get_tracer("test").start_as_current_span("raw-producer") as parent:
        from shared.telemetry import trace_headers

        bad = traced.fleet.client.app.send_task(CLASSIFY_TASK, args=[{"text": "x"}], queue=queue, routing_key=queue,
                                                headers=trace_headers())
    with pytest.raises(FleetError):
        traced.fleet.client.handle(bad.id).result(timeout=300)
    spans = traced.worker_spans(f"0x{parent.get_span_context().trace_id:032x}", {"run/autoglm.classify"})
    run = next(s for s in spans if s["name"] == "run/autoglm.classify")
    assert run["attributes"]["autoglm.error_code"] == ErrorCode.INVALID_INPUT and run["status"]["status_code"] == "ERROR"


def test_log_lines_are_json_with_trace_and_task_ids(traced: Traced) -> None:
    handle = traced.fleet.client.submit_generate("Say yes.", max_new_tokens=3)
    handle.result(timeout=300)
    trace_id = _producer_trace_id(traced, handle.id)[2:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(l) for l in traced.fleet.worker.log_path.read_text().splitlines() if l.startswith("{")]
        mine = [l for l in lines if l.get("task_id") == handle.id]
        if mine:
            break
        time.sleep(0.1)
    assert mine, "no log line for the task"
    assert all(l["trace_id"] == trace_id and l["level"] and l["logger"] and l["timestamp"] for l in mine)
    assert any(l.get("model") == traced.fleet.settings.models[0].name for l in mine)


def test_metrics_reflect_a_burst(traced: Traced) -> None:
    bulk_queue = traced.fleet.settings.queue_name("bulk")  # type: ignore[arg-type]
    handles = traced.fleet.client.submit_many(
        {"task_type": "classification", "text": f"Burst review {i}, awful.", "labels": ["positive", "negative"],
         "prompt_template": TEMPLATE, "priority": "bulk"} for i in range(40)
    )
    model = traced.fleet.settings.models[0].name
    prefix = f'autoglm_queue_depth{{model="{model}",priority="bulk",queue="{bulk_queue}"}}'
    depth_line = next(l for l in traced.metrics().splitlines() if l.startswith(prefix))
    assert float(depth_line.split()[-1]) > 0, depth_line  # the burst is waiting in Redis
    for h in handles:
        h.result(timeout=300)
    traced.fleet.client.submit_generate("Say hi.", max_new_tokens=4).result(timeout=300)  # greedy: continuous
    text = traced.metrics()
    count = float(next(l for l in text.splitlines() if l.startswith('autoglm_batch_size_count{task_type="classification"}')).split()[-1])
    total = float(next(l for l in text.splitlines() if l.startswith('autoglm_batch_size_sum{task_type="classification"}')).split()[-1])
    assert total >= 40 and count >= 40 / 6  # every request of the burst went through a batch of <= 6
    assert 'autoglm_tasks_total{code="",outcome="success",task_type="classification"}' in text
    assert "autoglm_model_load_seconds" in text
    rows = float(next(l for l in text.splitlines() if l.startswith('autoglm_continuous_rows_count{task_type="text_generation"}')).split()[-1])
    assert rows >= 1  # continuously batched generations are counted too


def test_compose_file_names_the_services_and_runs_what_the_tests_run() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "worker-gpu", "flower", "jaeger", "gateway"} <= set(services)
    assert "autoglm gateway" in " ".join(services["gateway"]["command"]) and "/healthz" in str(services["gateway"]["healthcheck"])
    assert "--appendonly" in services["redis"]["command"]
    for name in ("worker", "worker-gpu"):
        assert "python -m workers" in " ".join(services[name]["command"])  # what tests/ start
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["build"]["args"]["TORCH_DEVICE"] == "cuda"  # no GPU is visible at build time
    assert "TORCH_DEVICE=$TORCH_DEVICE" in (REPO / "Dockerfile").read_text()
    assert services["worker"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger")


def test_metrics_listen_on_loopback_unless_told_otherwise(traced: Traced) -> None:
    """/metrics names models, queues and traffic: by default only this machine may read it (a container
    sets worker.metrics_host 0.0.0.0 for its scraper, as docker-compose.yml does)."""
    import socket

    import psutil

    assert "autoglm_queue_depth" in traced.metrics()  # served on 127.0.0.1
    outward = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
               if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not outward:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for address in outward:
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect((address, traced.metrics_port))
