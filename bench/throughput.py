"""Scenario 1: throughput of the in-process limit, the naive Celery baseline and the fleet.

Competitors alternate round by round on the same texts, so machine noise hits all of them; the
best round of each is compared.
"""

from __future__ import annotations

import time
from typing import Any

from bench.harness import Harness, cpu_by_role, timed, wait_all
from bench.workloads import LABELS, TEMPLATE, classify_payload, generate_payload, prompts, review_texts
from shared.schemas import ClassifyRequest, GenerateRequest, TaskType
from workers.backends.transformers.batch_side import Engine


def _limit_classify(engine: Engine, texts: list[str], batch: int) -> list[str]:
    items = [engine.prepare(ClassifyRequest(text=t, labels=LABELS, prompt_template=TEMPLATE)) for t in texts]
    labels: list[str] = []
    for start in range(0, len(items), batch):
        labels += [a.output.label for a in engine.classify(items[start : start + batch])]  # type: ignore[arg-type,union-attr]
    return labels


def _limit_generate(engine: Engine, texts: list[str], batch: int, new_tokens: int) -> list[tuple[str, int]]:
    items = [engine.prepare(GenerateRequest(prompt=p, max_new_tokens=new_tokens)) for p in texts]
    out: list[tuple[str, int]] = []
    for start in range(0, len(items), batch):
        out += [(a.output.text, a.usage.completion_tokens) for a in engine.generate(items[start : start + batch])]  # type: ignore[arg-type,union-attr]
    return out


def run(h: Harness, engine: Engine, n_classify: int, n_generate: int, new_tokens: int, rounds: int,
        naive_share: float = 1.0) -> dict[str, Any]:
    """``naive_share``: the naive baseline gets this share of the texts (on a GPU it runs at a tenth
    of the others' rate; its rate is what is compared, and a smaller sample measures it as well)."""
    batch = h.settings.max_batch_size(TaskType.CLASSIFICATION)
    gen_batch = h.settings.max_batch_size(TaskType.TEXT_GENERATION)
    texts, gen_prompts = review_texts(n_classify), prompts(n_generate)
    naive_texts = texts[: max(1, int(len(texts) * naive_share))]
    naive_prompts = gen_prompts[: max(1, int(len(gen_prompts) * naive_share))]
    rates: dict[str, list[float]] = {k: [] for k in ("limit", "naive", "fleet")}
    tok_rates: dict[str, list[float]] = {k: [] for k in ("limit", "naive", "fleet")}
    answers: dict[str, Any] = {}
    with h.naive() as (naive_app, naive_queue), h.fleet("throughput") as client:
        # Warm-up, untimed: first-call allocations and the label prior of the template, everywhere.
        _limit_classify(engine, texts[:batch], batch)
        _limit_generate(engine, gen_prompts[:1], gen_batch, 2)
        naive_app.send_task("naive.classify", args=[texts[0], LABELS, TEMPLATE], queue=naive_queue).get(timeout=600)
        naive_app.send_task("naive.generate", args=[gen_prompts[0], 2], queue=naive_queue).get(timeout=600)
        wait_all(client.submit_many([*(classify_payload(t) for t in texts[:batch]), generate_payload(gen_prompts[0], 2)]))
        for _ in range(rounds):
            # classification, tasks/s
            secs, answers["limit"] = timed(_limit_classify, engine, texts, batch)
            rates["limit"].append(len(texts) / secs)
            secs, answers["naive"] = timed(lambda: [r.get(timeout=3600) for r in [
                naive_app.send_task("naive.classify", args=[t, LABELS, TEMPLATE], queue=naive_queue) for t in naive_texts]])
            rates["naive"].append(len(naive_texts) / secs)
            cpu_before, producer_before = cpu_by_role(h.worker_pids), time.process_time()
            secs, results = timed(lambda: wait_all(client.submit_many(classify_payload(t) for t in texts)))
            cpu_after, producer_cpu = cpu_by_role(h.worker_pids), time.process_time() - producer_before
            answers["fleet"] = [r.output.label for r in results]
            rates["fleet"].append(len(texts) / secs)
            if rates["fleet"][-1] == max(rates["fleet"]):
                # CPU busy (cores' worth) of each side during the best fleet round: ~N consumers
                # busy means the consumers limit the fleet, ~1 for the core or the producer likewise.
                busy = {role: round((cpu_after[role] - cpu_before[role]) / secs, 2) for role in cpu_after}
                busy["producer"] = round(producer_cpu / secs, 2)
            # generation, tokens/s
            secs, gen_limit = timed(_limit_generate, engine, gen_prompts, gen_batch, new_tokens)
            tok_rates["limit"].append(sum(n for _, n in gen_limit) / secs)
            secs, gen_naive = timed(lambda: [r.get(timeout=3600) for r in [
                naive_app.send_task("naive.generate", args=[p, new_tokens], queue=naive_queue) for p in naive_prompts]])
            tok_rates["naive"].append(sum(n for _, n in gen_naive) / secs)
            secs, gen_fleet = timed(lambda: wait_all(client.submit_many(generate_payload(p, new_tokens) for p in gen_prompts)))
            tok_rates["fleet"].append(sum(r.usage.completion_tokens for r in gen_fleet) / secs)
            print(f"[bench] round: classify tasks/s {({k: round(v[-1], 1) for k, v in rates.items()})}, "
                  f"generate tok/s {({k: round(v[-1], 1) for k, v in tok_rates.items()})}", flush=True)
            fleet_batch_sizes = [r.batch_size for r in results]
            fleet_model_ms = [r.timings.inference_ms for r in results]
    best = {k: max(v) for k, v in rates.items()}
    best_tok = {k: max(v) for k, v in tok_rates.items()}

    def agree(a: list, b: list) -> float:
        return sum(x == y for x, y in zip(a, b, strict=False)) / min(len(a), len(b))

    return {
        "classify_n": len(texts),
        "classify_batch": batch,
        "generate_batch": gen_batch,
        "naive_n": len(naive_texts),
        "classify_tasks_per_s": {k: round(v, 2) for k, v in best.items()},
        "classify_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "fleet_vs_limit": round(best["fleet"] / best["limit"], 3),
        "fleet_vs_naive": round(best["fleet"] / best["naive"], 3),
        "fleet_mean_batch_size": round(sum(fleet_batch_sizes) / len(fleet_batch_sizes), 2),
        # Where a gap to the limit sits: the engine core's time per batch (model call, as the fleet's
        # results report it) against the in-process engine's (batch / its rate, tokenization included).
        # Close together: the core runs the model at full speed and the gap is in feeding it or in
        # collecting results; far apart: the model runs slower inside the core.
        "fleet_model_ms_per_batch": round(sum(fleet_model_ms) / len(fleet_model_ms), 2),
        # wall time per fleet batch (mean batch / rate): far above the model's ms, the core waited to be fed
        "fleet_ms_per_batch": round(1000.0 * (sum(fleet_batch_sizes) / len(fleet_batch_sizes)) / best["fleet"], 2),
        "limit_ms_per_batch": round(1000.0 * batch / best["limit"], 2),
        "fleet_cpu_busy": busy,
        "labels_agree_fleet_limit": agree(answers["fleet"], answers["limit"]),
        "labels_agree_naive_limit": agree(answers["naive"], answers["limit"]),
        "generate_n": len(gen_prompts),
        "generate_new_tokens": new_tokens,
        "generate_tokens_per_s": {k: round(v, 1) for k, v in best_tok.items()},
        "generate_fleet_vs_limit": round(best_tok["fleet"] / best_tok["limit"], 3),
        "generate_fleet_vs_naive": round(best_tok["fleet"] / best_tok["naive"], 3),
        "texts_agree_fleet_limit": agree([r.output.text for r in gen_fleet], [t for t, _ in gen_limit]),
    }
