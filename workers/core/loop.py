"""The engine core: one process per device that owns the models and the micro-batcher.

Why a process of its own (vLLM V1's EngineCore): Celery's per-task threads, the batcher and the
model's kernel launches used to share one GIL; on a GPU the model loop then waited for message
handling (an H100 fed at a tenth of its rate). Here the consumer process(es) do everything per task
(Celery, validation, tokenization, ledger, result writes) and send ready-to-batch requests over a
ZMQ socket; this process only collates, runs the model and replies. No Celery, no per-task threads.

One thread here (serve): it takes in the requests that arrived, runs the next batch and sends its
replies, in turn, so the model never waits for the GIL behind frame handling. Generation is the
exception (greedy on transformers; sampled too on a backend that samples per row): it runs
continuously batched (workers/core/continuous.py), and each turn of this loop admits rows, runs
one decoding step for the running rows and hands out their tokens and answers
(one thread for every forward pass, so one OpenMP pool on a CPU: see ``ManagerSteps`` in
workers/backends/transformers/steps.py).

Started by a consumer (workers/consumer/core_client.py) as ``python -m workers.core.loop ADDRESS PARENT_PID``;
it dies with its parent (PR_SET_PDEATHSIG), and the parent restarts it if it dies alone.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future

import zmq
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.broker import in_transit_key, redis_client
from shared.config import Settings, load_settings
from shared.errors import as_fleet_error
from shared.telemetry import setup_logging, setup_tracing, tracer
from workers import backends, wire
from workers.core.batcher import MicroBatcher, Shape
from workers.core.continuous import ContinuousGenerator, eligible
from workers.core.faults import Faults
from workers.core.policies import BatchPolicies
from workers.core.stream_writer import StreamWriter
from workers.handlers import handler as task_handler
from workers.lifecycle import exit_drained, set_parent_death_signal
from workers.wire import HELLO, Answer, Prepared, PreparedGenerate

log = logging.getLogger(__name__)
# Frames carry only the W3C traceparent: parse it directly, not through the global composite propagator.
W3C = TraceContextTextMapPropagator()


def span_context_of(traceparent: str) -> trace.SpanContext:
    """The consumer's span, from the traceparent our own consumers write (``00-<32 hex>-<16 hex>-<2
    hex>``), split directly: 1 us instead of the propagator's 4 (regex, context objects), per
    request in the core's one thread. Anything else goes through the propagator, which validates."""
    parts = traceparent.split("-")
    if len(parts) == 4 and parts[0] == "00":
        try:  # fromhex rejects what is not hex pairs ("0x", "+1", "_"); the lengths catch the rest
            trace_id, span_id, flags = (bytes.fromhex(p) for p in parts[1:])
        except ValueError:
            trace_id = b""
        if len(trace_id) == 16 and len(span_id) == 8 and len(flags) == 1 and any(trace_id) and any(span_id):
            return trace.SpanContext(int.from_bytes(trace_id), int.from_bytes(span_id), is_remote=True,
                                     trace_flags=trace.TraceFlags(flags[0]))
    if not traceparent:
        return trace.INVALID_SPAN_CONTEXT
    return trace.get_current_span(W3C.extract({"traceparent": traceparent})).get_span_context()


def shape_of(prepared: Prepared) -> Shape:
    if isinstance(prepared, PreparedGenerate):
        return Shape(rows=1, width=prepared.cost_tokens)
    return Shape(rows=prepared.rows, width=prepared.width)  # classification and plugin task types


class EngineCore:
    def __init__(self, settings: Settings) -> None:
        import torch

        if settings.worker.torch_threads:
            torch.set_num_threads(settings.worker.torch_threads)
        self.settings = settings
        names = settings.served_models()
        self.engines = {name: backends.batch_side(settings, settings.model(name)) for name in names}
        self.faults = Faults(settings.faults)
        if self.faults:
            log.warning("FAULT INJECTION IS ON (test only): %s", settings.faults)
        # No retries, short timeout: a peek that fails is answered "no" and never stalls the model.
        self._peek = redis_client(settings.redis_url or "", outage_s=0, timeout_s=0.5, master_name=settings.broker.master_name)
        self._urgent_queues = settings.urgent_queues(names)
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=lambda key: settings.max_batch_size(key[1]),
            max_batch_tokens=settings.batching.max_batch_tokens,
            max_wait_ms=settings.batching.max_wait_ms,
            max_pending=settings.consumer_threads * settings.worker_consumers,
            call_policy=BatchPolicies(settings).call,
            urgent_upstream=self._interactive_queued if self._urgent_queues else None,
            most_urgent=settings.queue_classes()[0].rank,
        )  # no thread of its own: serve() runs its batches (see there why)
        self.streams = StreamWriter(redis_client(settings.redis_url or "", outage_s=0, timeout_s=1.0, master_name=settings.broker.master_name),
                                    settings.streams.ttl_s, settings.streams.interval_ms / 1000.0)
        self.continuous: dict[str, ContinuousGenerator] = {}
        if settings.batching.continuous.enabled:
            for name, engine in self.engines.items():
                if callable(getattr(engine, "continuous_batches", None)):
                    self.continuous[name] = ContinuousGenerator(
                        engine, settings.batching.continuous, most_urgent=self.batcher.most_urgent,
                        streams=self.streams, faults=self.faults,
                        fallback=lambda p, prio, ctx, task, m=name: self._static(m, p, prio, ctx, task))
        self._cancel_every_s = settings.streams.cancel_poll_ms / 1000.0
        self._cancel_checked = 0.0
        self._router: zmq.Socket | None = None  # serve()'s socket
        self._yielding = False  # inside _yield_to_urgent

    def hello(self) -> wire.Hello:
        """What a consumer learns when it connects: models loaded, and the pid it watches for death."""
        models = {name: {"load_seconds": e.load_seconds, "device": str(e.device), "kernels": sorted(getattr(e, "kernels", ()))}
                  for name, e in self.engines.items()}
        return wire.Hello(os.getpid(), models)

    def _interactive_queued(self) -> bool:
        """Whether interactive requests of any model served here wait in the broker or were just
        taken from it and are on their way here (one round trip; the batcher asks only when a full
        bulk batch is ready the moment the model is free)."""
        pipe = self._peek.pipeline(transaction=False)
        for queue in self._urgent_queues:
            pipe.llen(queue).exists(in_transit_key(queue))
        return any(pipe.execute())

    def _run_batch(self, key: Hashable, payloads: Sequence[Prepared]) -> list[Answer]:
        model_name, kind = key  # type: ignore[misc]
        engine = self.engines[model_name]
        attributes = {"autoglm.model": model_name, "autoglm.device": str(engine.device), "autoglm.task_type": str(kind),
                      "autoglm.input_tokens": sum(p.prompt_tokens for p in payloads), "autoglm.batch.size": len(payloads)}
        with tracer().start_as_current_span(f"autoglm.model.{kind}", attributes=attributes) as span:
            if self.faults:
                self.faults.check(payloads)
            answers = task_handler(kind).run(engine, list(payloads))
            span.set_attribute("autoglm.output_tokens", sum(a.usage.completion_tokens for a in answers if isinstance(a, Answer)))
        return answers

    def submit(self, model: str, rank: int, traceparent: str, prepared: Prepared, task_id: str = "") -> Future:
        if model not in self.engines:
            raise KeyError(f"model {model!r} is not loaded in this engine core (loaded: {sorted(self.engines)})")
        context = span_context_of(traceparent)
        if model in self.continuous and eligible(prepared, self.engines[model]):
            return self.continuous[model].submit(prepared, rank, task_id, context)  # type: ignore[arg-type]
        return self._static(model, prepared, rank, context, task_id)

    def _static(self, model: str, prepared: Prepared, rank: int, context: trace.SpanContext,
                task_id: str = "") -> Future:
        """A static micro-batch (classification, sampled generation, rows continuous batching gave
        back); a streaming generation gets its whole text as one piece when its batch is done."""
        future = self.batcher.submit((model, prepared.request.task_type), prepared, shape_of(prepared), rank,
                                     span_context=context)
        if isinstance(prepared, PreparedGenerate) and prepared.request.stream and task_id:
            future.add_done_callback(lambda done: self._stream_whole(task_id, done))
        return future

    def _stream_whole(self, task_id: str, done: Future) -> None:
        if done.exception() is not None:
            error = as_fleet_error(done.exception())  # type: ignore[arg-type]
            self.streams.error(task_id, str(error.code), error.message)
            return
        answer, _ = done.result()
        self.streams.text(task_id, 0, answer.output.text)
        self.streams.end(task_id, answer.output.finish_reason, answer.usage)

    def _tend_continuous(self) -> bool:
        """One turn for the continuous batches: admit, hand out tokens and answers, send what is due
        to the streams and drop the rows whose producer cancelled them. The check for cancellations
        goes with every write to the streams, and alone every cancel_poll_ms when none was written
        (one round trip, not two: workers/core/stream_writer.py). True while any row is running."""
        busy = False
        for generator in self.continuous.values():
            generator.step()
            busy = busy or generator.busy
        now = time.monotonic()
        ask: list[str] = []
        if busy and (self.streams.due() or now - self._cancel_checked >= self._cancel_every_s):
            ask = [t for g in self.continuous.values() for t in g.task_ids() if t]
            self._cancel_checked = now
        cancelled = self.streams.flush(ask_cancelled=ask)
        if cancelled:
            for generator in self.continuous.values():
                generator.cancel(cancelled)
        return busy

    def _send_back(self, identity: bytes, request_id: bytes, task_type: str, future: Future) -> None:
        try:
            answer, info = future.result()
            frame = wire.encode(wire.answer(request_id, task_type, answer, info))
        except Exception as exc:  # noqa: BLE001 - the consumer turns it into the task's error
            frame = wire.encode(wire.failure(request_id, exc))
        self._router.send_multipart([identity, frame])

    def _take_in(self) -> None:
        """Every request that has arrived, submitted (answered when its future resolves)."""
        router = self._router
        # The socket is asked first: a receive that finds nothing raises zmq.Again, an exception
        # built on every turn of a decoding loop, between two of its steps.
        while router.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                identity, data = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if data == HELLO:
                router.send_multipart([identity, wire.encode(self.hello())])
                continue
            message = wire.decode_request(data)
            request_id, prepared = message.id, message.item
            try:
                future = self.submit(message.model, message.rank, message.traceparent, prepared, message.task_id)
            except Exception as exc:  # noqa: BLE001
                router.send_multipart([identity, wire.encode(wire.failure(request_id, exc))])
                continue
            kind = str(prepared.request.task_type)
            future.add_done_callback(lambda f, i=identity, r=request_id, k=kind: self._send_back(i, r, k, f))

    def _yield_to_urgent(self) -> None:
        """An engine's ``between_chunks``: called between the parts of a long batch it runs (the
        llama_cpp backend's classification, one decode of a few hundred tokens at a time). What
        arrived is taken in, and while interactive rows wait or decode they run to their end, so a
        bulk batch holds an interactive request back by one chunk, not by the whole batch. Only
        the continuous batches run here: another static batch never starts inside this one."""
        if self._yielding:
            return
        self._yielding = True
        try:
            self._take_in()
            while any(g.urgent for g in self.continuous.values()):
                self._tend_continuous()
                self._take_in()
        finally:
            self._yielding = False

    def serve(self, address: str) -> None:
        """One loop until SIGTERM: take in every request that arrived, run the next batch, send
        its replies. Sockets and model share this one thread on purpose: on a GPU the forward pass
        is launch-bound Python, and a second thread moving frames would take turns with it on the
        GIL. Requests that arrive during a batch wait in ZMQ's own I/O thread, which needs no GIL
        (or are taken in between the batch's chunks: ``_yield_to_urgent``).
        (On an H100 this moved fleet/limit at batch 32 only from 0.58 to 0.64: the rest of the gap
        is not explained yet, bench/RESULTS.md.)"""
        ctx = zmq.Context()
        router = self._router = ctx.socket(zmq.ROUTER)
        router.bind(address)
        stopping = threading.Event()
        for engine in self.engines.values():
            if hasattr(engine, "between_chunks"):
                engine.between_chunks = self._yield_to_urgent
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        log.info("engine core ready on %s with %s", address, sorted(self.engines))
        while not stopping.is_set():
            self._take_in()
            generating = self._tend_continuous()
            batch, wait_s = self.batcher.take(hold_less_urgent=any(g.urgent for g in self.continuous.values()))
            if batch is not None:
                self.batcher.execute(batch)  # its futures resolve here: send_back runs in this thread
                self.streams.flush()
                continue
            if generating:
                continue  # rows are decoding: the next turn runs their next step (it just took in what arrived)
            router.poll(200 if wait_s is None else max(1, int(wait_s * 1000) + 1))
        self._take_in()
        for engine in self.engines.values():
            if hasattr(engine, "between_chunks"):
                engine.between_chunks = None  # draining: batches run whole
        for generator in self.continuous.values():
            generator.close()  # finish the admitted and waiting rows
        self.batcher.close()  # run what was accepted; its replies go out before the socket closes
        self.streams.flush(force=True)
        router.close(linger=1000)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the consumer that started it dies, however it dies."""
    if not set_parent_death_signal(signal.SIGKILL):
        log.warning("cannot set PR_SET_PDEATHSIG; the engine core may outlive a killed consumer")
    if os.getppid() != parent_pid:
        sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    address, parent_pid = (argv or sys.argv[1:])[:2]
    _die_with_parent(int(parent_pid))
    settings = load_settings().on_device()
    setup_logging(settings.worker.loglevel, settings.worker.log_format)
    setup_tracing("autoglm-engine-core")
    core = EngineCore(settings)
    # What startup made (torch, transformers, the model's modules: hundreds of thousands of objects)
    # lives as long as the process; moved out of the cyclic GC's reach, a full collection in the
    # serve loop no longer walks it: 200-260 ms pauses of the model loop -> bench/RESULTS.md.
    gc.collect()
    gc.freeze()
    profile_to = os.environ.get("AUTOGLM_CORE_PROFILE")  # a file: cProfile the serve loop (bench diagnosis)
    if profile_to:
        import cProfile

        cProfile.runctx("core.serve(address)", globals(), {"core": core, "address": address}, f"{profile_to}.{os.getpid()}")
    else:
        core.serve(address)
    exit_drained(0)  # serve() drained: replies sent, the socket closed


if __name__ == "__main__":
    main()
