"""Tracing, structured logs and the trace context that travels with every request.

Standard OpenTelemetry, configured by the standard ``OTEL_*`` variables: ``OTEL_TRACES_EXPORTER``
(``otlp`` | ``console`` | ``none``, default ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``. ``AUTOGLM_TRACE_FILE=path`` also writes every span as a JSON line (tests
and `autoglm trace` read it). Producers inject the W3C ``traceparent`` into the Celery message
headers; workers continue it (opentelemetry-instrumentation-celery), so one trace id runs from
``submit`` through the task, its batch and the model forward.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

_configured = False
TRACER_NAME = "autoglm"


@functools.cache
def tracer() -> trace.Tracer:
    """The fleet's tracer, made once: before ``setup_tracing`` it is OpenTelemetry's proxy, which
    follows the provider set later (get_tracer builds a new tracer per call: 7 % of the engine
    core's CPU when called per batch, bench profile)."""
    return trace.get_tracer(TRACER_NAME)


def setup_tracing(service: str) -> None:
    """Install the tracer provider once per process (no-op exporters unless configured)."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").lower()
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace_file = os.environ.get("AUTOGLM_TRACE_FILE")
    if trace_file:
        stream = open(trace_file, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=stream, formatter=lambda span: span.to_json(indent=None) + "\n"))
        )
    trace.set_tracer_provider(provider)


def trace_headers() -> dict[str, str]:
    """The current trace context as message headers (``traceparent``), for Celery's ``headers=``."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request's trace/task ids."""

    FIELDS = ("model", "code")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        task_id, queue = _celery_task()
        if task_id:
            entry["task_id"], entry["queue"] = task_id, queue
        for field in self.FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _celery_task() -> tuple[str | None, str | None]:
    from celery import current_task

    task = current_task
    if not task or not getattr(task, "request", None) or not task.request.id:
        return None, None
    return task.request.id, (task.request.delivery_info or {}).get("routing_key")


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Root logging: JSON lines (default) or human text (``AUTOGLM_LOG_FORMAT=text``)."""
    fmt = (fmt or os.environ.get("AUTOGLM_LOG_FORMAT", "json")).lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
