"""The real fleet for integration tests, started once per session.

- broker: ``REDIS_URL`` when set (queues get unique names so a shared Redis is safe), otherwise an
  embedded valkey server on a free port;
- the real model, prepared once and cached on disk (``autoglm models prepare``);
- one real ``python -m workers`` process, talked to only through Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from autoglm.fleet import WorkerProcess
from producers.client import FleetClient
from shared.broker import broker_url
from shared.config import Settings, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    client: FleetClient
    worker: WorkerProcess
    settings: Settings
    workers: list[WorkerProcess] = field(default_factory=list)  # all of them, `worker` first


@pytest.fixture(scope="session")
def prepared_models(settings: Settings) -> None:
    from workers.backends import backend_for

    for model in settings.models:
        backend_for(model).prepare(settings, model, report=lambda msg: print(f"[prepare] {msg}"))


@pytest.fixture(scope="session")
def tiny_model(settings: Settings) -> dict[str, Any]:
    """A model config for plumbing tests, whose subject is the machinery (kills, restarts, journals,
    exactly-once), not the answers: a 2-layer random-weight Llama with the bundled model's real
    tokenizer (bench/fast_model.py), served by the same transformers engine, ~50x cheaper per request."""
    from bench.fast_model import tiny_model_config
    from shared.config import ModelConfig
    from workers.prepare.quantize import prepare

    config = tiny_model_config(settings)
    prepare(settings, ModelConfig(**config), report=lambda msg: print(f"[prepare] {msg}"))
    return config


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with broker_url(os.environ.get("REDIS_URL")) as url:
        yield url


def _env(overrides: dict[str, Any]) -> dict[str, str]:
    return {f"AUTOGLM_{key.upper()}": json.dumps(value) for key, value in overrides.items()}


@contextlib.contextmanager
def fleet_on(redis_url: str, env: dict[str, str] | None = None, workers: list[dict[str, Any]] | None = None,
             **overrides: Any) -> Iterator[Fleet]:
    """A client and real workers on fresh queues; ``overrides`` are settings fields, given to the
    client directly and to each worker as ``AUTOGLM_<FIELD>`` JSON environment variables.
    ``workers``: one entry per worker process, each with its own extra settings (default: one worker)."""
    suffix = uuid.uuid4().hex[:8]
    queues = {
        "interactive": {"name": f"interactive-test-{suffix}", "rank": 0},
        "bulk": {"name": f"bulk-test-{suffix}", "rank": 1},
    }
    overrides = {"queues": queues, **overrides}
    settings = load_settings(redis_url=redis_url, **overrides)
    client = FleetClient(redis_url, settings)
    with contextlib.ExitStack() as stack:
        started = []
        for own in workers or [{}]:  # all start at once (their imports and model loads overlap), then all must be ready
            worker = WorkerProcess(redis_url, env={**_env({**overrides, **own}), **(env or {})})
            stack.callback(worker.stop)
            started.append(worker)
        for worker in started:
            worker.wait_ready(client.app)
        yield Fleet(client, started[0], settings, started)
    client.close()


@pytest.fixture(scope="session")
def fleet(prepared_models: None, redis_url: str) -> Iterator[Fleet]:
    with fleet_on(redis_url) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_fleet(tiny_model: dict[str, Any], redis_url: str) -> Iterator[Fleet]:
    """A fleet serving only the tiny random model (see ``tiny_model``)."""
    with fleet_on(redis_url, models=[tiny_model]) as running:
        yield running


def cli_env(fleet: Fleet) -> dict[str, str]:
    """The environment a command (backfill, gateway) needs to reach this fleet's queues and models."""
    s = fleet.settings
    return {**os.environ, "REDIS_URL": fleet.client.redis_url,
            "AUTOGLM_QUEUES": json.dumps({k.value: v.model_dump() for k, v in s.queues.items()}),
            "AUTOGLM_MODELS": json.dumps([m.model_dump(mode="json") for m in s.models])}
