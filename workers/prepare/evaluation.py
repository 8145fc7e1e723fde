"""Labelled evaluation sets and accuracy checks through the real Engine path.

Seven classification families with different label sets (``workers/prepare/data/eval/<family>.jsonl``;
four gated by prepare, three more written for label sets nobody had chosen settings on), each row
tagged ``selection`` or ``report``:

- *selection* rows are the only ones used to choose anything: the default classification method,
  its wording, calibration, and which quantization settings ``autoglm models prepare`` keeps;
- *report* rows are only ever reported. Splits are fixed in the files (stratified by label, in
  order of each text's SHA-1), so no later choice can move a row from one side to the other. The
  sentiment rows written before the split existed (the old 60 + 64 reviews, which earlier prompts
  were tuned on) are all on the selection side. The rows appended on 2026-12-03 (40 sentiment, 50
  topic, 48 intent, 48 spam) are all on the report side: written after every setting had been
  chosen, so that a family's report part has ~100 rows and one row moves it by ~1 point, not ~2
  (with ~50, #12's 3-point bar was one row wide: smaller than what 8-bit rounding alone moves).

A small factual QA set (``qa.jsonl``) checks that quantization keeps generation's knowledge.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from shared.schemas import ClassifyRequest, GenerateRequest
from workers.backends.transformers.batch_side import Engine

Split = Literal["selection", "report", "all"]

SENTIMENT_TEMPLATE = 'Review: "{text}"\nSentiment ({labels}):'
SENTIMENT_LABELS = ["positive", "negative"]
# The plain template that was the default before the chat method (kept to report against).
OLD_DEFAULT_TEMPLATE = 'Text: "{text}"\nCategory ({labels}):'
# Task-worded templates, one per family (what a user who writes prompts would send): the
# comparison the default method must stand up to.
TASK_TEMPLATES = {
    "sentiment": 'Review: "{text}"\nSentiment ({labels}):',
    "topic": 'News: "{text}"\nTopic ({labels}):',
    "intent": 'Bank customer message: "{text}"\nIntent ({labels}):',
    "spam": 'Message: "{text}"\nThis message is ({labels}):',
}


@dataclass(frozen=True)
class Family:
    name: str
    labels: list[str]
    rows: list[tuple[str, str, str]]  # (text, label, split)

    def examples(self, split: Split = "all") -> list[tuple[str, str]]:
        return [(text, label) for text, label, part in self.rows if split in ("all", part)]


# Label sets as a user would send them: 2 to 6 labels, multi-token, two sharing their first word.
FAMILY_LABELS: dict[str, list[str]] = {
    "sentiment": SENTIMENT_LABELS,
    "topic": ["sports", "politics", "technology", "business", "health"],
    "intent": ["card lost or stolen", "card payment declined", "transfer money", "check balance",
               "change address", "close account"],
    "spam": ["spam", "not spam"],
}


# Families written after the default method was chosen, for the examples work (#35): emotions,
# support routing, product categories, 4-5 labels, split like the others (their first 48-50 rows);
# the 28-30 rows appended to each after the encoder's settings were chosen are all report rows. Their
# selection rows took part in choosing the calibration and the encoder's weights; they are not in
# prepare's gate (24 selection rows: one row would be 4 points, the family gate's whole width).
NEW_FAMILY_LABELS: dict[str, list[str]] = {
    "emotion": ["joy", "sadness", "anger", "fear"],
    "support": ["billing", "technical", "shipping", "account"],
    "product": ["electronics", "clothing", "kitchen", "books", "toys"],
}


def _read(name: str) -> list[dict]:
    text = resources.files("workers.prepare.data").joinpath("eval", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def data_fingerprint() -> str:
    """Identity of what prepare's gate measures (every family's selection rows and the QA set):
    cached float scores are reused only for the same rows. Report rows are never measured there,
    so adding some keeps the cache (it used to cost a 5-minute float re-measure for nothing)."""
    measured = [[family.name, family.labels, family.examples("selection")] for family in families()]
    qa = [[q.question, q.answers] for q in qa_questions()]
    return hashlib.sha256(json.dumps([measured, qa]).encode()).hexdigest()[:16]


@cache
def families() -> tuple[Family, ...]:
    found = []
    for name, labels in FAMILY_LABELS.items():
        rows = [(r["text"], r["label"], r["split"]) for r in _read(f"{name}.jsonl")]
        found.append(Family(name, labels, rows))
    return tuple(found)


@cache
def new_families() -> tuple[Family, ...]:
    return tuple(Family(name, labels, [(r["text"], r["label"], r["split"]) for r in _read(f"{name}.jsonl")])
                 for name, labels in NEW_FAMILY_LABELS.items())


def sentiment_examples() -> list[tuple[str, str]]:
    """Every labelled review (both splits): workloads for demos and throughput benches."""
    return families()[0].examples()


@cache
def label_descriptions() -> dict[str, dict[str, str]]:
    """A description per label of every family ({family: {label: description}}), written once with
    the labels' plain meaning, for measuring what descriptions buy (bench/RESULTS.md)."""
    return json.loads(resources.files("workers.prepare.data").joinpath("eval", "descriptions.json").read_text())


def accuracy(engine: Engine, family: Family, split: Split, template: str | None = None, batch_size: int = 16,
             first: int | None = None, shots: list[tuple[str, str]] | None = None, described: bool = False) -> float:
    """Share of ``family``'s ``split`` rows labelled right. ``template`` None: the model's default
    method (what a request without ``prompt_template`` gets); ``first``: only that many rows (a
    smoke run; gates and reports always use all); ``shots``: (text, label) examples every request
    carries (rows among them are not scored); ``described``: the labels carry their
    ``label_descriptions``."""
    shown = {text for text, _ in shots or []}
    examples = [row for row in family.examples(split) if row[0] not in shown][:first]
    extra = {"examples": [{"text": text, "label": label} for text, label in shots]} if shots else {}
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        labels: list = ([{"name": label, "description": label_descriptions()[family.name][label]} for label in family.labels]
                        if described else family.labels)
        prepared = [engine.prepare(ClassifyRequest(text=text, labels=labels, prompt_template=template, **extra))
                    for text, _ in chunk]
        answers = engine.classify(prepared)  # type: ignore[arg-type]
        correct += sum(a.output.label == gold for a, (_, gold) in zip(answers, chunk, strict=True))  # type: ignore[union-attr]
    return correct / len(examples)


def first_per_label(rows: list[tuple[str, str]], labels: list[str], k: int) -> list[tuple[str, str]]:
    """The first ``k`` rows of each label, as examples a user would pick: the ones at hand."""
    return [row for label in labels for row in [r for r in rows if r[1] == label][:k]]


def classification_report(
    engine: Engine, split: Split, template: str | None | dict[str, str | None] = None, only: set[str] | None = None,
    first: int | None = None, examples: int = 0,
) -> dict[str, float]:
    """Accuracy per family and ``overall`` (the mean of the entries: each counts the same).
    ``template``: one for every family, or one per family name; ``only``: a subset of families;
    ``first``: that many rows of each (a smoke run); ``examples`` K: each family once more as
    "<family>+examples", its first K ``split`` rows per label shown as examples and the rest
    scored (prepare's gate holds the artifact to the float model both ways). The LM reads the same
    prompts both ways (examples reach the encoder and the calibration, not the prompt): the second
    pass reuses the first's LM scores (``Engine.remembering_scores``), about half the gate's work."""
    chosen = [family for family in families() if only is None or family.name in only]
    per_family = template if isinstance(template, dict) else {family.name: template for family in chosen}
    with engine.remembering_scores():
        scores = {family.name: round(accuracy(engine, family, split, per_family[family.name], first=first), 4)
                  for family in chosen}
        for family in chosen if examples else []:
            shots = first_per_label(family.examples(split), family.labels, examples)
            scores[f"{family.name}+examples"] = round(
                accuracy(engine, family, split, per_family[family.name], first=first, shots=shots), 4)
    scores["overall"] = round(sum(scores.values()) / len(scores), 4)
    return scores


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]

    def accepts(self, text: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text, re.IGNORECASE) for a in self.answers)


def qa_questions() -> list[Question]:
    return [Question(r["question"], r["answers"]) for r in _read("qa.jsonl")]


def qa_accuracy(engine: Engine, max_new_tokens: int = 24, batch_size: int = 8, first: int | None = None) -> float:
    """Share of short factual questions whose greedy chat answer contains an accepted answer.
    ``first``: only that many questions (the quick bench's smoke run; gates always use all)."""
    questions = qa_questions()[:first]
    correct = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prepared = [engine.prepare(GenerateRequest(prompt=q.question, max_new_tokens=max_new_tokens)) for q in chunk]
        answers = engine.generate(prepared)  # type: ignore[arg-type]
        correct += sum(q.accepts(a.output.text) for q, a in zip(chunk, answers, strict=True))  # type: ignore[union-attr]
    return correct / len(questions)
