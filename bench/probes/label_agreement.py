"""Probe: do the llama_cpp and transformers backends give the same labels on every report row?

In process, no fleet: the transformers ``Engine`` on the served GPTQ artifact and the ``LlamaEngine``
on the bundled GGUF file (``--requantize`` as the backend's option), the default method, every
family's report rows (the bench's cpu-peer scenario compares the first 4 of each at quick size), in
batches of 16. Prints agreement and each backend's accuracy per family, and tasks/s of each.

    python -m bench.probes.label_agreement [--requantize none,Q8_0,Q4_0,IQ4_NL,...] [--rows N]

(``--requantize`` takes several, comma-separated: the transformers labels are computed once.)
"""
from __future__ import annotations

import argparse
import json
import time

from shared.config import ModelConfig, load_settings
from shared.schemas import ClassifyRequest
from workers.artifacts import prepared_path
from workers.backends import batch_side
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import families, new_families


def labels(engine: Engine, rows: list[tuple[str, list[str]]]) -> tuple[list[str], float]:
    started, found = time.perf_counter(), []
    for i in range(0, len(rows), 16):
        batch = [engine.prepare(ClassifyRequest(text=text, labels=names)) for text, names in rows[i:i + 16]]
        found += [answer.output.label for answer in engine.classify(batch)]
    return found, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requantize", default="Q8_0",
                        help="the llama_cpp option, or several comma-separated (none: the file as it is)")
    parser.add_argument("--rows", type=int, default=None, help="report rows per family (default: all)")
    args = parser.parse_args()
    settings = load_settings()
    bundled = settings.models[0]
    reference = Engine(bundled, prepared_path(settings, bundled), device="cpu")
    reports = [(family, family.examples("report")[: args.rows]) for family in (*families(), *new_families())]
    theirs: dict[str, list[str]] = {}
    t_seconds = 0.0
    for family, examples in reports:
        theirs[family.name], took = labels(reference, [(text, family.labels) for text, _ in examples])
        t_seconds += took
    total = sum(len(examples) for _, examples in reports)
    for requantize in args.requantize.split(","):
        options = {} if requantize == "none" else {"requantize": requantize}
        llama_config = ModelConfig(**{**bundled.model_dump(), "name": f"{bundled.name}-llama", "backend": "llama_cpp",
                                      "options": options})
        llama = batch_side(settings, llama_config)
        out: dict[str, dict[str, float]] = {}
        l_seconds, agree_total = 0.0, 0
        for family, examples in reports:
            ours, took = labels(llama, [(text, family.labels) for text, _ in examples])
            l_seconds += took
            agree = sum(a == b for a, b in zip(ours, theirs[family.name], strict=True))
            agree_total += agree
            out[family.name] = {
                "rows": len(examples), "agree": round(agree / len(examples), 4),
                "accuracy_transformers": round(sum(a == g for a, (_, g) in zip(theirs[family.name], examples, strict=True))
                                               / len(examples), 4),
                "accuracy_llama_cpp": round(sum(a == g for a, (_, g) in zip(ours, examples, strict=True)) / len(examples), 4)}
            print(f"{requantize} {family.name}: {json.dumps(out[family.name])}", flush=True)
        llama.close()
        print(json.dumps({"requantize": requantize, "rows": total, "agree": round(agree_total / total, 4),
                          "tasks_per_s": {"transformers": round(total / t_seconds, 2), "llama_cpp": round(total / l_seconds, 2)},
                          "families": out}), flush=True)

if __name__ == "__main__":
    main()
