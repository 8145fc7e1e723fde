"""The baseline users write first: one Celery task = one model call, no batching.

Started by the harness as ``celery -A bench.naive worker --pool solo``: the same Redis, the same
prepared model and the same Engine code, so the only difference from the fleet is batching.
"""

from __future__ import annotations

import os

from celery import Celery

from shared.config import load_settings
from shared.schemas import ClassifyRequest, GenerateRequest

app = Celery("naive", broker=os.environ.get("REDIS_URL"), backend=os.environ.get("REDIS_URL"))
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    worker_prefetch_multiplier=1, task_acks_late=True, broker_connection_retry_on_startup=True,
)
_engine = None


def engine():  # noqa: ANN201 - loaded once per worker process, on first use
    global _engine
    if _engine is None:
        from workers.artifacts import prepared_path
        from workers.backends.transformers.batch_side import Engine

        settings = load_settings()
        model = settings.models[0]
        _engine = Engine(model, prepared_path(settings, model), device=settings.worker.device)
    return _engine


@app.task(name="naive.classify")
def classify(text: str, labels: list[str], template: str) -> str:
    e = engine()
    return e.classify([e.prepare(ClassifyRequest(text=text, labels=labels, prompt_template=template))])[0].output.label


@app.task(name="naive.generate")
def generate(prompt: str, max_new_tokens: int) -> list:
    e = engine()
    answer = e.generate([e.prepare(GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens))])[0]
    return [answer.output.text, answer.usage.completion_tokens]


@app.task(name="naive.warmup")
def warmup() -> bool:
    engine()
    return True
