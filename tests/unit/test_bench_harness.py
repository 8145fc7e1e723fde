"""The bench's harness sends each competitor's tasks where its workers listen."""

from __future__ import annotations

import json

from bench.harness import Harness
from shared.config import load_settings
from shared.schemas import ClassifyRequest, Priority


def test_a_shape_run_routes_its_tasks_to_the_queue_of_the_shaped_model() -> None:
    # `--shape` workers load the random-weight model the bench built (AUTOGLM_MODELS in their env);
    # a client routing by the configured model published to a queue nobody served and waited forever.
    shaped = {"name": "random-1.7b", "model_name": "random/llama-1.7b", "source": "/nowhere",
              "task_type": ["text_generation", "classification"], "quantize": {"method": "none", "measure": False}}
    harness = Harness(load_settings(), "redis://127.0.0.1:1/0", {"AUTOGLM_MODELS": json.dumps([shaped])})
    client = harness.client("throughput")
    try:
        queue = client.route(ClassifyRequest(text="fine", labels=["a", "b"], priority=Priority.BULK))
    finally:
        client.close()
    assert queue == client.settings.queue_name(Priority.BULK, "random-1.7b")
    assert "random-1.7b" in queue


def test_the_quantization_bar_holds_every_family_to_the_float_models_best_method() -> None:
    from bench.quantization import family_bar

    def split(default: float, old: float, task: float) -> dict:
        return {"default": {"spam": default, "overall": default}, "old_template": {"spam": old, "overall": old},
                "task_template": {"spam": task, "overall": task}}

    variants = {"float": {"report_split": split(0.64, 0.67, 0.53)}, "gptq (shipped)": {"report_split": split(0.63, 0.68, 0.54)}}
    bar = family_bar(variants)
    assert bar is not None and bar["spam"]["best_method"] == "old_template" and bar["spam"]["best_float"] == 0.67
    assert bar["spam"]["met"] is False  # the shipped default is 4 points under float's best: one row short
    variants["gptq (shipped)"]["report_split"]["default"]["spam"] = 0.64
    assert family_bar(variants)["spam"]["met"] is True  # type: ignore[index]
    assert family_bar({"float": {"report_split": {"default": {"spam": 0.6, "overall": 0.6}}}}) is None  # quick mode


def test_the_rate_at_n_in_flight_leaves_out_the_drain_where_fewer_requests_run() -> None:
    from bench.cpu_peer import Span, steady

    # Two slots, each decoding a token a second. Slot one answers 10 tokens, then 10 more; slot two
    # answers 5, then 20 - and its last 5 seconds run alone, after the last request went in.
    done = [Span(0, 0, 10, 10), Span(0, 0, 5, 5), Span(5, 5, 25, 20), Span(10, 10, 20, 10)]
    rate, window = steady(done, 2)
    assert (rate, window) == (2.0, 20.0)  # both slots' rate, over the 20 s both ran
    assert sum(span.tokens for span in done) / 25 == 1.8  # what the whole round reads
    assert steady(done, 1) == (0.0, 0.0)  # one at a time: the whole round is the rate
    assert steady(done[:2], 2) == (0.0, 0.0)  # never refilled: no window where both ran


def test_one_stream_is_read_request_by_request_in_turns_so_a_drifting_machine_slows_both_sides_alike(
        monkeypatch) -> None:
    import bench.cpu_peer as cpu_peer

    clock = [0.0]
    monkeypatch.setattr(cpu_peer.time, "perf_counter", lambda: clock[0])
    order: list[str] = []

    def side(name: str, tokens_per_s: float):
        def one(request: int) -> tuple[int, float]:
            order.append(name)
            clock[0] += 10 / tokens_per_s * (1 + request)  # the machine slows down request by request
            return 10, 5.0
        return one

    got = cpu_peer.interleaved({"peer": side("peer", 100.0), "fleet": side("fleet", 80.0)}, [0, 1, 2, 3])
    assert order == ["peer", "fleet", "fleet", "peer", "peer", "fleet", "fleet", "peer"]  # who goes first rotates
    assert got["fleet"]["tok_per_s"] / got["peer"]["tok_per_s"] == 0.8  # the drift cancels in the ratio
    assert got["peer"]["requests"] == 4 and got["peer"]["ttft_p50_ms"] == 5.0


def test_a_request_llama_server_closes_before_answering_is_sent_again_once_and_counted() -> None:
    import httpx
    import pytest

    from bench.llama_server import LlamaServer

    tries: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        if len(tries) % 2:  # every other connection closed before a response
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        body = ('data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
                'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n')
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    server = LlamaServer.__new__(LlamaServer)  # the client side only: no llama-server process
    server.http, server.max_tokens, server.resent = httpx.Client(transport=httpx.MockTransport(answer),
                                                                 base_url="http://peer"), 8, 0
    tokens, first_ms = server.one([{"role": "user", "content": "Hello"}])
    assert (tokens, server.resent, len(tries)) == (3, 1, 2) and first_ms >= 0

    def gone(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    server.http = httpx.Client(transport=httpx.MockTransport(gone), base_url="http://peer")
    with pytest.raises(httpx.RemoteProtocolError):  # once only: a server that keeps closing is an error
        server.one([{"role": "user", "content": "Hello"}])
    assert server.resent == 2
