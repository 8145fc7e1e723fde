"""A zero-cost engine for benchmarks and plumbing: the fleet's own per-task cost is then the whole figure.

Selected by a model whose ``backend`` is ``echo`` (workers/backends/echo.py). It validates and renders exactly as the real
engine does (same templates, same limits) but "tokenizes" by length and answers without a model:
classification picks the first label, generation echoes the prompt. Never a stand-in for a model
in demos or quality checks: its answers carry no information.
"""

from __future__ import annotations

from shared.config import ModelConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyOutput, ClassifyRequest, GenerateOutput, GenerateRequest, Usage
from workers.engine import Answer, Prepared, PreparedClassify, PreparedGenerate, render_prompt

CHARS_PER_TOKEN = 4


def _last_turn(request: GenerateRequest) -> str:
    """The prompt, or the last message's text (messages arrive in the engine core as plain dicts)."""
    if request.prompt is not None or not request.messages:
        return request.prompt or ""
    last = request.messages[-1]
    return str(last["content"] if isinstance(last, dict) else last.content)


class LengthPreparer:
    """The request side of a model without a local tokenizer (echo, a remote server): validates and
    renders as the real engine does, and counts tokens by length (~4 characters each) for the
    batcher's token budget and the context check."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.context = config.max_context_tokens

    @property
    def name(self) -> str:
        return self.config.name

    def prepare(self, request: GenerateRequest | ClassifyRequest) -> Prepared:
        if isinstance(request, GenerateRequest):
            text = "\n".join(m["content"] for m in request.chat_messages())
            ids = [0] * max(1, len(text) // CHARS_PER_TOKEN)
            if len(ids) + request.max_new_tokens > self.context:
                raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"prompt is {len(ids)} tokens; context {self.context}")
            return PreparedGenerate(request, ids)
        template = request.prompt_template or self.config.classification_template
        prompt = render_prompt(template or self.config.classification_instruction, request.text, request.labels, self.context)
        return PreparedClassify(request, template, [0] * max(1, len(prompt) // CHARS_PER_TOKEN),
                                [[1] for _ in request.labels])


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
