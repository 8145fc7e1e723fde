"""The built-in labelled sentiment set and an accuracy check through the real Engine path.

``prepare`` scores every artifact it builds against its float source with this, because at small
model sizes 4-bit quantisation can erase the classification signal while generation still looks
fine (see docs/quantization.md).
"""

from __future__ import annotations

import json
from importlib import resources

from shared.schemas import ClassifyRequest
from workers.engine import Engine

SENTIMENT_TEMPLATE = 'Review: "{text}"\nSentiment ({labels}):'
SENTIMENT_LABELS = ["positive", "negative"]


def sentiment_examples() -> list[tuple[str, str]]:
    lines = resources.files("workers.data").joinpath("sentiment_eval.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [(row["text"], row["label"]) for row in rows]


def sentiment_accuracy(engine: Engine, batch_size: int = 16) -> float:
    examples = sentiment_examples()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prepared = [
            engine.prepare(ClassifyRequest(text=text, labels=SENTIMENT_LABELS, prompt_template=SENTIMENT_TEMPLATE))
            for text, _ in chunk
        ]
        answers = engine.classify(prepared)  # type: ignore[arg-type]
        correct += sum(a.output.label == gold for a, (_, gold) in zip(answers, chunk, strict=True))  # type: ignore[union-attr]
    return correct / len(examples)
