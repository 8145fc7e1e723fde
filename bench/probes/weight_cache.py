"""Probe: a GPTQ folder on a CPU with and without ``cpu_weight_cache``, side by side.

Two in-process Engines over the same folder (``--model``, e.g. an 8-bit artifact that gptqmodel
serves with ``TorchLinear``), one with the cache off (every call dequantizes every weight) and one
with it on (the dequantized weight is kept after its first use). Rounds alternate between them so
machine noise hits both: batch-8 greedy generation (``--new-tokens``) and classification batches
of 16 selection rows. Also checks that both give the same text and the same labels.

    python -m bench.probes.weight_cache --model DIR [--rounds 2] [--new-tokens 32] [--rows 16]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.workloads import prompts
from shared.config import load_settings
from shared.schemas import ClassifyRequest, GenerateRequest
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16, help="selection rows per family")
    args = parser.parse_args()
    model = load_settings().models[0]
    engines = {f"cache {'on' if on else 'off'}": Engine(model.model_copy(update={"cpu_weight_cache": on}), args.model,
                                                         device="cpu") for on in (False, True)}
    tokens = dict.fromkeys(engines, 0)
    gen_s = dict.fromkeys(engines, 0.0)
    cls_s = dict.fromkeys(engines, 0.0)
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            items = [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=args.new_tokens)) for p in prompts(8)]
            started = time.perf_counter()
            answers = engine.generate(items)  # type: ignore[arg-type]
            gen_s[name] += time.perf_counter() - started
            tokens[name] += sum(a.usage.completion_tokens for a in answers)
            texts[name] = [a.output.text for a in answers]  # type: ignore[union-attr]
            found = []
            started = time.perf_counter()
            for family in families():
                rows = family.examples("selection")[: args.rows]
                requests = [engine.prepare(ClassifyRequest(text=text, labels=family.labels)) for text, _ in rows]
                found += [a.output.label for a in engine.classify(requests)]  # type: ignore[arg-type, union-attr]
            cls_s[name] += time.perf_counter() - started
            labels[name] = found
    for name in engines:
        per_request = cls_s[name] / args.rounds / len(labels[name]) * 1000
        print(f"{name}: generation {tokens[name] / gen_s[name]:.1f} tok/s (batch 8), "
              f"classification {per_request:.0f} ms per request (batches of {args.rows})")
    off, on = engines
    print(f"cache on vs off: generation {tokens[on] / gen_s[on] / (tokens[off] / gen_s[off]):.2f}x, "
          f"classification {cls_s[off] / cls_s[on]:.2f}x; same text {texts[on] == texts[off]}, "
          f"same labels {sum(a == b for a, b in zip(labels[on], labels[off], strict=True))}/{len(labels[on])}")


if __name__ == "__main__":
    main()
