"""Token streaming and cancellation, end to end: the worker publishes text as its row decodes; the
Python clients and the gateway's SSE (read by the official openai client) pass it on; a producer
that cancels, or an SSE client that goes away, takes the row out of the running batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from producers.aio import AsyncFleetClient
from producers.auth import Role, issue
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet
from tests.integration.test_gateway import Gateway, gateway_env, start_gateway

pytestmark = pytest.mark.integration
STORY = "Write a long story about a lighthouse keeper and a storm."


@pytest.fixture(scope="module")
def gateway(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    tmp = tmp_path_factory.mktemp("streaming")
    env, config = gateway_env(fleet, tmp)
    running = start_gateway(env, tmp)
    try:
        yield running, issue(config, "streamer", Role.USER)
    finally:
        running.stop()


def test_a_stream_delivers_text_before_the_answer_is_done(tiny_fleet: Fleet) -> None:
    """How text travels, not what it says: the tiny random model (the real one streams in
    test_the_official_openai_client_streams_a_chat_completion and in test_llama_cpp_fleet)."""
    fleet = tiny_fleet
    handle = fleet.client.submit_generate(STORY, max_new_tokens=96, stream=True)
    pieces, done_at_first_piece = [], None
    for piece in handle.stream(timeout=300):
        if done_at_first_piece is None:
            done_at_first_piece = handle.ready()
        pieces.append(piece)
    result = handle.result(timeout=60)
    assert done_at_first_piece is False, "the first piece came only after the task had finished"
    # The first piece at once, then one every streams.interval_ms with the tokens decoded since
    assert len(pieces) >= 2 and "".join(pieces).strip() == result.output.text  # type: ignore[union-attr]
    # The end of the stream carries the finish reason and the usage: a streaming reader needs no result
    assert (handle.finish_reason, handle.usage) == (result.output.finish_reason, result.usage)  # type: ignore[union-attr]
    # Reading again from the start gives the same text (the stream is kept for streams.ttl_s).
    assert "".join(handle.stream(timeout=30)).strip() == result.output.text  # type: ignore[union-attr]


def test_a_request_that_did_not_ask_to_stream_yields_its_whole_text_once(fleet: Fleet) -> None:
    handle = fleet.client.submit_generate("Name a fruit.", max_new_tokens=8)
    assert list(handle.stream(timeout=300)) == [handle.result(timeout=60).output.text]  # type: ignore[union-attr]


def test_the_async_client_streams_and_a_failed_task_raises_its_code(fleet: Fleet) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncFleetClient(fleet.client.redis_url, fleet.settings) as client:
            text = "".join([piece async for piece in client.stream("Say hello to the moon.", max_new_tokens=24)])
            handle = await client.submit_generate("tell me " * 100, max_new_tokens=2000, stream=True)  # too long: fails
            with pytest.raises(FleetError) as failed:
                async for _ in handle.stream(timeout=120):
                    pass
            return text, failed.value.code

    text, code = asyncio.run(main())
    assert text.strip() and code == ErrorCode.PROMPT_TOO_LONG


def test_cancelling_a_running_generation_takes_its_row_out(fleet: Fleet) -> None:
    handle = fleet.client.submit_generate(STORY, max_new_tokens=1500, stream=True)
    stream = handle.stream(timeout=300)
    next(stream), next(stream)  # it is generating
    cancelled_at = time.monotonic()
    handle.cancel()
    with pytest.raises(FleetError) as stopped:
        handle.result(timeout=60)
    assert stopped.value.code == ErrorCode.CANCELLED and "while generating" in stopped.value.message
    # 1,500 tokens take minutes on a CPU; the row left within a poll or two of the cancel.
    assert time.monotonic() - cancelled_at < 30
    with pytest.raises(FleetError) as reader:
        list(stream)
    assert reader.value.code == ErrorCode.CANCELLED
    # A cancel is the caller's wish, not a fault: one INFO line with its code, no ERROR, no traceback.
    deadline = time.monotonic() + 10
    while not [line for line in fleet.worker.log_path.read_text().splitlines() if handle.id in line and "failed: CANCELLED" in line]:
        assert time.monotonic() < deadline, fleet.worker.log_tail()
        time.sleep(0.1)
    mine = [line for line in fleet.worker.log_path.read_text().splitlines() if handle.id in line]
    assert not [line for line in mine if "ERROR" in line or "unexpected" in line], mine


def test_the_official_openai_client_streams_a_chat_completion(fleet: Fleet, gateway: tuple[Gateway, str]) -> None:
    import openai

    running, token = gateway
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=token, max_retries=0)
    chunks = client.chat.completions.create(model="smollm2-135m", max_tokens=80, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": STORY}])
    content, finished_at_first_token, finish, usage, task_id = [], None, None, None, ""
    for chunk in chunks:
        task_id = chunk.id.removeprefix("chatcmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if finished_at_first_token is None:
                    finished_at_first_token = fleet.client.handle(task_id).ready()
                content.append(choice.delta.content)
            finish = choice.finish_reason or finish
    result = fleet.client.handle(task_id).result(timeout=60)
    assert finished_at_first_token is False, "the first chunk came only after the whole answer was generated"
    assert len(content) > 5 and "".join(content).strip() == result.output.text  # type: ignore[union-attr]
    assert finish == result.output.finish_reason and usage.completion_tokens == result.usage.completion_tokens  # type: ignore[union-attr]


def test_an_sse_client_that_disconnects_cancels_its_task(fleet: Fleet, gateway: tuple[Gateway, str], tmp_path: Path) -> None:
    running, token = gateway
    body = {"model": "smollm2-135m", "max_tokens": 1500, "stream": True, "messages": [{"role": "user", "content": STORY}]}
    task_id = ""
    with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                task_id = task_id or line.split('"id":"chatcmpl-', 1)[1].split('"', 1)[0]
                seen += 1
            if seen >= 4:  # the row is generating: walk away mid-answer
                break
    with pytest.raises(FleetError) as stopped:
        fleet.client.handle(task_id).result(timeout=60)
    assert stopped.value.code == ErrorCode.CANCELLED and "while generating" in stopped.value.message


def test_a_long_stream_that_keeps_coming_is_not_cut_at_the_gateways_wait(tiny_fleet: Fleet, tmp_path: Path) -> None:
    """gateway.max_wait_s is the longest silence a stream may have, not its longest length: a stream
    that runs well past it while text keeps coming ends with its finish chunk (it was cut with an
    error at max_wait_s in total)."""
    import json as json_

    env, config = gateway_env(tiny_fleet, tmp_path)
    env["AUTOGLM_GATEWAY__MAX_WAIT_S"] = "1"
    running = start_gateway(env, tmp_path)
    try:
        for max_tokens in (300, 1500):  # the first that outlasts the wait on this machine (1500: within the context)
            started, events = time.monotonic(), []
            body = {"model": tiny_fleet.settings.models[0].name, "max_tokens": max_tokens, "stream": True,
                    "messages": [{"role": "user", "content": STORY}]}
            with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {issue(config, 'long-reader', Role.USER)}"}) as sse:
                events = [json_.loads(line[6:]) for line in sse.iter_lines() if line.startswith("data: {")]
            took = time.monotonic() - started
            pieces = sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content"))
            if took > 1.5 and pieces > 10 or any("error" in e for e in events):
                break
    finally:
        running.stop()
    assert not any("error" in e for e in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert took > 1.5 and pieces > 10, f"the stream lasted {took:.1f}s in {pieces} pieces: too short to show anything"


def test_the_engine_core_sends_a_streams_middle_at_its_interval_and_its_first_piece_and_end_at_once(
        redis_url: str) -> None:
    """A CPU decoding step takes milliseconds: a round trip per step would cost decoding time, so
    middle pieces wait for ``streams.interval_ms``; what a reader waits on (the first text, the end,
    an error) never waits."""
    from shared.broker import redis_client
    from shared.streams import stream_key
    from workers.core.stream_writer import StreamWriter

    redis = redis_client(redis_url)
    writer = StreamWriter(redis, ttl_s=60, interval_s=3600)
    task = f"interval-{time.monotonic_ns()}"
    length = lambda: redis.xlen(stream_key(task))  # noqa: E731

    writer.text(task, 0, "Once")
    writer.flush()
    assert length() == 1  # the first piece: time to first token is not held back
    writer.text(task, 4, " upon")
    writer.text(task, 9, " a")
    writer.flush()
    assert length() == 1  # middle pieces wait for the interval (an hour here)
    writer.end(task, "stop")
    writer.flush()
    assert length() == 3  # the end goes at once, with what waited before it, in order...
    entries = [fields for _, fields in redis.xrange(stream_key(task))]
    assert [(e.get("o"), e.get("d")) for e in entries] == [("0", "Once"), ("4", " upon a"), (None, None)]
    # ...and the steps' text that waited is one piece: one entry to write and to read, not one a step

    every_step = StreamWriter(redis, ttl_s=60, interval_s=0)
    every_step.text(task, 11, " time")
    every_step.flush()
    assert length() == 4  # interval 0: every turn sends


def test_the_check_for_cancelled_rows_rides_on_a_write_to_the_streams(redis_url: str) -> None:
    """Each round trip from the engine core wakes Redis and the readers on the cores the model
    decodes on, so the core asks which of its rows were cancelled in the same round trip as a
    stream write; alone only when nothing is written."""
    from shared.broker import redis_client
    from shared.streams import CANCEL_TTL_S, cancel_key, stream_key
    from workers.core.stream_writer import StreamWriter

    redis = redis_client(redis_url)
    writer = StreamWriter(redis, ttl_s=60, interval_s=3600)
    kept, cancelled = f"kept-{time.monotonic_ns()}", f"cancelled-{time.monotonic_ns()}"
    redis.set(cancel_key(cancelled), 1, ex=CANCEL_TTL_S)

    writer.text(kept, 0, "Once")
    assert writer.due()  # a first piece goes at the next flush
    assert writer.flush(ask_cancelled=[kept, cancelled]) == {cancelled}
    assert redis.xlen(stream_key(kept)) == 1  # the write went in the same call
    writer.text(kept, 4, " upon")
    assert not writer.due()  # a middle piece waits for the interval...
    assert writer.flush(ask_cancelled=[kept]) == set()  # ...and a check goes alone
    assert redis.xlen(stream_key(kept)) == 1


def test_rows_decoding_side_by_side_each_get_one_piece_per_write(redis_url: str) -> None:
    """Steps hand out text row by row, interleaved; what a row decoded since its last piece still
    goes as one entry of its stream, in order, and a piece after the end is never merged into it."""
    from shared.broker import redis_client
    from shared.streams import stream_key
    from workers.core.stream_writer import StreamWriter

    redis = redis_client(redis_url)
    writer = StreamWriter(redis, ttl_s=60, interval_s=0)
    a, b = f"side-a-{time.monotonic_ns()}", f"side-b-{time.monotonic_ns()}"
    for step, (text_a, text_b) in enumerate([("Once", "Dear"), (" upon", " Sir"), (" a", ",")]):
        offset_a, offset_b = len("".join(["Once", " upon", " a"][:step])), len("".join(["Dear", " Sir", ","][:step]))
        writer.text(a, offset_a, text_a)
        writer.text(b, offset_b, text_b)
    writer.end(a, "stop")
    writer.text(a, 11, "!")  # follows the text, but comes after the end: it may not join the piece before it
    writer.flush(force=True)
    read = lambda task: [(e.get("o"), e.get("d"), e.get("end")) for _, e in redis.xrange(stream_key(task))]  # noqa: E731
    assert read(a) == [("0", "Once upon a", None), (None, None, "stop"), ("11", "!", None)]
    assert read(b) == [("0", "Dear Sir,", None)]
