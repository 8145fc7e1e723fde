"""Scenario 4: size, speed and accuracy of each GPTQ variant against the float model.

Every variant goes through the same ``prepare`` path as production (cached by fingerprint) and is
loaded with the same ``Engine`` (``from_pretrained``); accuracy is measured on 124 clear reviews.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from bench.workloads import LABELS, TEMPLATE, labelled_reviews, prompts
from shared.config import ModelConfig, Settings
from shared.schemas import ClassifyRequest, GenerateRequest, TaskType
from workers.engine import Engine
from workers.models import float_dir, resolve_source, served_dir

BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
# Mixed precision: 8-bit for the layers GPTQ hurts most at this size (first/last two, down_proj).
MIXED = {r"+:.*down_proj.*": {"bits": 8}, r"+:.*layers\.(0|1|28|29)\..*": {"bits": 8}}


def tensor_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) for every tensor in the folder's safetensors files (headers only)."""
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                numel = math.prod(piece.get_shape())
                out[name] = (numel, numel * BYTES[piece.get_dtype()])
    return out


def variants(model: ModelConfig, quick: bool) -> dict[str, ModelConfig | None]:
    base = model.quantize
    found: dict[str, ModelConfig | None] = {"float": None, f"gptq-{base.bits}bit-g{base.group_size} (default)": model}
    if not quick:
        found["gptq-8bit-g64"] = model.model_copy(update={"quantize": base.model_copy(update={"bits": 8, "min_accuracy": 0.0})})
        found["gptq-4bit-g64-mixed8"] = model.model_copy(
            update={"quantize": base.model_copy(update={"dynamic": MIXED, "min_accuracy": 0.0})}
        )
    return found


def _accuracy(engine: Engine, reviews: list[tuple[str, str]], batch: int) -> float:
    correct = 0
    for start in range(0, len(reviews), batch):
        chunk = reviews[start : start + batch]
        items = [engine.prepare(ClassifyRequest(text=t, labels=LABELS, prompt_template=TEMPLATE)) for t, _ in chunk]
        correct += sum(a.output.label == gold for a, (_, gold) in zip(engine.classify(items), chunk, strict=True))  # type: ignore[arg-type,union-attr]
    return correct / len(reviews)


def _tokens_per_s(engine: Engine, batch: int, new_tokens: int) -> float:
    items = [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=new_tokens)) for p in prompts(batch)]
    engine.generate(items[:1])
    started = time.perf_counter()
    answers = engine.generate(items)  # type: ignore[arg-type]
    return sum(a.usage.completion_tokens for a in answers) / (time.perf_counter() - started)


def run(settings: Settings, quick: bool, new_tokens: int) -> dict[str, Any]:
    from workers.quantize import prepare

    model = settings.models[0]
    float_path = float_dir(settings, model, resolve_source(model.source))
    float_tensors = tensor_sizes(float_path)
    fp16_bytes = sum(numel * 2 for numel, _ in float_tensors.values())
    reviews = labelled_reviews()
    batch = settings.max_batch_size(TaskType.TEXT_GENERATION)
    rows: dict[str, dict[str, Any]] = {}
    for name, config in variants(model, quick).items():
        row: dict[str, Any] = {}
        try:
            if config is None:
                path = float_path
                row["bytes_quantized_linears"] = None
                engine = Engine(model, path, device=settings.worker.device)
            else:
                prepare(settings, config, report=lambda msg: print(f"[bench] {msg}", flush=True))
                path = served_dir(settings, config)
                tensors = tensor_sizes(path)
                quant = {n: b for n, (_, b) in tensors.items() if n.endswith(QUANT_SUFFIXES)}
                modules = {n.rsplit(".", 1)[0] for n in quant}
                row["bytes_quantized_linears"] = sum(quant.values())
                row["bytes_quantized_linears_fp16"] = sum(float_tensors[f"{m}.weight"][0] * 2 for m in modules)
                engine = Engine(config, path, device=settings.worker.device)
            row["bytes_saved_model"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            row["bytes_ratio_vs_fp16"] = round(row["bytes_saved_model"] / fp16_bytes, 3)
            row["accuracy"] = round(_accuracy(engine, reviews, batch), 4)
            row["tokens_per_s_batch"] = round(_tokens_per_s(engine, batch, new_tokens), 1)
            del engine
        except Exception as exc:  # noqa: BLE001 - a variant that fails to build or load is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows[name] = row
    default = next(k for k in rows if k.endswith("(default)"))
    return {
        "quant_examples": len(reviews),
        "quant_fp16_model_bytes": fp16_bytes,
        "quant_variants": rows,
        "gptq_weight_bytes_ratio": rows[default].get("bytes_ratio_vs_fp16"),
        "accuracy_float": rows["float"].get("accuracy"),
        "accuracy_gptq": rows[default].get("accuracy"),
    }
