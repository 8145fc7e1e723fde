"""Scenario 4: size, speed and quality of the shipped GPTQ artifact against the float model.

The artifact comes from the same ``prepare`` path as production (cached by fingerprint; the
settings it kept were chosen on the *selection* split) and is loaded with the same ``Engine``
(``from_pretrained``). Quality is reported on the *report* split only: per task family, for the
default method (no template), and in full mode also for the old default template and a
task-worded template per family; plus the factual QA set.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from bench.workloads import prompts
from shared.config import Settings
from shared.schemas import GenerateRequest, TaskType
from workers.artifacts import float_dir, resolve_source, served_dir
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import OLD_DEFAULT_TEMPLATE, TASK_TEMPLATES, classification_report, qa_accuracy

BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
QA_QUICK = 8  # one generation batch
ROWS_QUICK = 24  # classification rows per model in a smoke run (the test suite's time; its figures are not reported)


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


def quality(engine: Engine, quick: bool) -> dict[str, Any]:
    """Report-split accuracy per family (default method; full mode adds the old default template
    and each family's task-worded template) and QA accuracy. Quick mode (a smoke run, its figures
    are not reported) takes the first ROWS_QUICK sentiment rows and QA_QUICK questions only."""
    only = {"sentiment"} if quick else None
    out: dict[str, Any] = {"default": classification_report(engine, "report", None, only, first=ROWS_QUICK if quick else None)}
    if not quick:
        out["old_template"] = classification_report(engine, "report", OLD_DEFAULT_TEMPLATE)
        out["task_template"] = classification_report(engine, "report", TASK_TEMPLATES)  # type: ignore[arg-type]
    out["qa"] = round(qa_accuracy(engine, first=QA_QUICK if quick else None), 4)
    return out


METHODS = ("default", "old_template", "task_template")  # what full mode measures per family


def family_bar(variants: dict[str, dict[str, Any]], within: float = 0.03) -> dict[str, dict[str, Any]] | None:
    """#12's acceptance, per family: the default method, for the float model and for every other
    variant (the shipped artifact), within ``within`` of the float model's best method measured
    here on the report split. None in quick mode (one method, one family)."""
    base = variants["float"]["report_split"]
    if not all(m in base for m in METHODS):
        return None
    bar = {}
    for family in (f for f in base["default"] if f != "overall"):
        method, best = max(((m, base[m][family]) for m in METHODS), key=lambda found: found[1])
        row: dict[str, Any] = {"best_float": best, "best_method": method}
        row.update({name: v["report_split"]["default"][family] for name, v in variants.items()})
        row["met"] = all(row[name] >= best - within - 1e-9 for name in variants)
        bar[family] = row
    return bar


def _tokens_per_s(engine: Engine, batch: int, new_tokens: int) -> float:
    items = [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=new_tokens)) for p in prompts(batch)]
    engine.generate(items[:1])
    started = time.perf_counter()
    answers = engine.generate(items)  # type: ignore[arg-type]
    return sum(a.usage.completion_tokens for a in answers) / (time.perf_counter() - started)


def run(settings: Settings, quick: bool, new_tokens: int) -> dict[str, Any]:
    from workers.prepare.quantize import prepare

    model = settings.models[0]
    float_path = float_dir(settings, model, resolve_source(model.source))
    float_tensors = tensor_sizes(float_path)
    fp16_bytes = sum(numel * 2 for numel, _ in float_tensors.values())
    batch = settings.max_batch_size(TaskType.TEXT_GENERATION)
    manifest = prepare(settings, model, report=lambda msg: print(f"[bench] {msg}", flush=True))
    rows: dict[str, dict[str, Any]] = {}
    for name, path in (("float", float_path), ("gptq (shipped)", served_dir(settings, model))):
        row: dict[str, Any] = {}
        if path != float_path:
            tensors = tensor_sizes(path)
            quant = {n: b for n, (_, b) in tensors.items() if n.endswith(QUANT_SUFFIXES)}
            modules = {n.rsplit(".", 1)[0] for n in quant}
            row["settings"] = manifest.get("chosen")
            row["bytes_quantized_linears"] = sum(quant.values())
            row["bytes_quantized_linears_fp16"] = sum(float_tensors[f"{m}.weight"][0] * 2 for m in modules)
        engine = Engine(model, path, device=settings.worker.device)
        row["bytes_saved_model"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        row["bytes_ratio_vs_fp16"] = round(row["bytes_saved_model"] / fp16_bytes, 3)
        row["report_split"] = quality(engine, quick)
        row["tokens_per_s_batch"] = round(_tokens_per_s(engine, batch, new_tokens), 1)
        del engine
        rows[name] = row
    served = rows["gptq (shipped)"]["report_split"]
    return {
        "quant_fp16_model_bytes": fp16_bytes,
        "quant_variants": rows,
        "quant_prepared_on": manifest.get("machine"),
        "quant_selection_loss_vs_float": manifest.get("loss_vs_float"),
        "quant_family_bar": family_bar(rows),
        "gptq_weight_bytes_ratio": rows["gptq (shipped)"]["bytes_ratio_vs_fp16"],
        "accuracy_float": rows["float"]["report_split"]["default"]["overall"],
        "accuracy_gptq": served["default"]["overall"],
        "qa_float": rows["float"]["report_split"]["qa"],
        "qa_gptq": served["qa"],
    }
