"""Probe: does a causal LM read "spam" / "not spam" zero-shot, and with which wording?

Not a bench scenario (no fleet, no competitor): it scores the 104 rows of
workers/prepare/data/eval/spam.jsonl raw (no calibration) with a few wordings and prints each one's AUC of
log P(spam) - log P(not spam), so a candidate model can be judged in minutes before it is wired in.
docs/quantization.md has the figures for gemma-3-270m and SmolLM2-135M.

    python -m bench.probes.spam_channel MODEL_DIR [--gguf FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = Path(__file__).resolve().parents[2] / "workers" / "data" / "eval" / "spam.jsonl"


def auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random spam row scores above a random legitimate one (0.5: no signal)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--gguf", help="a GGUF file inside MODEL_DIR (loaded through transformers' gguf_file=)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kw = {"gguf_file": args.gguf} if args.gguf else {}
    tok = AutoTokenizer.from_pretrained(args.model_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **kw).eval()
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]

    @torch.no_grad()
    def logprob(prefix: str, continuation: str) -> float:
        a = tok(prefix, add_special_tokens=True)["input_ids"]
        b = tok(continuation, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([a + b])).logits[0, len(a) - 1:-1].log_softmax(-1)
        return logits.gather(1, torch.tensor(b)[:, None]).sum().item()

    wordings: dict[str, Callable[[str, str], float]] = {
        "plain template": lambda x, lab: logprob(f'Text: "{x}"\nCategory (spam, not spam):', " " + lab),
        "channel 'about'": lambda x, lab: logprob(f"The following text is about {lab}.\n", x),
        "channel 'message is'": lambda x, lab: logprob(f"The following message is {lab}:\n", x),
        "question": lambda x, lab: logprob(f'Message: "{x}"\nIs this message spam or not spam? Answer:', " " + lab),
    }
    spam = [r["label"] == "spam" for r in rows]
    for name, score in wordings.items():
        start = time.monotonic()
        margin = [score(r["text"], "spam") - score(r["text"], "not spam") for r in rows]
        print(f"{name:22s} AUC {auc(margin, spam):.3f}  ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
