"""Probe: score every classification expert once per evaluation row, then combine them offline.

Choosing a method (which experts, which weights) or checking a quantized artifact against it
would otherwise cost one full evaluation per combination. This runs the engine's own row
building, content-free calibration and scoring (``Engine._score``), keeps each expert's
log-softmax over the labels per row, and writes them to JSON; ``--weights`` then scores any
weighting of them without touching the model. Weights (1, 1) over ``chat`` and ``about``
(the default until 2026-12-03) and (1, 0.5, 0.25) over ``chatcap``, ``message``, ``plain`` (the
default since) reproduce the engine's accuracy to the example.

Experts: ``chat`` (labels as given), ``chatcap`` (labels listed and scored capitalised),
``about`` (channel "The following text is about {label}."), ``message`` (channel "The following
message is {label}:"), ``plain`` (label after ``Text: "{text}"\\nCategory ({labels}):``, calibrated).

    python -m bench.probes.experts score MODEL_DIR out.json [--split selection]
    python -m bench.probes.experts combine out.json [more.json ...] --weights chat=1,about=1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.probes.method_cost import TWO
from shared.config import DEFAULT_PLAIN, MESSAGE_CHANNEL, ExpertWeights, load_settings
from shared.schemas import ClassifyRequest
from workers.backends.transformers.batch_side import Engine
from workers.prepare.evaluation import families

# Two passes cover the five experts: each config's chat, channel and plain parts are kept apart.
PASSES = {
    ("chat", "about", None): TWO,  # the two-expert default before 2026-12-03 (its weights play no part here)
    ("chatcap", "message", "plain"): {"classification_capitalize": True, "classification_channel": MESSAGE_CHANNEL,
                                      "classification_plain": DEFAULT_PLAIN},
}


def expert_scores(engine: Engine, requests: list[ClassifyRequest]) -> list[dict[str, list[float]]]:
    """Per request: each part's calibrated log-softmax over the labels (what ``Engine._classify`` weights)."""
    with torch.inference_mode():
        found = engine._expert_scores([engine.prepare(r) for r in requests])  # type: ignore[arg-type]
    return [{part: scores.tolist() for part, scores in experts.items()} for experts in found]


def score(model_dir: Path, out: Path, split: str = "all", batch: int = 16, current_only: bool = False) -> None:
    """``current_only``: the default method's three experts alone (half the time)."""
    settings = load_settings()
    model = settings.models[0]
    result: dict = {"model_dir": str(model_dir), "families": {}}
    started = time.perf_counter()
    passes = {k: v for k, v in PASSES.items() if not current_only or "chatcap" in k}
    for names, update in passes.items():
        engine = Engine(model.model_copy(update=update), model_dir, device="cpu")
        for family in families():
            rows = [r for r in family.rows if split in ("all", r[2])]
            record = result["families"].setdefault(family.name, {"labels": family.labels,
                                                                 "gold": [r[1] for r in rows],
                                                                 "split": [r[2] for r in rows], "experts": {}})
            found: list[dict] = []
            for start in range(0, len(rows), batch):
                found += expert_scores(engine, [ClassifyRequest(text=t, labels=family.labels) for t, _, _ in rows[start:start + batch]])
            for name, part in zip(names, ("direct", "channel", "plain"), strict=True):
                if name is not None:
                    record["experts"][name] = [f[part] for f in found]
        print(f"pass {names}: {time.perf_counter() - started:.0f}s", flush=True)
    out.write_text(json.dumps(result))


def _certainty(scores: torch.Tensor) -> torch.Tensor:
    """1 - normalised entropy of one expert's distribution over the labels (0: uniform, 1: sure)."""
    entropy = -(scores.exp() * scores).sum()
    return 1 - entropy / torch.log(torch.tensor(float(len(scores))))


def accuracy(record: dict, weights: dict[str, float], split: str, mode: str = "product") -> float:
    """``product``: weighted sum of the experts' log-probabilities (the engine's method);
    ``certainty``: each weight also scaled by that expert's certainty on the row."""
    experts = record["experts"]
    hits = total = 0
    for i, (gold, where) in enumerate(zip(record["gold"], record["split"], strict=True)):
        if where != split:
            continue
        combined = torch.zeros(len(record["labels"]))
        for name, w in weights.items():
            if w:
                scores = torch.tensor(experts[name][i])
                combined += w * (_certainty(scores) if mode == "certainty" else 1.0) * scores
        hits += record["labels"][int(combined.argmax())] == gold
        total += 1
    return hits / total


GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
THREE = ("chatcap", "message", "plain")
_DEFAULT = ExpertWeights()
SHIPPED = {"chatcap": _DEFAULT.chat, "message": _DEFAULT.channel, "plain": _DEFAULT.plain}  # the default method's weights


def choose(results: list[dict], split: str = "selection") -> list[tuple]:
    """Rank every weighting of the three experts (``GRID`` each, both modes): first the worst
    (artifact, family) margin against the float model's best method found for that family (each
    expert alone, and the shipped weighting: #12 measures a default against the best prompt
    found), then the mean accuracy over artifacts and families. ``results[0]`` is the float
    model's scores, the rest quantized artifacts'. Only ``split`` rows are read."""
    import itertools

    float_result = results[0]["families"]
    found = [{e: 1.0} for e in THREE] + [SHIPPED]
    reference = {f: max(accuracy(rec, w, split) for w in found) for f, rec in float_result.items()}
    ranked = []
    for mode in ("product", "certainty"):
        for combo in itertools.product(GRID, repeat=len(THREE)):
            if not any(combo):
                continue
            weights = dict(zip(THREE, combo, strict=True))
            accs = [(f, accuracy(rec, weights, split, mode)) for r in results for f, rec in r["families"].items()]
            worst = min(a - reference[f] for f, a in accs)
            mean = sum(a for _, a in accs) / len(accs)
            ranked.append((round(worst, 4), round(mean, 4), mode, weights))
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return ranked


def table(result: dict, weights: dict[str, float], mode: str = "product") -> dict[str, dict[str, float]]:
    """Accuracy per split and family, and the families' mean (as ``classification_report``)."""
    out = {}
    for split in ("selection", "report"):
        if not any(split in rec["split"] for rec in result["families"].values()):
            continue
        row = {name: accuracy(rec, weights, split, mode) for name, rec in result["families"].items()}
        row["overall"] = sum(row.values()) / len(row)
        out[split] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score")
    s.add_argument("model_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--split", choices=["all", "selection", "report"], default="all")
    s.add_argument("--current-only", action="store_true", help="the default method's three experts alone")
    c = sub.add_parser("combine")
    c.add_argument("files", type=Path, nargs="+")
    c.add_argument("--weights", default="chat=1,about=1")
    c.add_argument("--mode", choices=["product", "certainty"], default="product")
    ch = sub.add_parser("choose", help="rank weightings on the selection split (float file first)")
    ch.add_argument("files", type=Path, nargs="+")
    ch.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    if args.command == "score":
        score(args.model_dir, args.out, args.split, current_only=args.current_only)
        return
    if args.command == "choose":
        for worst, mean, mode, weights in choose([json.loads(p.read_text()) for p in args.files])[: args.top]:
            print(f"worst margin {worst:+.3f}  mean {mean:.3f}  {mode:9s} {weights}")
        return
    weights = {k: float(v) for k, v in (p.split("=") for p in args.weights.split(","))}
    for path in args.files:
        for split, row in table(json.loads(path.read_text()), weights, args.mode).items():
            print(f"{path.name:28s} {split:9s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
