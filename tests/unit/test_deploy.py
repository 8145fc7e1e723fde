"""The deployment examples in deploy/ read the metric the workers export, under its real name and
labels, and scale the Deployment they ship with."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from shared.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def test_the_scalers_read_the_queue_depth_the_workers_export() -> None:
    exported = _scrape_names()
    priorities = {c.priority.value for c in load_settings().queue_classes()}
    (scaled,) = _docs("keda-scaledobject.yaml")
    for trigger in scaled["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        metric, priority = re.fullmatch(r"max\((\w+)\{priority=\"(\w+)\"\}\)", query).groups()  # type: ignore[union-attr]
        assert metric in exported and priority in priorities, query
    (worker,) = _docs("worker.yaml")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (hpa,) = _docs("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]


def _scrape_names() -> set[str]:
    """Metric family names a QueueDepth collector yields (against no Redis: the family is still named)."""
    from workers.consumer.metrics import QueueDepth

    collector = QueueDepth("redis://127.0.0.1:1/0", [("bulk.m", "bulk", "m")])
    families = list(collector.collect())
    assert families[0].samples == [] or families[0].samples[0].labels.keys() >= {"queue", "model", "priority"}
    return {family.name for family in families}
