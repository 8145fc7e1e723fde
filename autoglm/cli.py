"""`autoglm`: the fleet's command line (demo, worker, models, broker, one-off requests)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.errors import ErrorCode, FleetError, invalid_input


def _cmd_demo(args: argparse.Namespace) -> int:
    from autoglm.demo import run_demo

    run_demo(bulk=args.bulk, as_json=args.json)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run_worker

    run_worker(concurrency=args.concurrency, loglevel=args.loglevel,
               models=args.models.split(",") if args.models else None)
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from shared.config import load_settings
    from workers.backends import backend_for

    settings = load_settings()
    names = args.names or [m.name for m in settings.models]
    for name in names:
        model = settings.model(name)
        manifest = backend_for(model).prepare(settings, model, force=args.force)
        print(json.dumps(manifest, indent=2))
    return 0


def _serving_workers(settings: Any) -> dict[str, list[str]]:
    """Live workers per model, from the broker's registry (empty when no broker is configured or reachable)."""
    from redis.exceptions import RedisError

    from shared.broker import redis_client
    from shared.registry import Registry

    if not settings.redis_url:
        return {}
    try:
        registry = Registry(redis_client(settings.redis_url, outage_s=0, timeout_s=1.0,
                                             master_name=settings.broker.master_name), settings)
        return {m.name: registry.workers(m.name) for m in settings.models}
    except RedisError:
        return {}


def _cmd_models_list(args: argparse.Namespace) -> int:
    from shared.config import load_settings
    from workers.artifacts import read_manifest, served_dir, shared_artifact
    from workers.backends import backend_for

    settings = load_settings()
    workers = _serving_workers(settings)
    for model in settings.models:
        manifest, where = None, ""
        if backend_for(model).prepares_artifact:
            path = served_dir(settings, model)
            if read_manifest(path) is None:
                path = shared_artifact(settings, model) or path
            manifest = read_manifest(path)
            state, where = ("prepared" if manifest else "NOT PREPARED (autoglm models prepare)"), f"\n  {path}"
        else:
            state = f"nothing to prepare{' (' + str(model.options.get('base_url')) + ')' if model.options.get('base_url') else ''}"
        serving = workers.get(model.name)
        print(f"{model.name:<20} backend {model.backend:<12} {model.model_name:<40} {'/'.join(model.task_type)}  {state}"
              f"{where}\n  served by: "
              + (", ".join(serving) if serving else "no live worker" if serving is not None else "(no broker configured or reachable)"))
        if manifest and manifest.get("accuracy_float") is None:
            print(f"  served as is, accuracy not measured (quantize.measure: false), {manifest['bytes_served'] / 1e6:.0f} MB")
        elif manifest:
            print(f"  quantized with {manifest.get('chosen')}: accuracy float {manifest['accuracy_float']:.1%} "
                  f"served {manifest['accuracy_served']:.1%} (loss {manifest.get('loss_vs_float', 0) * 100:+.1f} pts, worst "
                  f"family {(manifest.get('worst_family_loss_vs_float') or 0) * 100:+.1f}, "
                  f"selection split), {manifest['bytes_served'] / 1e6:.0f} MB, prepared on "
                  f"{manifest.get('machine', {}).get('cpu', 'unknown machine')}"
                  + (f", quantized in {manifest['quantized_in']}" if manifest.get("quantized_in") else ""))
    return 0


def _cmd_models_eval(args: argparse.Namespace) -> int:
    """Accuracy of the prepared artifact (and, with --float, its float source) on the caller's own
    labelled JSONL: the check to run before trusting zero-shot labels on a new label set."""
    from shared.config import load_settings
    from workers.artifacts import float_dir, prepared_path, resolve_source
    from workers.backends.transformers.batch_side import Engine
    from workers.prepare.evaluation import Family, accuracy, first_per_label

    settings = load_settings()
    model = settings.model(args.name) if args.name else settings.models[0]
    rows = _labelled_rows(Path(args.data))
    labels = args.labels.split(",") if args.labels else sorted({row["label"] for row in rows})
    family = Family(Path(args.data).stem, labels, [(row["text"], row["label"], "report") for row in rows])
    paths = {"served": prepared_path(settings, model)}
    if args.float:
        paths["float"] = float_dir(settings, model, resolve_source(model.source))
    shots = first_per_label(family.examples(), labels, args.examples) if args.examples else None
    for kind, path in paths.items():
        engine = Engine(model, path, device=settings.worker.device)
        if shots is None:
            score = accuracy(engine, family, "all", args.template)
            print(json.dumps({"model": model.name, "weights": kind, "examples": len(rows), "labels": labels,
                              "template": args.template, "accuracy": round(score, 4)}))
            continue
        scored = len(rows) - len({text for text, _ in shots})  # the same rows both ways: those not shown
        print(json.dumps({"model": model.name, "weights": kind, "scored": scored, "labels": labels,
                          "examples_per_label": args.examples,
                          "zero_shot": round(_zero_shot_on(engine, family, shots), 4),
                          "with_examples": round(accuracy(engine, family, "all", shots=shots), 4)}))
    return 0


def _zero_shot_on(engine: Any, family: Any, shots: list[tuple[str, str]]) -> float:
    """Zero-shot accuracy on the rows that --examples does not show (the comparison's same rows)."""
    from workers.prepare.evaluation import Family, accuracy

    shown = {text for text, _ in shots}
    rest = Family(family.name, family.labels, [row for row in family.rows if row[0] not in shown])
    return accuracy(engine, rest, "all")


def _labelled_rows(path: Path) -> list[dict[str, str]]:
    """``{"text", "label"}`` per line; INVALID_INPUT naming the first line that is not one."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FleetError(ErrorCode.INVALID_INPUT, f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise FleetError(ErrorCode.INVALID_INPUT, f'{path}: line {number} is not {{"text": "...", "label": "..."}}')
        rows.append(row)
    if not rows:
        raise FleetError(ErrorCode.INVALID_INPUT, f"{path}: no labelled lines")
    return rows


def _cmd_broker(args: argparse.Namespace) -> int:
    from shared.broker import EmbeddedRedis, exit_on_sigterm

    exit_on_sigterm()  # SIGTERM unwinds the with-block too, so the server child is stopped
    with EmbeddedRedis() as server:
        print(f"REDIS_URL={server.url}  (Ctrl-C or SIGTERM to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def _client():  # noqa: ANN202
    from producers.client import FleetClient

    return FleetClient()


def _answer(handle: Any, timeout: float) -> int:
    """The task's id first (stderr, at once: `autoglm result <id>` finds it later whatever happens
    here), then its result as JSON with the id in it."""
    print(f"task {handle.id}", file=sys.stderr, flush=True)
    result = handle.result(timeout=timeout)
    print(json.dumps({"id": handle.id, **result.model_dump(mode="json")}, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    handle = _client().submit_generate(args.prompt, priority=args.priority, max_new_tokens=args.max_new_tokens)
    return _answer(handle, args.timeout)


def _cmd_classify(args: argparse.Namespace) -> int:
    return _answer(_client().submit_classify(args.text, args.labels.split(","), priority=args.priority), args.timeout)


def _cmd_result(args: argparse.Namespace) -> int:
    handle = _client().handle(args.task_id)
    status = handle.status()
    if status == "UNKNOWN":  # a typo, another fleet's id, or expired: not "still queued"
        from producers.client import unknown_task

        raise unknown_task(handle.id)
    print(json.dumps({"id": handle.id, "status": status}))
    if handle.ready():
        print(json.dumps(handle.result().model_dump(mode="json"), indent=2))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    """Where one task's time went, from the timings stored with its result (no trace backend needed)."""
    handle = _client().handle(args.task_id)
    result = handle.result(timeout=args.timeout)
    t = result.timings
    producer_side = max(0.0, t.total_ms - t.queue_wait_ms - t.batch_wait_ms - t.inference_ms)
    rows = [
        ("waiting in Redis (submit -> worker pick-up)", 0.0, t.queue_wait_ms),
        ("waiting for a batch", t.queue_wait_ms, t.batch_wait_ms),
        (f"model ({result.model}, batch of {result.batch_size})", t.queue_wait_ms + t.batch_wait_ms, t.inference_ms),
        ("result write + hand-back", t.total_ms - producer_side, producer_side),
    ]
    print(f"task {handle.id} on {result.worker}: {t.total_ms:.1f} ms from submit to result")
    scale = 50.0 / max(t.total_ms, 1e-6)
    for label, start, length in rows:
        bar = " " * int(start * scale) + "#" * max(1, int(length * scale))
        print(f"  {start:8.1f} ms +{length:8.1f} ms  {bar:<52} {label}")
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from producers.backfill import run_backfill

    try:
        summary = run_backfill(
            _client(), Path(args.input), Path(args.output), Path(args.errors) if args.errors else None,
            window=args.window, chunk=args.chunk, max_queue_depth=args.max_queue_depth,
        )
    except KeyboardInterrupt:  # the journal has every submitted line: nothing is lost, nothing runs twice
        print(f"\ninterrupted; run the same command again to resume ({Path(args.output).with_suffix('.journal')} "
              "keeps what was submitted)", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from producers.gateway import serve

    serve(args.host, args.port)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from producers.auth import Role, issue
    from shared.config import load_settings

    print(issue(load_settings().gateway, args.tenant, Role(args.role), ttl_s=args.ttl, algorithm=args.alg))
    return 0


def _dead_letters():  # noqa: ANN202
    from shared.dlq import DeadLetters

    client = _client()
    return client, DeadLetters(client.redis_url, master_name=client.settings.broker.master_name)


def _cmd_dlq(args: argparse.Namespace) -> int:
    client, dlq = _dead_letters()
    if args.dlq_command == "list":
        for entry in dlq.list(args.limit):
            print(json.dumps(entry))
        print(f"{len(dlq)} dead-lettered request(s)", file=sys.stderr)
    elif args.dlq_command == "requeue":
        ids = dlq.requeue(client.app, set(args.task_ids) or None)
        print(f"requeued {len(ids)}: {' '.join(ids)}")
        missing = sorted(set(args.task_ids) - set(ids))
        if missing:  # a typo, or requeued already: say so rather than exit 0 on nothing done
            print(f"not requeued (not in the dead-letter queue, or a malformed message that cannot run): "
                  f"{' '.join(missing)}", file=sys.stderr)
            return 1
    else:
        print(f"purged {dlq.purge()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description="Queue-driven LLM inference fleet.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run broker + worker + producers locally and print real answers")
    demo.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    demo.add_argument("--bulk", type=int, default=64, help="bulk classification tasks to submit")
    demo.set_defaults(func=_cmd_demo)

    worker = sub.add_parser("worker", help="run a worker (embedded broker if REDIS_URL is unset)")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--loglevel", default=None)
    worker.add_argument("--models", default=None, help="comma-separated aliases to load and serve (default: all)")
    worker.set_defaults(func=_cmd_worker)

    models = sub.add_parser("models", help="prepare and list models").add_subparsers(dest="models_command", required=True)
    prep = models.add_parser("prepare", help="convert + quantize models once (cached)")
    prep.add_argument("names", nargs="*", help="model aliases (default: all)")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    prep.set_defaults(func=_cmd_models_prepare)
    models.add_parser("list", help="configured models and their prepared state").set_defaults(func=_cmd_models_list)
    ev = models.add_parser("eval", help="accuracy on your own labelled JSONL ({\"text\": ..., \"label\": ...} lines)")
    ev.add_argument("data", help="JSONL file, one {text, label} object per line")
    ev.add_argument("--name", help="model alias (default: the first configured)")
    ev.add_argument("--labels", help="comma-separated label set (default: the labels found in the file)")
    ev.add_argument("--template", help="a prompt_template to compare with the default method")
    ev.add_argument("--float", action="store_true", help="also score the float source model")
    ev.add_argument("--examples", type=int, default=0, metavar="K",
                    help="show the first K rows of each label as examples; score the rest zero-shot and with them")
    ev.set_defaults(func=_cmd_models_eval)

    sub.add_parser("broker", help="run an embedded Redis-compatible broker in the foreground").set_defaults(func=_cmd_broker)

    gen = sub.add_parser("generate", help="submit one generation and wait for it")
    gen.add_argument("prompt")
    gen.add_argument("--priority", default="interactive", choices=["interactive", "bulk"])
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--timeout", type=float, default=120)
    gen.set_defaults(func=_cmd_generate)

    cls = sub.add_parser("classify", help="submit one classification and wait for it")
    cls.add_argument("text")
    cls.add_argument("--labels", required=True, help="comma-separated candidate labels")
    cls.add_argument("--priority", default="interactive", choices=["interactive", "bulk"])
    cls.add_argument("--timeout", type=float, default=120)
    cls.set_defaults(func=_cmd_classify)

    dlq = sub.add_parser("dlq", help="the dead-letter queue").add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", help="print dead-lettered requests with their error history (JSON lines)")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_requeue = dlq.add_parser("requeue", help="publish them again under their original task ids")
    dlq_requeue.add_argument("task_ids", nargs="*", help="only these (default: all)")
    dlq.add_parser("purge", help="drop every dead-lettered request")
    for p in (dlq_list, dlq_requeue, dlq.choices["purge"]):
        p.set_defaults(func=_cmd_dlq)

    bf = sub.add_parser("backfill", help="run a JSONL/CSV file of requests through the fleet (resumable)")
    bf.add_argument("input", help="JSONL or CSV: custom_id, task_type and request fields per line")
    bf.add_argument("--output", required=True, help="results, one JSON line per input line")
    bf.add_argument("--errors", default=None, help="failed lines (default: OUTPUT.errors.jsonl)")
    bf.add_argument("--window", type=int, default=256, help="most requests in flight at once")
    bf.add_argument("--chunk", type=int, default=64, help="requests per batched publish")
    bf.add_argument("--max-queue-depth", type=int, default=10_000, help="wait while the bulk queue is deeper")
    bf.set_defaults(func=_cmd_backfill)

    gw = sub.add_parser("gateway", help="run the HTTP gateway (FastAPI + uvicorn)")
    gw.add_argument("--host", default=None)
    gw.add_argument("--port", type=int, default=None)
    gw.set_defaults(func=_cmd_gateway)

    token = sub.add_parser("token", help="JWTs for the gateway").add_subparsers(dest="token_command", required=True)
    tok = token.add_parser("issue", help="mint a token (HS256 with gateway.jwt_secret, or RS256 with jwt_private_key)")
    tok.add_argument("--tenant", required=True)
    tok.add_argument("--role", required=True, choices=["guest", "user", "admin"])
    tok.add_argument("--ttl", type=int, default=3600, help="seconds")
    tok.add_argument("--alg", choices=["HS256", "RS256"], default=None)
    tok.set_defaults(func=_cmd_token)

    tr = sub.add_parser("trace", help="timeline of one task from its stored timings")
    tr.add_argument("task_id")
    tr.add_argument("--timeout", type=float, default=10)
    tr.set_defaults(func=_cmd_trace)

    res = sub.add_parser("result", help="status (and result) of a task id")
    res.add_argument("task_id")
    res.set_defaults(func=_cmd_result)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValidationError as exc:  # the config (YAML + environment) is invalid: say where
        error = invalid_input(exc)
        print(f"error {error.code}: config: {error.message}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except TimeoutError as exc:  # a wait for a result ran out: the task may still finish
        print(f"error TIMEOUT: {exc}; `autoglm result <id>` looks again later", file=sys.stderr)
        return 1
    except OSError as exc:  # a file named on the command line: missing, unreadable, a folder
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
