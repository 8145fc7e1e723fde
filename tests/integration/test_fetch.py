"""How a worker's channel takes messages from Redis (workers/consumer/transport.py)."""

from __future__ import annotations

import queue
import threading
import uuid

from kombu import Connection, Consumer, Queue

TRANSPORT = "workers.consumer.transport:Transport"


def test_an_idle_worker_waits_on_the_interactive_queue_even_after_serving_from_it(redis_url: str) -> None:
    """kombu's round-robin cycle puts a queue last once a message came from it. An idle channel
    must still block on the urgent queue, or the next interactive request would wait out the whole
    idle timeout (here a minute, so the difference cannot hide in scheduling noise)."""
    run = uuid.uuid4().hex[:8]
    urgent, bulk = Queue(f"fetch-urgent-{run}"), Queue(f"fetch-bulk-{run}")
    options = {"urgent_queues": (urgent.name,), "fetch_idle_timeout": 60}
    taken: queue.Queue[str] = queue.Queue()

    def on_message(body: object, message: object) -> None:
        taken.put(message.headers["id"])  # type: ignore[attr-defined]
        message.ack()  # type: ignore[attr-defined]

    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn, \
            Connection(redis_url) as sender:
        producer = sender.Producer(serializer="json")

        def send(n: int) -> None:  # a Celery-shaped message, as the channel checks
            producer.publish([[], {}, {}], routing_key=urgent.name, declare=[urgent],
                             headers={"task": "autoglm.classify", "id": f"{run}-{n}"})

        with Consumer(conn, [urgent, bulk], callbacks=[on_message], accept=["json"]):
            send(1)
            conn.drain_events(timeout=10)
            assert taken.get_nowait() == f"{run}-1"
            # Idle now: the fetch finds nothing and the channel blocks until a message comes.
            later = threading.Timer(0.5, send, args=(2,))
            later.start()
            try:
                conn.drain_events(timeout=20)  # well inside the minute a wait on the bulk queue would take
            finally:
                later.join()
            assert taken.get_nowait() == f"{run}-2"


def test_bulk_never_fills_the_threads_kept_for_interactive_messages(redis_url: str) -> None:
    """With a prefetch of 3 (the pool's threads) and ``urgent_reserve`` 1, bulk messages hold at
    most 2: the third place stays free, so an interactive message is taken while bulk work is held
    (without the reserve it would wait in Redis until a bulk task ended and was acked)."""
    run = uuid.uuid4().hex[:8]
    urgent, bulk = Queue(f"reserve-urgent-{run}"), Queue(f"reserve-bulk-{run}")
    options = {"urgent_queues": (urgent.name,), "urgent_reserve": 1, "fetch_idle_timeout": 0.1}
    held: list[object] = []

    def on_message(body: object, message: object) -> None:
        held.append(message)  # held, as a thread waiting on its batch holds it

    def drain(conn: Connection, rounds: int = 10) -> None:
        for _ in range(rounds):
            try:
                conn.drain_events(timeout=0.3)
            except TimeoutError:
                pass

    def ids(queue: Queue) -> list[str]:
        return [m.headers["id"] for m in held if m.delivery_info["routing_key"] == queue.name]  # type: ignore[attr-defined]

    with Connection(redis_url, transport=TRANSPORT, transport_options=options) as conn, \
            Connection(redis_url) as sender:
        producer = sender.Producer(serializer="json")

        def send(queue: Queue, name: str) -> None:
            producer.publish([[], {}, {}], routing_key=queue.name, declare=[queue],
                             headers={"task": "autoglm.classify", "id": name})

        for n in range(5):
            send(bulk, f"bulk-{n}")
        with Consumer(conn, [urgent, bulk], callbacks=[on_message], accept=["json"], prefetch_count=3):
            drain(conn)
            assert ids(bulk) == ["bulk-0", "bulk-1"], "bulk took the place kept for interactive messages"
            send(urgent, "urgent-0")
            drain(conn)
            assert ids(urgent) == ["urgent-0"], "the interactive message waited behind held bulk work"
            held[0].ack()  # type: ignore[attr-defined]  # a bulk task ends: its place goes to the next bulk message
            drain(conn)
            assert ids(bulk) == ["bulk-0", "bulk-1", "bulk-2"]
            for message in held[1:]:
                message.ack()  # type: ignore[attr-defined]
