"""The real fleet for integration tests, started once per session.

- broker: ``REDIS_URL`` when set (queues get unique names so a shared Redis is safe), otherwise an
  embedded valkey server on a free port;
- the real model, prepared once and cached on disk (``autoglm models prepare``);
- one real ``python -m workers`` process, talked to only through Redis.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from producers.client import FleetClient
from producers.fleet import WorkerProcess, running_worker
from shared.broker import broker_url
from shared.config import Settings, load_settings


@dataclass
class Fleet:
    client: FleetClient
    worker: WorkerProcess
    settings: Settings


@pytest.fixture(scope="session")
def prepared_models(settings: Settings) -> None:
    from workers.quantize import prepare

    for model in settings.models:
        prepare(settings, model, report=lambda msg: print(f"[prepare] {msg}"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with broker_url(os.environ.get("REDIS_URL")) as url:
        yield url


@pytest.fixture(scope="session")
def fleet(prepared_models: None, redis_url: str) -> Iterator[Fleet]:
    suffix = uuid.uuid4().hex[:8]
    queues = {
        "interactive": {"name": f"interactive-test-{suffix}", "priority": 0},
        "bulk": {"name": f"bulk-test-{suffix}", "priority": 1},
    }
    settings = load_settings(redis_url=redis_url, queues=queues)
    client = FleetClient(redis_url, settings)
    env = {"AUTOGLM_QUEUES": json.dumps(queues)}
    with running_worker(client.app, redis_url, env=env) as worker:
        yield Fleet(client, worker, settings)
    client.close()
