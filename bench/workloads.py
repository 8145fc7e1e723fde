"""The texts and prompts every competitor gets, identical across competitors and runs."""

from __future__ import annotations

import json
from pathlib import Path

from workers.evaluation import SENTIMENT_LABELS, SENTIMENT_TEMPLATE, sentiment_examples

DATA = Path(__file__).parent / "data"
LABELS = SENTIMENT_LABELS
TEMPLATE = SENTIMENT_TEMPLATE
TOPICS = ["rivers", "bicycles", "volcanoes", "bread", "chess", "owls", "winter", "robots", "tea", "bridges"]


def labelled_reviews() -> list[tuple[str, str]]:
    """124 clear reviews: the 60 of the built-in eval set plus 64 written for the benchmark."""
    extra = [json.loads(line) for line in (DATA / "sentiment_extra.jsonl").read_text().splitlines() if line.strip()]
    return sentiment_examples() + [(row["text"], row["label"]) for row in extra]


def review_texts(n: int) -> list[str]:
    reviews = labelled_reviews()
    return [reviews[i % len(reviews)][0] for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def classify_payload(text: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "prompt_template": TEMPLATE, "priority": priority}


def generate_payload(prompt: str, max_new_tokens: int, priority: str = "bulk") -> dict:
    return {"task_type": "text_generation", "prompt": prompt, "max_new_tokens": max_new_tokens, "priority": priority}
