"""AsyncFleetClient: 100 concurrent requests in one event loop, without blocking it."""

from __future__ import annotations

import asyncio
import time

import pytest

from producers.aio import AsyncFleetClient
from shared.errors import ErrorCode, FleetError
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration


def test_gathers_100_requests_without_blocking_the_loop(tiny_fleet: Fleet) -> None:
    """The client's machinery, not the answers: the tiny random model (conftest.tiny_model)."""
    fleet = tiny_fleet
    async def main() -> tuple[list, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:  # how late does the loop wake a 10 ms sleeper?
            while not stop.is_set():
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                gaps.append(time.perf_counter() - started - 0.01)

        async with AsyncFleetClient(fleet.client.redis_url, fleet.settings) as client:
            beat = asyncio.create_task(heartbeat())
            handles = await asyncio.gather(*(
                client.submit_classify(f"Review {i}: {'great' if i % 2 else 'awful'} product.", ["positive", "negative"],
                                       prompt_template='Review: "{text}"\nSentiment ({labels}):')
                for i in range(99)
            ), client.submit_generate("Say hi.", max_new_tokens=4))
            outcomes = await client.gather(*(h.result(timeout=300) for h in handles),
                                           client.result("no-such-task", timeout=0.2))
            stop.set()
            await beat
        return outcomes, sorted(gaps, reverse=True)

    outcomes, gaps = asyncio.run(main())
    assert len(outcomes) == 101
    assert all(not isinstance(o, Exception) for o in outcomes[:100]), [o for o in outcomes[:100] if isinstance(o, Exception)][:3]
    failed = outcomes[100]  # all-settled: one failure (an id the fleet never had), 100 answers kept
    assert isinstance(failed, FleetError) and failed.code == ErrorCode.NOT_FOUND, failed
    # A blocking call on the loop's path (a sync Redis read per request) stalls it on every request; one
    # or two late wake-ups are the OS scheduling on a loaded 2-core box (seen once in a full run: 0.43 s).
    assert gaps[0] < 1.0 and gaps[2] < 0.25, f"the event loop stalled: worst gaps {[round(g, 3) for g in gaps[:5]]}"


def test_async_errors_carry_codes(fleet: Fleet) -> None:
    async def main() -> None:
        async with AsyncFleetClient(fleet.client.redis_url, fleet.settings) as client:
            with pytest.raises(FleetError) as caught:
                await client.submit_generate("hi", max_new_tokens=0)
            assert caught.value.code == ErrorCode.INVALID_INPUT
            assert await client.status("no-such-task") == "UNKNOWN"  # not PENDING: nothing will ever answer it
            with pytest.raises(FleetError) as unknown:
                await client.result("no-such-task", timeout=60)
            assert unknown.value.code == ErrorCode.NOT_FOUND
            result = await client.generate("What is the capital of France?", max_new_tokens=16, timeout=300)
            assert "Paris" in result.output.text  # type: ignore[union-attr]

    asyncio.run(main())


def _recorded(fleet: Fleet, task_id: str) -> tuple[bytes, bytes, bytes, object]:
    """A finished task's result copied for ``task_id``: its key, its STARTED and SUCCESS states
    (in the backend's encoding), and the answer itself."""
    backend = fleet.client.app.backend
    done = fleet.client.submit_generate("Name a river.", max_new_tokens=4)
    done.result(timeout=300)
    meta = backend.decode(backend.client.get(backend.get_key_for_task(done.id)))
    return (backend.get_key_for_task(task_id), backend.encode({**meta, "task_id": task_id, "status": "STARTED", "result": None}),
            backend.encode({**meta, "task_id": task_id}), done.result(timeout=5))


def test_an_awaited_result_wakes_on_the_workers_publish_not_on_a_poll(
        tiny_fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state is read when the worker's PUBLISH says it changed: here once at the start and
    once at the PUBLISH (the periodic re-read is pushed out of reach), where polling read it every
    few to 200 ms."""
    import producers.aio

    monkeypatch.setattr(producers.aio, "RECHECK_S", 60.0)
    key, started, succeeded, answer = _recorded(tiny_fleet, "published-1")
    redis = tiny_fleet.client.app.backend.client
    redis.set(key, started)

    async def main() -> tuple[object, int]:
        async with AsyncFleetClient(tiny_fleet.client.redis_url, tiny_fleet.settings) as client:
            reads = 0
            read = client._meta

            async def counted(task_id: str) -> dict:
                nonlocal reads
                reads += 1
                return await read(task_id)

            client._meta = counted  # type: ignore[method-assign]

            async def record() -> None:  # as workers/consumer/ledger.py does: store, then PUBLISH
                await asyncio.sleep(0.5)
                redis.set(key, succeeded)
                redis.publish(key, succeeded)

            recording = asyncio.create_task(record())
            result = await client.result("published-1", timeout=20)
            await recording
            return result, reads

    result, reads = asyncio.run(main())
    assert result.output == answer.output  # type: ignore[attr-defined]
    assert reads == 2


def test_a_result_recorded_while_the_pubsub_connection_is_down_still_reaches_its_waiter(tiny_fleet: Fleet) -> None:
    """Redis drops the client's pub/sub connection mid-wait; the answer is stored and published
    before the subscription is back. The waiter still gets it: it polls when the connection is
    lost, and re-reads the state every RECHECK_S where redis-py reconnects by itself."""
    key, started, succeeded, answer = _recorded(tiny_fleet, "published-2")
    redis = tiny_fleet.client.app.backend.client
    redis.set(key, started)

    async def main() -> object:
        async with AsyncFleetClient(tiny_fleet.client.redis_url, tiny_fleet.settings) as client:
            async def record() -> None:
                await asyncio.sleep(0.3)  # the wait has subscribed by now
                redis.client_kill_filter(_type="pubsub")
                redis.set(key, succeeded)
                redis.publish(key, succeeded)  # to nobody: the connection is gone

            recording = asyncio.create_task(record())
            result = await client.result("published-2", timeout=20)
            await recording
            return result

    assert asyncio.run(main()).output == answer.output  # type: ignore[attr-defined]
