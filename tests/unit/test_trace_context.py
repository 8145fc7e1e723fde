"""The engine core reads each request's traceparent itself (a fast path in its one thread): it must
read exactly what OpenTelemetry's W3C propagator reads, valid or not."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from workers.core.loop import span_context_of

W3C = TraceContextTextMapPropagator()


def reference(traceparent: str) -> trace.SpanContext:
    return trace.get_current_span(W3C.extract({"traceparent": traceparent})).get_span_context()


@pytest.mark.parametrize("traceparent", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # sampled
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",  # not sampled
])
def test_a_consumers_traceparent_reads_as_the_propagator_reads_it(traceparent: str) -> None:
    ours = span_context_of(traceparent)
    assert ours.is_valid and ours.is_remote
    assert ours == reference(traceparent)


@pytest.mark.parametrize("traceparent", [
    "",
    "garbage",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "00-0x4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",  # not hex
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",   # too short
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",  # a sign is not hex
    "00-4bf92f3577b34da6a3ce929d 0e0e47-00f067aa0ba902b7-01",  # a space fromhex would skip
])
def test_anything_else_gets_no_parent_as_with_the_propagator(traceparent: str) -> None:
    assert not span_context_of(traceparent).is_valid
    assert not reference(traceparent).is_valid
