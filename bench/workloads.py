"""The texts and prompts every competitor gets, identical across competitors and runs."""

from __future__ import annotations

from workers.prepare.evaluation import SENTIMENT_LABELS, SENTIMENT_TEMPLATE, families

LABELS = SENTIMENT_LABELS
TEMPLATE = SENTIMENT_TEMPLATE
TOPICS = ["rivers", "bicycles", "volcanoes", "bread", "chess", "owls", "winter", "robots", "tea", "bridges"]


def labelled_reviews() -> list[tuple[str, str]]:
    """The 124 reviews of the sentiment family's selection split, in the order earlier benchmark
    runs used them (throughput workloads stay comparable across runs)."""
    return families()[0].examples("selection")


def review_texts(n: int) -> list[str]:
    reviews = labelled_reviews()
    return [reviews[i % len(reviews)][0] for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def classify_payload(text: str, priority: str = "bulk") -> dict:
    return {"task_type": "classification", "text": text, "labels": LABELS, "prompt_template": TEMPLATE, "priority": priority}


def generate_payload(prompt: str, max_new_tokens: int, priority: str = "bulk") -> dict:
    return {"task_type": "text_generation", "prompt": prompt, "max_new_tokens": max_new_tokens, "priority": priority}
