"""`python -m bench --shape 1.7b`: measure speed on a realistic-size model built on this machine.

A Llama with random weights in a released model's shape (speed does not depend on weight values,
and a GPU machine without network cannot download the real one). Never used for answers anyone
reads: quality is measured on the real bundled model (bench scenario `quantization`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.config import Settings

SHAPES: dict[str, dict[str, int]] = {
    # SmolLM2-1.7B's shape (same 49,152-token vocabulary as the bundled 135M model): 1.71 B params.
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 8192},
    # A few MB: dry runs of the GPU table on a CPU (bench/gpu.sh DRY_RUN=1), never a figure to report.
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096},
    # SmolLM2-135M's shape: the bundled model's own size, for a like-for-like CPU/GPU comparison.
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "max_position_embeddings": 8192},
}


def tokenizer_dir(settings: Settings) -> Path:
    """The bundled model's tokenizer (its float folder, prepared once)."""
    from workers.artifacts import resolve_source
    from workers.prepare.quantize import ensure_float

    real = settings.models[0]
    return ensure_float(settings, real, resolve_source(real.source), lambda _: None)


def build(settings: Settings, shape: str, tokenizer: Path | None = None) -> Path:
    """The random-weight model folder for ``shape`` (built once into the cache; fp16 on a GPU)."""
    target = settings.cache_dir / "bench" / f"random-llama-{shape}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer or tokenizer_dir(settings))
    config = LlamaConfig(vocab_size=49152, rope_theta=130000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    print(f"[bench] model {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params -> {target}", flush=True)
    return target


QUANT = {
    "fp16": {"method": "none", "measure": False},
    # GPTQ of random weights (calibrated on the bundled docstrings: the values do not matter for speed).
    # group 128: the size GPU kernels (Marlin, ExLlama) are built for; no act-order, symmetric.
    **{f"gptq{bits}": {"method": "gptq", "bits": bits, "group_size": 128, "desc_act": False, "measure": False,
                       "calibration_samples": 32, "alternatives": []} for bits in (4, 8)},
}


def model_config(settings: Settings, shape: str, tokenizer: Path | None = None, quant: str = "fp16") -> dict[str, Any]:
    """The shape's model entry (``quant``: fp16, or a GPTQ artifact of the same weights made here)."""
    suffix = "" if quant == "fp16" else f"-{quant}"
    return {"name": f"random-{shape}{suffix}", "model_name": f"random/llama-{shape}", "source": str(build(settings, shape, tokenizer)),
            "task_type": ["text_generation", "classification"], "max_context_tokens": 2048,
            "quantize": QUANT[quant]}  # random weights: accuracy means nothing
