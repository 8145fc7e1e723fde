"""Probe: classification on a CPU with rows scored as one padded pass vs sorted by length in short passes.

One in-process Engine (the float folder or ``--model``), the selection rows of every family in
batches of 16 (what evaluation and the prepare gate send), timed alternately with
``CPU_FORWARD_TOKENS`` huge (the old single pass, padded to the longest row) and at its default, so
machine noise hits both. Also checks both give the same labels.

    python -m bench.probes.scoring_passes [--rounds 2] [--rows 32] [--model DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from shared.config import load_settings
from shared.schemas import ClassifyRequest
from workers.artifacts import float_dir, resolve_source
from workers.backends.transformers import batch_side as engine_module
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32, help="selection rows per family")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    settings = load_settings()
    model = settings.models[0]
    path = args.model or float_dir(settings, model, resolve_source(model.source))
    engine = Engine(model, path, device="cpu")
    batches = []
    for family in families():
        rows = family.examples("selection")[: args.rows]
        requests = [engine.prepare(ClassifyRequest(text=text, labels=family.labels)) for text, _ in rows]
        batches += [requests[i:i + 16] for i in range(0, len(requests), 16)]
    budgets = {"one padded pass": 10**9, f"sorted, passes of {engine_module.CPU_FORWARD_TOKENS}": engine_module.CPU_FORWARD_TOKENS}
    seconds = dict.fromkeys(budgets, 0.0)
    labels: dict[str, list[str]] = {}
    for batch in batches[:1]:
        engine.classify(batch)  # calibration priors and first-call setup outside the clock
    for _ in range(args.rounds):
        for name, budget in budgets.items():
            engine_module.CPU_FORWARD_TOKENS = budget
            started = time.perf_counter()
            found = [a.output.label for batch in batches for a in engine.classify(batch)]  # type: ignore[union-attr]
            seconds[name] += time.perf_counter() - started
            labels[name] = found
    count = sum(len(b) for b in batches) * args.rounds
    for name, s in seconds.items():
        print(f"{name:26s} {s / count * 1000:7.1f} ms per request")
    old, new = seconds.values()
    same = sum(a == b for a, b in zip(*labels.values(), strict=True))
    print(f"speed-up {old / new:.2f}x; same label on {same}/{len(next(iter(labels.values())))} requests")


if __name__ == "__main__":
    main()
