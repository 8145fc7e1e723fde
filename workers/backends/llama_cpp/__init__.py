"""The ``llama_cpp`` backend: a GGUF file served by llama.cpp on CPU workers.

Why a second local backend: on a CPU, llama.cpp's quantized kernels decode a GGUF model several
times faster than transformers runs the dequantized GPTQ artifact (docs/architecture.md, "Which
backend on a CPU"). GPTQ through transformers stays the card's path and the GPU path; a model
whose source is a GGUF file may be served by either. Installed as an extra
(``pip install '.[llama-cpp]'``): llama-cpp-python builds llama.cpp from source.

Requests are prepared as for the transformers backend, with the GGUF file's own tokenizer and chat
template (exported once to a folder beside the prepared models), so both backends see the same
token ids; classification uses the same method (workers/backends/llama_cpp/llama_engine.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.config import ModelConfig, Settings
from shared.errors import ErrorCode, FleetError
from workers.artifacts import Source, resolve_source
from workers.backends.base import Backend


class LlamaCppOptions(BaseModel):
    """A model entry's ``options:`` for this backend."""

    model_config = ConfigDict(extra="forbid")

    threads: int | None = Field(default=None, ge=1, description="llama.cpp threads; None: the CPUs this process may use.")
    kv_tokens: int = Field(default=8192, ge=256, description="KV cells shared by the generating rows (at least "
                           "the model's context); a row reserves prompt + max_new_tokens when it joins.")
    step_tokens: int = Field(default=512, ge=16, description="Tokens per generation step: decoding rows' one token "
                             "each, then chunks of joining rows' prompts.")
    score_tokens: int = Field(default=4096, ge=256, description="The longest scored row, in tokens (a "
                              "classification decode of one row).")
    score_chunk_tokens: int = Field(default=32, ge=16, description="Tokens per classification decode of several "
                                    "rows (a longer row is a decode of its own). Between two decodes interactive "
                                    "generation runs, so a classification batch holds it back by one decode, not "
                                    "the whole batch; on a CPU a decode's time grows with its tokens, so smaller "
                                    "decodes cost classification little (docs/architecture.md).")
    score_rows: int = Field(default=64, ge=1, description="Sequences per classification decode.")
    flash_attn: bool = Field(default=True, description="llama.cpp's flash-attention kernels; its default (auto) "
                             "leaves them off on a CPU, where they decode and score faster (docs/architecture.md).")
    log: bool = Field(default=False, description="Let llama.cpp's own log through (loading prints hundreds of lines).")
    requantize: Literal["Q8_0", "Q4_0"] | None = Field(
        default=None, description="Serve the file converted to this type (once, cached beside the prepared models): "
        "llama.cpp's CPU matrix-matrix kernels take Q8_0 and Q4_0, not Q4_1, so batched decoding and "
        "classification run faster (Q8_0 holds Q4_1's values to 8 bits; Q4_0 rounds them again).")


def served_gguf(settings: Settings, config: ModelConfig, source: Source, options: LlamaCppOptions) -> Path:
    """The GGUF file the engine loads: the source, or its ``requantize`` conversion, made once with
    llama.cpp's own ``llama_model_quantize`` (under a second on the bundled model) and kept by the
    source's fingerprint."""
    original = gguf_path(config, source)
    if options.requantize is None:
        return original
    path = settings.models_dir / "gguf" / f"{config.name}-{source.fingerprint}-{options.requantize.lower()}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    if not convert_gguf(original, partial, options.requantize):
        partial.unlink(missing_ok=True)
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model {config.name}: llama.cpp could not convert "
                         f"{original.name} to {options.requantize}")
    partial.rename(path)
    return path


def convert_gguf(original: Path, target: Path, weight_type: str) -> bool:
    """``original`` converted to ``weight_type`` (a llama.cpp type name: Q8_0, Q4_0, ...) at
    ``target`` by llama.cpp's own ``llama_model_quantize``, already quantized weights included.
    False if llama.cpp could not."""
    import ctypes

    from workers.backends.llama_cpp.llama_engine import cpu_threads, import_llama

    llama = import_llama()
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{weight_type}")
    params.allow_requantize, params.nthread = True, cpu_threads()
    return llama.llama_model_quantize(str(original).encode(), str(target).encode(), ctypes.byref(params)) == 0


def gguf_path(config: ModelConfig, source: Source) -> Path:
    if source.gguf_file is None:
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model {config.name}: the llama_cpp backend serves a GGUF file; "
                         f"source {config.source!r} is a folder")
    return source.folder / source.gguf_file


def tokenizer_dir(settings: Settings, config: ModelConfig, source: Source) -> Path:
    """The GGUF file's tokenizer and config as a Hugging Face folder (no weights), made once per file:
    the request side tokenizes with it in consumer processes that never load the model."""
    path = settings.models_dir / "gguf-tokenizers" / f"{config.name}-{source.fingerprint}"
    if (path / "config.json").exists():
        return path
    from transformers import AutoConfig, AutoTokenizer

    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file).save_pretrained(partial)
    AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file).save_pretrained(partial)
    try:
        partial.rename(path)  # atomic: a racing process's complete folder wins
    except OSError:
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return path


class LlamaCppBackend(Backend):
    Options: ClassVar[type[BaseModel]] = LlamaCppOptions

    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.backends.transformers.request_side import Preparer

        return Preparer(config, tokenizer_dir(settings, config, resolve_source(config.source)))

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.backends.llama_cpp.llama_engine import LlamaEngine

        options = cls.options(config)
        source = resolve_source(config.source)  # resolved and fingerprinted (the whole file hashed) once
        return LlamaEngine(config, served_gguf(settings, config, source, options), tokenizer_dir(settings, config, source),
                           options, settings.batching.continuous)
