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
