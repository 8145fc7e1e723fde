"""The ``transformers`` backend: a local causal LM through the real ``from_pretrained`` path.

Its source is a Hugging Face folder, a GGUF file or a file in an installed package; `autoglm models
prepare` converts it once and quantizes it (GPTQ, gated against the float model: workers/prepare/quantize.py).
``trust_remote_code`` in the model's YAML entry is passed to ``from_pretrained`` (models such as
ChatGLM ship their own modelling code).
"""

from __future__ import annotations

from typing import Any, ClassVar

from shared.config import ModelConfig, Settings
from workers.backends.base import Backend


class TransformersBackend(Backend):
    prepares_artifact: ClassVar[bool] = True

    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.artifacts import prepared_path
        from workers.backends.transformers.request_side import Preparer

        return Preparer(config, prepared_path(settings, config))

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.artifacts import prepared_path
        from workers.backends.transformers.batch_side import Engine

        return Engine(config, prepared_path(settings, config), device=settings.worker.device,
                      widths=settings.batching.classification_widths)

    @classmethod
    def prepare(cls, settings: Settings, config: ModelConfig, report: Any = print, force: bool = False) -> dict[str, Any]:
        from workers.prepare.quantize import prepare

        return prepare(settings, config, report=report, force=force)
