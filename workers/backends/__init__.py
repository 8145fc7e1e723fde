"""Backends: what answers for a model alias (``backend:`` in its YAML entry), found by entry point.

Built-in: ``transformers`` (a local model through ``from_pretrained``: HF folder, GGUF, packaged
model, GPTQ artifact), ``openai`` (any OpenAI-compatible HTTP server) and ``echo`` (zero-cost, for
benchmarks and plumbing). A third-party package adds one with an ``autoglm.backends`` entry point.
"""

from __future__ import annotations

from typing import Any

from shared import plugins
from shared.config import ModelConfig, Settings
from workers.backends.base import Backend


def backend_for(config: ModelConfig) -> type[Backend]:
    return plugins.load(plugins.BACKENDS, config.backend)


def request_side(settings: Settings, config: ModelConfig) -> Any:
    """What a consumer process needs of a model: validation, tokenization, limits (no weights)."""
    return backend_for(config).request_side(settings, config)


def batch_side(settings: Settings, config: ModelConfig) -> Any:
    """What the engine core loads for a model: the thing that runs batches."""
    return backend_for(config).batch_side(settings, config)
