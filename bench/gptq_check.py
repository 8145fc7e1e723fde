"""Does the served GPTQ model compute what its own weights say? The kernel GPTQModel chose (Marlin,
ExLlama, Triton on a GPU; Torch on a CPU) against the same artifact dequantized to fp16.

The reference loads the artifact with GPTQModel's plain Torch kernel and replaces every quantized
layer by an ``nn.Linear`` holding its dequantized weight (``gptqmodel ... dequantize_model``): the
same numbers, computed by ordinary matmuls. Both then run the same greedy ``generate`` on the same
prompts; reported: the share of prompts whose first ``tokens`` greedy tokens are identical, the
largest first-step logit difference, and the quantized weights' bytes on the device against the
fp16 reference's (both counted the same way: parameters and buffers of the decoder's linear layers).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.workloads import prompts


def _linear_bytes(model: Any) -> int:
    """Bytes of the quantized (or dequantized) projection layers: what quantization shrinks."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or hasattr(module, "qweight"):
            if module is getattr(model, "lm_head", None):
                continue
            total += sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                                  *module.buffers(recurse=False)))
    return total


def reference(path: Any, device: torch.device) -> Any:
    """The artifact dequantized to fp16 (fp32 on a CPU), as plain linear layers."""
    from gptqmodel.nn_modules.qlinear.torch import dequantize_model
    from transformers import AutoModelForCausalLM, GPTQConfig

    from workers.backends.transformers.batch_side import gptq_bits

    bits = gptq_bits(path)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"),
                                                 device_map="cpu", dtype=torch.float16)
    model = dequantize_model(model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # transformers refuses .to(dtype) on a model loaded as GPTQ, dequantized or not: move tensor by tensor
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            moved = tensor.data.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = moved
            else:
                module._buffers[name] = moved
    return model.eval()


@torch.inference_mode()
def greedy(model: Any, tokenizer: Any, texts: list[str], tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-step logits, generated ids) of a left-padded greedy batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    first = model(**batch).logits[:, -1, :].float()
    out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return first, out[:, batch["input_ids"].shape[1]:]


def run(engine: Any, n_prompts: int = 64, tokens: int = 16) -> dict[str, Any]:
    texts = prompts(n_prompts)
    ref = reference(engine.path, engine.device)
    served_logits, served = greedy(engine.model, engine.tokenizer, texts, tokens, engine.device)
    ref_logits, expected = greedy(ref, engine.tokenizer, texts, tokens, engine.device)
    same = (served == expected).all(dim=1).float().mean().item()
    result = {
        "gptq_check_kernels": sorted(engine.kernels),
        "gptq_check_greedy_match": round(same, 3),  # share of prompts whose first `tokens` tokens are identical
        "gptq_check_token_match": round((served == expected).float().mean().item(), 3),
        "gptq_check_logits_max_abs_diff": round((served_logits - ref_logits).abs().max().item(), 4),
        "gptq_check_logits_scale": round(ref_logits.abs().max().item(), 2),
        "gptq_weight_bytes_vs_fp16": round(_linear_bytes(engine.model) / (_linear_bytes(ref) * 2 /
                                                                           ref.dtype.itemsize), 3),
        "gptq_check_prompts": n_prompts, "gptq_check_tokens": tokens,
    }
    print(f"[bench] gptq check: {result}", flush=True)
    del ref
    return result
