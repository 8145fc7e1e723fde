"""`autoglm models prepare`: source weights -> float HF folder -> GPTQ folder, once, cached.

Workers never quantize; they load what this step leaves on disk. Each step writes into a temporary
folder and renames it into place, so an interrupted run leaves nothing half-written and a re-run
picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from shared.config import ModelConfig, QuantizeConfig, Settings
from shared.errors import ErrorCode, FleetError
from workers.models import MANIFEST, Source, float_dir, read_manifest, resolve_source, served_dir

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def calibration_texts(quantize: QuantizeConfig) -> list[str]:
    """Paragraphs from a built-in set (``docstrings``) or a text file, blank-line separated."""
    name = quantize.calibration
    if name == "docstrings":
        raw = resources.files("workers.data").joinpath("calibration_docstrings.txt").read_text()
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FleetError(ErrorCode.INVALID_INPUT, f"calibration set {name!r}: no built-in set or file by that name")
        raw = path.read_text()
    blocks = [" ".join(b.split()) for b in raw.split("\n\n")]
    texts = [b for b in blocks if b and not b.startswith("#")]
    if len(texts) < quantize.calibration_samples:
        log.warning("calibration set has %d samples, fewer than the %d asked for", len(texts), quantize.calibration_samples)
    return texts[: quantize.calibration_samples]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)


def ensure_float(settings: Settings, model: ModelConfig, source: Source, report: Report) -> Path:
    """A float HF folder: the source itself, or a one-time dequantisation of a GGUF file."""
    if source.gguf_file is None:
        return source.folder
    target = float_dir(settings, model, source)
    if (target / "config.json").exists():
        report(f"float weights cached at {target}")
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    report(f"converting {source.gguf_file} to a float Hugging Face folder ...")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)
    report(f"float weights saved to {target} ({_dir_bytes(target) / 1e6:.0f} MB, {time.perf_counter() - started:.0f}s)")
    return target


def quantize_gptq(float_path: Path, target: Path, quantize: QuantizeConfig, report: Report) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel import QuantizeConfig as GPTQConfig

    texts = calibration_texts(quantize)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report(
        f"quantizing with GPTQModel: {quantize.bits}-bit, group {quantize.group_size}, "
        f"{len(texts)} calibration samples ({quantize.calibration}) on {device} ..."
    )
    started = time.perf_counter()
    config = GPTQConfig(
        bits=quantize.bits, group_size=quantize.group_size, desc_act=quantize.desc_act, dynamic=quantize.dynamic
    )
    model = GPTQModel.load(str(float_path), config, device=device)
    model.quantize(texts)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    _publish(tmp, target)
    report(f"quantized in {time.perf_counter() - started:.0f}s -> {target}")


def prepare(settings: Settings, model: ModelConfig, report: Report = print, force: bool = False) -> dict[str, Any]:
    """Idempotent: returns the manifest of the artifact workers will load, building it if needed."""
    from workers.engine import Engine
    from workers.evaluation import sentiment_accuracy

    source = resolve_source(model.source)
    target = served_dir(settings, model, source)
    manifest = read_manifest(target)
    if manifest is not None and not force:
        report(f"{model.name}: prepared artifact cached at {target}")
        return manifest
    float_path = ensure_float(settings, model, source, report)
    if model.quantize.method == "gptq":
        quantize_gptq(float_path, target, model.quantize, report)
    else:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(float_path, tmp)
        _publish(tmp, target)

    report("measuring classification accuracy on the built-in sentiment set (float vs served) ...")
    float_acc = sentiment_accuracy(Engine(model, float_path, device=settings.worker.device))
    served_acc = sentiment_accuracy(Engine(model, target, device=settings.worker.device))
    manifest = {
        "name": model.name,
        "model_name": model.model_name,
        "source": model.source,
        "quantize": model.quantize.model_dump(),
        "accuracy_float": float_acc,
        "accuracy_served": served_acc,
        "bytes_float": _dir_bytes(float_path),
        "bytes_served": _dir_bytes(target),
        "prepared_at": time.time(),
    }
    report(
        f"{model.name}: sentiment accuracy float {float_acc:.0%} vs served {served_acc:.0%}; "
        f"size {manifest['bytes_float'] / 1e6:.0f} MB -> {manifest['bytes_served'] / 1e6:.0f} MB"
    )
    if served_acc < model.quantize.min_accuracy:
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"{model.name}: quantized accuracy {served_acc:.0%} is below quantize.min_accuracy "
            f"{model.quantize.min_accuracy:.0%}; change the calibration set or bits and prepare again",
        )
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
