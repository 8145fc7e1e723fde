"""`python -m bench [--quick | --smoke] [--json] [--only a,b]`: every scenario, side by side, in one run.

Writes bench/results/<full|quick|smoke>.json and prints a table; with --json the last line is one JSON
object with the headline ratios (fleet_vs_limit, fleet_vs_naive, interactive_p95_*, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

SCENARIOS = ("throughput", "isolation", "enqueue", "quantization", "scaling", "celery-floor", "machinery", "fast-model",
             "engine-core", "engine-sweep", "continuous", "decode", "cpu-peer")
SIZES = {
    # Small sizes: every scenario end to end in minutes; figures indicative, not reported.
    "quick": {"classify": 32, "generate": 8, "new_tokens": 16, "rounds": 1, "interactive": 6, "backlog": 200,
              "enqueue": 2000, "single": 100, "scaling": 48, "machinery": 200, "fast": 120,
              "continuous": 24, "core": 512},
    "full": {"classify": 512, "generate": 32, "new_tokens": 16, "rounds": 3, "interactive": 40, "backlog": 5000,
             "enqueue": 10000, "single": 500, "scaling": 256, "machinery": 2000, "fast": 1000,
             "continuous": 64, "core": 8000},
    # The test suite's plumbing check (tests/integration/test_bench_smoke.py): the least work that still
    # runs every part of a scenario (several batches, a backlog that outlasts the interactive probes); the
    # figures mean nothing.
    "smoke": {"classify": 16, "generate": 4, "new_tokens": 8, "rounds": 1, "interactive": 4, "backlog": 200,
              "enqueue": 400, "single": 30, "scaling": 16, "machinery": 60, "fast": 40,
              "continuous": 8, "core": 128},
}
RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def in_process_engine(settings: Any) -> Any:
    """The first configured model's engine in this process: the limit the fleet is compared with."""
    from workers.artifacts import prepared_path
    from workers.backends.transformers.batch_side import Engine

    model = settings.models[0]
    return Engine(model, prepared_path(settings, model), device=settings.worker.device)


def run(mode: str, only: list[str], shape: str | None = None, tokenizer: str | None = None,
        batches: list[str] | None = None, consumers: int | None = None, quant: str = "fp16") -> dict[str, Any]:
    """``shape``: measure a random-weight model of that shape (bench/shapes.py) instead of the
    configured ones; ``batches``: run `throughput` once per batch size ("shipped" = the config's);
    ``consumers``: the fleet's consumer processes (default: the device's, config worker.consumers)."""
    from shared.broker import broker_url
    from shared.config import load_settings
    from workers.backends import backend_for

    quick = mode != "full"
    settings = load_settings().on_device()
    env: dict[str, str] = {}
    if shape:
        from bench import shapes

        shaped = shapes.model_config(settings, shape, Path(tokenizer) if tokenizer else None, quant)
        settings = load_settings(models=[shaped]).on_device()
        env["AUTOGLM_MODELS"] = json.dumps([shaped])
    if consumers:
        env["AUTOGLM_WORKER__CONSUMERS"] = str(consumers)
    size = SIZES[mode]
    for model in settings.models:
        backend_for(model).prepare(settings, model, report=lambda msg: print(f"[bench] {msg}", flush=True))
    summary: dict[str, Any] = {"mode": mode, "device": device_name(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "shape": shape, "quant": quant, "consumers": consumers or settings.worker_consumers}
    with broker_url(settings.redis_url) as url:
        os.environ["REDIS_URL"] = url  # the naive baseline app reads it at import
        from bench.harness import Harness

        harness = Harness(settings, url, env)
        for name in only:
            print(f"[bench] scenario {name} ...", flush=True)
            started = time.perf_counter()
            if name == "throughput":
                from bench import throughput
                from shared.schemas import TaskType

                engine = in_process_engine(settings)
                by_batch: dict[str, Any] = {}
                for label in batches or ["shipped"]:
                    h, scale = harness, 1
                    if label != "shipped":
                        b = int(label)
                        # the token budget grows with the batch (512 padded tokens a row, as the CUDA default's
                        # 32 x 512): kept as configured, it capped a "64" classification batch at ~32 requests
                        batching = settings.batching.model_copy(
                            update={"max_batch_size": b, "max_batch_size_by_task": {TaskType.CLASSIFICATION: b}, "by_device": {},
                                    "max_batch_tokens": max(settings.batching.max_batch_tokens, 512 * b)})
                        h = Harness(settings.model_copy(update={"batching": batching}), url,
                                    {**env, "AUTOGLM_BATCHING": batching.model_dump_json()})
                        scale = max(1, b // 8)
                    result = throughput.run(h, engine, size["classify"] * scale, size["generate"] * scale, size["new_tokens"],
                                            size["rounds"], naive_share=0.25 / scale if shape else 1.0)
                    by_batch[label] = result
                    print(f"[bench] throughput at batch {label}: {json.dumps(result)}", flush=True)
                summary.update(by_batch[(batches or ["shipped"])[0]])
                if len(by_batch) > 1:
                    summary["throughput_by_batch"] = by_batch
                del engine
            elif name == "engine-sweep":
                from bench import sweep

                engine = in_process_engine(settings)
                summary.update(sweep.run(engine, [1, 8, 32] if quick else [1, 8, 16, 32, 64, 128], size["new_tokens"]))
                del engine
            elif name == "decode":
                from bench import decode

                engine = in_process_engine(settings)
                summary["gptq_kernels"] = sorted(engine.kernels)
                print(f"[bench] model GPTQ kernels on {engine.device}: {summary['gptq_kernels'] or 'none (float)'}; weights "
                      f"{decode.weight_bytes(engine.model) / 2**20:.0f} MiB on the device", flush=True)
                wanted = [int(b) for b in batches or [] if b.isdigit()] or ([1, 8] if quick else decode.GPU_BATCHES)
                if quant != "fp16":  # the served kernel against the same artifact dequantized, first
                    from bench import gptq_check

                    summary.update(gptq_check.run(engine, 8 if quick else 64))
                summary.update(decode.run(settings, engine, wanted, 16 if quick else 64))
                del engine
            elif name == "continuous":
                from bench import continuous

                engine = in_process_engine(settings)
                summary.update(continuous.run(settings, engine, size["continuous"], rate_per_s=float(
                    os.environ.get("AUTOGLM_BENCH_ARRIVALS_PER_S", "4")), rounds=1 if quick else 2))
                del engine
            elif name == "isolation":
                from bench import isolation

                summary.update(isolation.run(harness, size["interactive"], size["backlog"], size["new_tokens"]))
            elif name == "enqueue":
                from bench import enqueue

                summary.update(enqueue.run(harness, size["enqueue"], size["single"], rounds=1 if quick else 2))
            elif name == "quantization":
                from bench import quantization

                summary.update(quantization.run(settings, quick, size["new_tokens"]))
            elif name == "scaling":
                from bench import scaling

                summary.update(scaling.run(harness, size["scaling"]))
            elif name in ("celery-floor", "machinery"):
                if "machinery_n" in summary:
                    continue  # both ran together, alternating rounds
                from bench import machinery

                which = {n for n in only if n in ("celery-floor", "machinery")}
                summary.update(machinery.run(harness, size["machinery"], size["rounds"], which))
            elif name == "fast-model":
                from bench import fast_model

                summary.update(fast_model.run(harness, size["fast"], size["rounds"]))
            elif name == "engine-core":
                from bench import engine_core

                batch = next((int(b) for b in batches or [] if b.isdigit()), 32)  # --batch, else the CUDA default's 32
                summary.update(engine_core.run(harness, size["core"], size["rounds"], batch))
            elif name == "cpu-peer":
                from bench import cpu_peer

                summary.update(cpu_peer.run(harness, quick))
            summary[f"seconds_{name}"] = round(time.perf_counter() - started, 1)
    return summary


def table(summary: dict[str, Any]) -> str:
    targets = [
        ("fleet_vs_limit", ">= 0.85", lambda v: v >= 0.85),
        ("fleet_vs_naive", ">= 4", lambda v: v >= 4),
        ("interactive_p95_ratio", "<= 1.5", lambda v: v <= 1.5),
        ("enqueue_tasks_per_s", ">= 5000", lambda v: v >= 5000),
        ("submit_p99_ms", "<= 5", lambda v: v <= 5),
        ("gptq_weight_bytes_ratio", "<= 0.5", lambda v: v <= 0.5),
        ("machinery_vs_celery_floor", ">= 0.8", lambda v: v >= 0.8),
        ("fast_fleet_vs_naive", ">= 1.25", lambda v: v >= 1.25),
        ("continuous_ttft_p95_gain", ">= 2", lambda v: v >= 2),
        ("continuous_throughput_ratio", ">= 0.9", lambda v: v >= 0.9),
        ("llama_cpp_single_vs_peer", ">= 1.0", lambda v: v >= 1.0),
        ("llama_cpp_8_vs_peer", ">= 2", lambda v: v >= 2),
        ("llama_cpp_q8_0_single_vs_peer", ">= 1.0", lambda v: v >= 1.0),
        ("llama_cpp_q8_0_8_vs_peer", ">= 2", lambda v: v >= 2),
        ("llama_cpp_interactive_p95_ratio", "<= 1.5", lambda v: v <= 1.5),
        ("llama_cpp_label_agreement", ">= 0.95", lambda v: v >= 0.95),
    ]
    lines = [f"device: {summary['device']}  mode: {summary['mode']}", "", "| metric | value | target | met |", "|---|---|---|---|"]
    for key, target, ok in targets:
        if summary.get(key) is not None:
            lines.append(f"| {key} | {summary[key]} | {target} | {'yes' if ok(summary[key]) else 'NO'} |")
    if summary.get("accuracy_float") is not None and summary.get("accuracy_gptq") is not None:
        gap = (summary["accuracy_float"] - summary["accuracy_gptq"]) * 100
        lines.append(f"| accuracy float / gptq (report split, default method) | {summary['accuracy_float']:.3f} / "
                     f"{summary['accuracy_gptq']:.3f} | gap <= 3 pts | {'yes' if gap <= 3 else 'NO'} |")
        qa_gap = (summary["qa_float"] - summary["qa_gptq"]) * 100
        lines.append(f"| QA float / gptq | {summary['qa_float']:.3f} / {summary['qa_gptq']:.3f} | gap <= 10 pts | "
                     f"{'yes' if qa_gap <= 10 else 'NO'} |")
    for family, row in (summary.get("quant_family_bar") or {}).items():
        shown = " / ".join(f"{row[name]:.3f}" for name in row if name not in ("best_float", "best_method", "met"))
        lines.append(f"| {family}: default float / gptq vs float's best ({row['best_method']}, report split) | {shown} vs "
                     f"{row['best_float']:.3f} | within 3 pts | {'yes' if row['met'] else 'NO'} |")
    lines.append("")
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~2 minutes on 2 cores")
    parser.add_argument("--smoke", action="store_true", help="the least work that runs every part of each scenario "
                        "(the test suite's plumbing check); figures mean nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--only", default=",".join(s for s in SCENARIOS if s not in ("engine-sweep", "cpu-peer")),
                        help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--quant", choices=["fp16", "gptq4", "gptq8"], default="fp16", help="with --shape: the "
                        "weights as they are (fp16 on a GPU) or a GPTQ artifact of them made here")
    parser.add_argument("--shape", choices=["1.7b", "135m", "tiny"], help="measure speed on a random-weight model of this "
                        "shape, built on this machine (e.g. 1.7b on a GPU; bench/shapes.py)")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape (default: the bundled model's)")
    parser.add_argument("--batch", default="", help="comma-separated batch sizes for `throughput`, each run side by "
                        "side with its own limit and naive ('shipped' = the config's), e.g. shipped,32")
    parser.add_argument("--consumers", type=int, default=None, help="the fleet's consumer processes per worker "
                        "(default: config worker.consumers, by device)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    if args.shape and {"quantization", "scaling"} & set(only):
        parser.error("--shape measures speed only: a random-weight model has no quality to report")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    summary = run(mode, only, args.shape, args.tokenizer, [b for b in args.batch.split(",") if b] or None, args.consumers,
                  args.quant)
    RESULTS.mkdir(exist_ok=True)
    tag = f"-{args.shape}" + ("" if args.quant == "fp16" else f"-{args.quant}") if args.shape else ""
    (RESULTS / f"{mode}{tag}.json").write_text(json.dumps(summary, indent=2))
    print(table(summary), flush=True)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
