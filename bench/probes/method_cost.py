"""Probe: what a classification costs per request, the old two-expert default vs the three-expert default.

Not a bench scenario (no fleet): one in-process Engine per method over the same float folder,
classifying the same sentiment rows in batches of 5, alternated for ``--rounds`` rounds so machine
noise hits both. Prints seconds per request and the ratio; docs/quantization.md has the figures.

    python -m bench.probes.method_cost [--rounds 3] [--rows 60]
"""
from __future__ import annotations

import argparse
import time

from shared.config import ABOUT_CHANNEL, ExpertWeights, load_settings
from shared.schemas import ClassifyRequest
from workers.artifacts import float_dir, resolve_source
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import families

# The two-expert method that was the default until 2026-12-03 (the default since is the three experts).
TWO = {"classification_capitalize": False, "classification_channel": ABOUT_CHANNEL,
       "classification_plain": None, "classification_weights": ExpertWeights(chat=1.0, channel=1.0, plain=1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=60)
    args = parser.parse_args()
    settings = load_settings()
    model = settings.models[0]
    path = float_dir(settings, model, resolve_source(model.source))
    engines = {"two experts (old default)": Engine(model.model_copy(update=TWO), path, device="cpu"),
               "three experts (default)": Engine(model, path, device="cpu")}
    family = families()[0]
    requests = [ClassifyRequest(text=text, labels=family.labels) for text, _ in family.examples()[: args.rows]]
    seconds = {name: 0.0 for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            items = [engine.prepare(r) for r in requests]
            engine.classify(items[:5])  # calibration priors and first-call setup outside the clock
            started = time.perf_counter()
            for start in range(0, len(items), 5):
                engine.classify(items[start:start + 5])  # type: ignore[arg-type]
            seconds[name] += time.perf_counter() - started
    per = {name: s / (args.rounds * len(requests)) for name, s in seconds.items()}
    for name, s in per.items():
        print(f"{name:26s} {s * 1000:7.1f} ms per request")
    two, three = per.values()
    print(f"three experts / two: {three / two:.2f}x the time per request")


if __name__ == "__main__":
    main()
