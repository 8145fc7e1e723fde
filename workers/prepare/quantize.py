"""`autoglm models prepare`: source weights -> float HF folder -> GPTQ folder, once, cached.

Workers never quantize; they load what this step leaves on disk. Each step writes into a temporary
folder and renames it into place, so an interrupted run leaves nothing half-written and a re-run
picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from shared.config import ModelConfig, QuantizeConfig, Settings
from shared.errors import ErrorCode, FleetError
from workers.artifacts import (
    MANIFEST,
    Source,
    classification_method,
    float_dir,
    read_manifest,
    resolve_source,
    served_dir,
    shared_artifact,
)
from workers.prepare.console import steps_only

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def machine() -> dict[str, Any]:
    """Where an artifact was prepared: GPTQ's greedy rounding follows the float arithmetic of the
    CPU/GPU and the library versions, so the same settings give different models elsewhere."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    found: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "platform": platform.platform(), "python": platform.python_version()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    for package in ("torch", "transformers", "gptqmodel"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def calibration_texts(quantize: QuantizeConfig) -> list[str]:
    """Paragraphs from a built-in set (``docstrings``) or a text file, blank-line separated."""
    name = quantize.calibration
    if name == "docstrings":
        raw = resources.files("workers.prepare.data").joinpath("calibration_docstrings.txt").read_text()
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


def _seed(seed: int) -> None:
    """Same machine, same inputs, same artifact: GPTQModel sorts the calibration set itself
    (longest first); what is left to chance is seeded here."""
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def compute_dtype(quantize: QuantizeConfig, device: str) -> str | None:
    """The dtype the float model runs in while GPTQModel quantizes it (None: GPTQModel decides).

    GPTQModel 7.6 always picks bfloat16 on a CPU. Without native bf16 (an AVX2-only CPU) a bf16
    matmul is emulated: 512x576x1536 took 799 ms against 26.6 ms in float32, and the calibration
    forwards were 552 s of an 873 s quantization. Such a CPU quantizes in float32. Decided by the
    CPU's flags, not a timing, so one machine always makes the same choice (and the same artifact).
    """
    import torch

    if quantize.compute_dtype is not None or device != "cpu":
        return quantize.compute_dtype
    # torch's own CPU-flag probes (private: a torch without them counts as no native bf16).
    native_bf16 = any(getattr(torch.cpu, probe, lambda: False)()
                      for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bfloat16" if native_bf16 else "float32"


def quantize_gptq(float_path: Path, target: Path, quantize: QuantizeConfig, report: Report) -> str:
    """Quantize into ``target`` (replaced whole); returns the dtype the float model ran in (as
    loaded, so a GPU's, which GPTQModel chooses, is recorded too)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel import QuantizeConfig as GPTQConfig

    texts = calibration_texts(quantize)
    if quantize.calibration_format == "chat":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(float_path)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": "Explain this, please."},
                                                {"role": "assistant", "content": text}], tokenize=False)
                 for text in texts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = quantize.settings()
    dtype = compute_dtype(quantize, device)
    report(f"quantizing with GPTQModel {settings} on {device} in {dtype or 'its default dtype'} "
           f"({len(texts)} calibration samples, {quantize.calibration_batch_size} per pass) ...")
    started = time.perf_counter()
    options = {k: v for k, v in settings.items() if k not in ("calibration", "calibration_samples", "calibration_format")}
    _seed(quantize.seed)
    extra = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model = GPTQModel.load(str(float_path), GPTQConfig(**options), device=device, **extra)
    ran_in = str(model.model.dtype).removeprefix("torch.")
    model.quantize(texts, batch_size=quantize.calibration_batch_size)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    del model
    _publish(tmp, target)
    report(f"quantized in {time.perf_counter() - started:.0f}s -> {target}")
    return ran_in


# Examples per label the gate shows (the first of each label's selection rows): a request's
# examples reach the model through representations quantization can move (#35: the 8-bit LM's hidden
# states separated spam examples the float model's did), so the artifact is held to both ways.
GATE_EXAMPLES = 4


def measure(settings: Settings, model: ModelConfig, path: Path, qa_floor: float | None = None) -> dict[str, Any]:
    """Selection-split classification (default method, per family, zero-shot and with
    ``GATE_EXAMPLES`` examples per label) and factual QA of one folder.

    QA goes first (seconds); below ``qa_floor`` the attempt has already missed its gate, and the
    classification pass (minutes on a 2-core CPU) is skipped: ``classification`` is then None.
    """
    from workers.backends.transformers.batch_side import Engine
    from workers.prepare.evaluation import classification_report, qa_accuracy

    engine = Engine(model, path, device=settings.worker.device)
    qa = round(qa_accuracy(engine), 4)
    if qa_floor is not None and qa < qa_floor - 1e-9:
        return {"classification": None, "qa": qa}
    return {"classification": classification_report(engine, "selection", examples=GATE_EXAMPLES), "qa": qa}


def float_baseline(settings: Settings, model: ModelConfig, float_path: Path, report: Report) -> dict[str, Any]:
    """The float model's scores, cached beside its weights per (eval data, classification config):
    a re-prepare (or another quantize config) does not measure the same float model again."""
    from workers.prepare.evaluation import data_fingerprint

    key = hashlib.sha256(json.dumps([data_fingerprint(), classification_method(model), GATE_EXAMPLES], sort_keys=True).encode()).hexdigest()[:16]
    cache = float_path / f"autoglm-eval-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    report("measuring the float model on the selection split (classification families + QA) ...")
    started = time.perf_counter()
    scores = measure(settings, model, float_path)
    report(f"float ({time.perf_counter() - started:.0f}s): {scores}")
    cache.write_text(json.dumps(scores))
    return scores


def _losses(float_scores: dict[str, Any], scores: dict[str, Any]) -> tuple[float | None, float | None, float]:
    """Classification loss (families' mean), the worst single family's loss, and QA loss; the
    first two are None when classification was not measured."""
    qa_loss = round(float_scores["qa"] - scores["qa"], 4)
    if scores["classification"] is None:
        return None, None, qa_loss
    found, base = scores["classification"], float_scores["classification"]
    mean = base["overall"] - found["overall"]
    worst = max((base[name] - found[name] for name in base if name != "overall" and name in found), default=mean)
    return round(mean, 4), round(worst, 4), qa_loss


def prepare(settings: Settings, model: ModelConfig, report: Report = print, force: bool = False) -> dict[str, Any]:
    """Idempotent: returns the manifest of the artifact workers will load, building it if needed.

    GPTQ attempts run in order (the configured settings, then ``quantize.alternatives``) until one
    loses at most ``max_loss_vs_float`` classification accuracy and ``max_qa_loss_vs_float`` QA
    accuracy against the float model on the selection split; no attempt starts after
    ``time_budget_s``. The best attempt is kept; if even that misses the gates, nothing is shipped
    and MODEL_UNAVAILABLE says what was measured.
    """
    source = resolve_source(model.source)
    target = served_dir(settings, model, source)
    manifest = read_manifest(target)
    if manifest is not None and not force:
        report(f"{model.name}: prepared artifact cached at {target}")
        return manifest
    shared = None if force else shared_artifact(settings, model, source)
    if shared is not None:
        report(f"{model.name}: shares the artifact at {shared} (same source and quantize settings)")
        return read_manifest(shared) or {}
    log_path = Path(settings.cache_dir) / "logs" / f"prepare-{model.name}.log"
    with steps_only(log_path, report) as report:
        float_path = ensure_float(settings, model, source, report)
        quantize = model.quantize
        measured = quantize.measure
        float_scores = float_baseline(settings, model, float_path, report) if measured else None
        attempts: list[dict[str, Any]] = []
        if quantize.method == "none":
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(float_path, tmp)
            _publish(tmp, target)
            chosen: dict[str, Any] = {"settings": None, "scores": float_scores, "loss_vs_float": 0.0, "qa_loss_vs_float": 0.0}
        else:
            started = time.perf_counter()
            best: tuple[float, Path] | None = None
            chosen = {}
            for index, attempt in enumerate(quantize.attempts()):
                if index and time.perf_counter() - started > quantize.time_budget_s:
                    report(f"time budget {quantize.time_budget_s:.0f}s spent; {len(quantize.alternatives) - index + 1} alternatives not tried")
                    break
                folder = target.with_name(f"{target.name}.attempt{index}")
                dtype = quantize_gptq(float_path, folder, attempt, report)
                family_limit = quantize.max_family_loss_vs_float
                if measured:
                    measuring = time.perf_counter()
                    scores = measure(settings, model, folder, qa_floor=float_scores["qa"] - quantize.max_qa_loss_vs_float)
                    loss, worst, qa_loss = _losses(float_scores, scores)
                    passed = loss is not None and worst is not None and loss <= quantize.max_loss_vs_float + 1e-9 \
                        and qa_loss <= quantize.max_qa_loss_vs_float + 1e-9 \
                        and (family_limit is None or worst <= family_limit + 1e-9)
                else:  # a random-weight speed model: no quality to gate (bench/gptq_check.py checks the kernel)
                    scores, loss, worst, qa_loss, passed = None, None, None, 0.0, True
                record = {"settings": attempt.settings(), "scores": scores, "loss_vs_float": loss,
                          "qa_loss_vs_float": qa_loss, "worst_family_loss_vs_float": worst, "passed": passed,
                          "quantized_in": dtype}
                attempts.append(record)
                shown = f"{loss * 100:+.1f} pts" if loss is not None else "not measured (QA already missed)" if measured \
                    else "not measured (quantize.measure: false)"
                family = "" if worst is None else f" (worst family {worst * 100:+.1f})"
                took = f" (measured in {time.perf_counter() - measuring:.0f}s)" if measured else ""
                report(f"attempt {index} {attempt.settings()}: classification loss {shown}{family}, "
                       f"QA loss {qa_loss * 100:+.1f} pts -> {'keep' if passed else 'miss'}{took}")
                known = 1.0 if loss is None else loss  # an unmeasured attempt ranks below any measured one
                badness = max(known - quantize.max_loss_vs_float, 0) + max(qa_loss - quantize.max_qa_loss_vs_float, 0) + known / 100
                if family_limit is not None:
                    badness += max((1.0 if worst is None else worst) - family_limit, 0)
                if best is None or badness < best[0]:
                    if best is not None:
                        shutil.rmtree(best[1], ignore_errors=True)
                    best, chosen = (badness, folder), record
                else:
                    shutil.rmtree(folder, ignore_errors=True)
                if passed:
                    break
            assert best is not None
            if not chosen["passed"]:
                shutil.rmtree(best[1], ignore_errors=True)
                raise FleetError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"{model.name}: no quantization attempt kept the float model's quality (best lost "
                    f"{'unmeasured' if chosen['loss_vs_float'] is None else format(chosen['loss_vs_float'] * 100, '.1f')} pts of classification accuracy, limit "
                    f"{quantize.max_loss_vs_float * 100:.1f}; {chosen['qa_loss_vs_float'] * 100:.1f} pts of QA, limit "
                    f"{quantize.max_qa_loss_vs_float * 100:.1f}"
                    + ("" if quantize.max_family_loss_vs_float is None or chosen["worst_family_loss_vs_float"] is None else
                       f"; {chosen['worst_family_loss_vs_float'] * 100:.1f} pts on its worst family, limit "
                       f"{quantize.max_family_loss_vs_float * 100:.1f}")
                    + "); add quantize.alternatives (more bits, other "
                    "calibration) or raise the limits, then prepare again",
                )
            _publish(best[1], target)
        manifest = {
            "name": model.name,
            "model_name": model.model_name,
            "source": model.source,
            "quantize": quantize.model_dump(),
            "chosen": chosen["settings"],
            "classification_method": classification_method(model),
            "loss_vs_float": chosen["loss_vs_float"],
            "qa_loss_vs_float": chosen["qa_loss_vs_float"],
            "worst_family_loss_vs_float": chosen.get("worst_family_loss_vs_float", 0.0),
            "float": float_scores,
            "served": chosen["scores"],
            "attempts": attempts,
            "accuracy_float": float_scores["classification"]["overall"] if measured else None,
            "accuracy_served": chosen["scores"]["classification"]["overall"] if measured else None,
            "bytes_float": _dir_bytes(float_path),
            "bytes_served": _dir_bytes(target),
            "machine": machine(),
            "quantized_in": chosen.get("quantized_in"),
            "prepared_at": time.time(),
        }
        if not measured:
            kept = "served as is" if quantize.method == "none" else f"kept {chosen['settings']}"
            report(f"{model.name}: {kept}, accuracy not measured (quantize.measure: false); "
                   f"{manifest['bytes_served'] / 1e6:.0f} MB")
        else:
            report(
                f"{model.name}: kept {chosen['settings']}; selection-split accuracy float "
                f"{manifest['accuracy_float']:.1%} vs served {manifest['accuracy_served']:.1%} "
                f"(loss {chosen['loss_vs_float'] * 100:+.1f} pts, worst family "
                f"{manifest['worst_family_loss_vs_float'] * 100:+.1f}), QA float {float_scores['qa']:.0%} vs served "
                f"{chosen['scores']['qa']:.0%}; size {manifest['bytes_float'] / 1e6:.0f} MB -> {manifest['bytes_served'] / 1e6:.0f} MB"
            )
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return manifest
