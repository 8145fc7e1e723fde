"""Scenario `engine-core`: the engine core process alone, fed over its ZMQ socket, no Celery.

Why: on a GPU the fleet's engine core is the busy side (bench/RESULTS.md, H100: its one thread
91-98 % busy, every batch full), so what the core spends per task *outside* the model call is what
stands between the fleet and the in-process engine. Here a client that does nothing else sends
ready-made classification frames (tokenized once, up front) and reads the replies, keeping
``window`` requests in flight, so the core's own cost is the whole figure:

- ``echo``: the zero-cost echo engine: the core's per-task machinery (unpack, batcher, futures,
  span links, replies) in CPU microseconds per task;
- ``model``: the tiny random model (bench/fast_model.py; in a ``--shape`` run the shaped model on
  the configured device) at the same batch size, against the same
  Engine's ``classify`` called in-process on the same prepared batches (tokenization excluded on
  both sides): ``engine_core_vs_inprocess`` is the share of the model loop the core keeps, and
  ``engine_core_model_share`` the share of the core's wall time spent in model calls (measured in
  the core alone, so immune to a second process running faster or slower: on the 2-core EPYC the
  same in-process loop ran at ~1,100 or ~1,800 tasks/s depending on the process, run to run).

Both sides run torch on one thread: on a GPU the model loop is one launch-bound CPU thread with
other cores free for the sockets, and on a 2-core box a second torch thread in the core would
compete with this client and ZMQ's I/O thread, which measures the box, not the core.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from bench.harness import Harness, _cpu_s
from bench.machinery import ECHO_MODEL
from bench.workloads import LABELS, TEMPLATE, review_texts
from shared.schemas import ClassifyRequest
from workers import wire
from workers.lifecycle import EngineCoreProcess
from workers.wire import HELLO

BULK = 9  # any priority but the most urgent: each batch asks the broker for urgent work first, as bulk does
TRACEPARENT = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-" + "00f067aa0ba902b7" + "-01"


class CoreDriver:
    """An engine core started for one model list, and a DEALER socket to feed it."""

    def __init__(self, h: Harness, models: list[dict], batch: int, torch_threads: int | None = 1) -> None:
        names = [m["name"] for m in models]
        env = {**os.environ, **h.env, "REDIS_URL": h.redis_url, "AUTOGLM_MODELS": json.dumps(models),
               "AUTOGLM_WORKER__MODELS": json.dumps(names), "AUTOGLM_WORKER__LOGLEVEL": "WARNING",
               "AUTOGLM_BATCHING__MAX_BATCH_SIZE": str(batch),
               "AUTOGLM_BATCHING__MAX_BATCH_SIZE_BY_TASK": json.dumps({"classification": batch}),
               # the batcher's max_pending is concurrency x consumers: let a whole window in
               "AUTOGLM_WORKER__CONCURRENCY": str(8 * batch),
               **({"AUTOGLM_WORKER__TORCH_THREADS": str(torch_threads)} if torch_threads else {})}
        core = EngineCoreProcess(env)  # started as a consumer starts it: same command, OpenMP settings
        self.process = core.start()
        self.address = core.address
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.connect(self.address)
        self.socket.send(HELLO)
        deadline = time.monotonic() + 900  # loading a model takes a while; a core that died says so at once
        while not self.socket.poll(1000):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the engine core did not answer its hello (exit code {self.process.returncode})")
        self.socket.recv()

    def run(self, frames: Sequence[bytes], n: int, window: int,
            answers: dict[bytes, str] | None = None) -> tuple[float, float, float]:
        """Send ``n`` frames (cycling), ``window`` in flight; (wall seconds, core CPU seconds, seconds
        the core spent in model calls). ``answers``: filled with each request id's label."""
        cpu, started = _cpu_s(self.process.pid), time.perf_counter()
        sent = got = 0
        inference_ms = 0.0
        while got < n:
            while sent < n and sent - got < window:
                self.socket.send(frames[sent % len(frames)])
                sent += 1
            request_id, outcome, batch = wire.decode_reply(self.socket.recv())
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"the engine core answered an error: {outcome}")
            if answers is not None:
                answers[request_id] = outcome.output.label
            if batch is not None and batch.leader:  # the batch's model call counted once
                inference_ms += batch.inference_ms
            got += 1
        return time.perf_counter() - started, _cpu_s(self.process.pid) - cpu, inference_ms / 1000

    def close(self) -> None:
        self.socket.close(linger=0)
        self.ctx.term()
        self.process.terminate()
        self.process.wait(60)


def _frames(preparer: Any, model: str, texts: list[str]) -> tuple[list[Any], list[bytes], list[bytes]]:
    """Prepared requests, their frames and the frames' request ids."""
    prepared = [preparer.prepare(ClassifyRequest(text=t, labels=LABELS, prompt_template=TEMPLATE)) for t in texts]
    ids = [uuid.uuid4().bytes for _ in prepared]
    return prepared, [wire.encode(wire.request(i, model, BULK, TRACEPARENT, p)) for i, p in zip(ids, prepared, strict=True)], ids


def run(h: Harness, n: int, rounds: int, batch: int = 32) -> dict[str, Any]:
    import torch

    from bench.fast_model import tiny_model_config
    from shared.config import ModelConfig
    from workers.artifacts import prepared_path
    from workers.backends.transformers.batch_side import Engine
    from workers.prepare.quantize import prepare
    from workers.prompts import LengthPreparer

    texts = review_texts(max(batch * 4, 256))
    window = 4 * batch
    rates: dict[str, list[float]] = {"echo": [], "model": [], "inprocess": []}
    cpu_us: dict[str, list[float]] = {"echo": [], "model": []}
    model_share: list[float] = []

    echo = ModelConfig(**ECHO_MODEL)
    _, echo_frames, _ = _frames(LengthPreparer(echo), echo.name, texts)
    if "AUTOGLM_MODELS" in h.env:  # a --shape run: the shaped model, on the configured device
        model, device = ModelConfig(**json.loads(h.env["AUTOGLM_MODELS"])[0]), h.settings.worker.device
    else:
        model, device = ModelConfig(**tiny_model_config(h.settings)), "cpu"
    prepare(h.settings, model, report=lambda msg: print(f"[bench] {msg}", flush=True))
    engine = Engine(model, prepared_path(h.settings, model), device=device)
    model_items, model_frames, model_ids = _frames(engine.preparer, model.name, texts)

    def inprocess() -> float:
        started, done = time.perf_counter(), 0
        while done < n:
            start = done % len(model_items)
            chunk = model_items[start : start + batch]
            engine.classify(chunk)
            done += len(chunk)
        return done / (time.perf_counter() - started)

    threads = torch.get_num_threads()
    if engine.device.type == "cpu":
        torch.set_num_threads(1)
    drivers = {"echo": CoreDriver(h, [ECHO_MODEL], batch), "model": CoreDriver(h, [model.model_dump(mode="json")], batch,
                                                                               1 if engine.device.type == "cpu" else None)}
    try:
        frames = {"echo": echo_frames, "model": model_frames}
        drivers["echo"].run(echo_frames, min(n, 4 * window), window)  # warm-ups, untimed
        core_labels: dict[bytes, str] = {}
        drivers["model"].run(model_frames, len(model_frames), window, core_labels)
        inprocess()
        local = [a.output.label for a in engine.classify(model_items)]
        agree = sum(core_labels[i] == label for i, label in zip(model_ids, local, strict=True)) / len(local)
        for _ in range(rounds):
            for name, driver in drivers.items():
                wall, cpu, in_model = driver.run(frames[name], n, window)
                rates[name].append(n / wall)
                cpu_us[name].append(cpu * 1e6 / n)
                if name == "model":
                    model_share.append(in_model / wall)
            rates["inprocess"].append(inprocess())
    finally:
        for driver in drivers.values():
            driver.close()
        torch.set_num_threads(threads)
    best = {k: round(max(v), 1) for k, v in rates.items()}
    return {
        "engine_core_n": n,
        "engine_core_batch": batch,
        "engine_core_tasks_per_s": best,
        "engine_core_cpu_us_per_task": {k: round(min(v), 1) for k, v in cpu_us.items()},
        "engine_core_model": model.name,
        "engine_core_labels_agree": round(agree, 3),  # the core answers what the engine answers in-process
        "engine_core_vs_inprocess": round(best["model"] / best["inprocess"], 3),
        "engine_core_model_share": round(max(model_share), 3),
    }

