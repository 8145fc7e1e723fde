"""The ``echo`` backend: zero-cost answers, so the fleet's own per-task cost is the whole figure
(bench ``machinery``). Never a stand-in for a model in demos or quality checks (workers/echo.py)."""

from __future__ import annotations

from typing import Any

from shared.config import ModelConfig, Settings
from workers.backends.base import Backend


class EchoBackend(Backend):
    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.echo import EchoEngine

        return EchoEngine(config)

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.echo import EchoEngine

        return EchoEngine(config)
