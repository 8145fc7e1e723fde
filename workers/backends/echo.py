"""The ``echo`` backend: zero-cost answers, so the fleet's own per-task cost is the whole figure
(bench ``machinery``).

It validates and renders exactly as the real engine does (same templates, same limits) but
"tokenizes" by length and answers without a model: classification picks the first label,
generation echoes the prompt. Never a stand-in for a model in demos or quality checks: its answers
carry no information.
"""

from __future__ import annotations

from typing import Any

from shared.config import ModelConfig, Settings
from shared.schemas import ClassifyOutput, GenerateOutput, GenerateRequest, Usage
from workers.backends.base import Backend
from workers.prompts import CHARS_PER_TOKEN, LengthPreparer
from workers.wire import Answer, Prepared, PreparedGenerate


class EchoBackend(Backend):
    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> Any:
        return EchoEngine(config)

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> Any:
        return EchoEngine(config)


def _last_turn(request: GenerateRequest) -> str:
    """The prompt, or the last message's text (messages arrive in the engine core as plain dicts)."""
    if request.prompt is not None or not request.messages:
        return request.prompt or ""
    last = request.messages[-1]
    return str(last["content"] if isinstance(last, dict) else last.content)


class EchoEngine(LengthPreparer):
    device = "cpu"
    load_seconds = 0.0

    def run(self, items: list[Prepared]) -> list[Answer]:
        answers = []
        for item in items:
            if isinstance(item, PreparedGenerate):
                text = _last_turn(item.request)[: item.request.max_new_tokens * CHARS_PER_TOKEN]
                answers.append(Answer(GenerateOutput(text=text, finish_reason="stop"),
                                      Usage(prompt_tokens=item.prompt_tokens, completion_tokens=max(1, len(text) // CHARS_PER_TOKEN))))
            else:
                labels = item.request.labels
                scores = {label: 1.0 / len(labels) for label in labels}
                answers.append(Answer(ClassifyOutput(label=labels[0], scores=scores), Usage(prompt_tokens=item.prompt_tokens)))
        return answers
