"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

# One torch thread per worker's engine core in the suite. `make test` runs two pytest lanes at once
# and each starts worker processes of its own, so several engine cores decode at the same time on a
# box of a few cores; with a thread pool per core as wide as the box, the pools' spin-waits fight
# over the cores and a step that takes milliseconds alone took tens of times longer (a tiny model's
# 96 tokens: 0.55 s alone, ~20 s inside the suite). Workers and the bench's fleets inherit it; a
# test that wants another count sets it in its own config. (Engines run inside pytest keep the
# default: the unit tests that load them run last in their lane, when the other lane is done.)
os.environ.setdefault("AUTOGLM_WORKER__TORCH_THREADS", "1")

import pytest

from shared.config import Settings, load_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def real_tokenizer_dir(settings: Settings) -> Path:
    """The bundled model's float folder (converted once, cached), for its real tokenizer."""
    from workers.artifacts import resolve_source
    from workers.prepare.quantize import ensure_float

    model = settings.models[0]
    return ensure_float(settings, model, resolve_source(model.source), report=lambda _: None)
