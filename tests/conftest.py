"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

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
