"""Scenario ``cpu-peer``: the fleet on a CPU against llama.cpp on the same GGUF weights, one run.

Competitors, one after another on the same prompts (8 chat prompts, at most 64 new tokens, greedy):
- ``peer``: llama-cpp-python's ``Llama.create_chat_completion`` on the bundled GGUF file, in this
  process, one request after another (what a CPU user would run instead: llama.cpp's single stream);
- the fleet on the ``transformers`` backend (the 8-bit GPTQ artifact) and on the ``llama_cpp``
  backend (the GGUF file itself): one request at a time, then 8 and 16 in flight (read while all
  8 or 16 run, not over the round's fill and drain: ``steady``), every request streamed so its time
  to first token is read as a client sees it.
Then classification tasks/s on both fleets over the report rows of every family (default method),
and how often their labels agree; and the llama_cpp fleet's interactive p95 under a bulk backlog
against idle (bench/isolation.py on that fleet; 20 probes each at quick size, so that p95 is not
the slowest of a handful). The llama_cpp fleet runs three times: on the file as it is (Q4_1), with
``requantize: Q8_0`` (Q4_1's values held to 8 bits; the isolation run uses that one) and with
``requantize: Q4_0`` (rounded again to the type llama.cpp repacks for its CPU GEMM: faster, lossier;
its label agreement says what that costs).

Each llama_cpp fleet is also measured against llama.cpp's own HTTP server on the file it serves
(bench/llama_server.py: parallel slots, continuous batching; 1, 8 and 16 in flight, the same
prompts, clients and streaming): whether any server over llama.cpp doubles llama.cpp's one stream
at 8 in flight depends on the CPU, and ``server_*`` says what llama.cpp itself gets on this one
(``server_skipped`` says why not, where the binary is not built).

One stream is read side by side, request by request (``interleaved``): each request goes in turn
to llama.cpp on the bundled file (``peer_beside_*``), on the file that fleet serves where it differs
(``peer_*``), the fleet and the server. 8 in flight: the fleet's rounds alternate with the
server's, best round each. Each llama_cpp fleet is compared twice: with the peer on the bundled
file (``*_vs_peer``, the reading beside that fleet: what a user of that file would run instead) and
with the peer on the very file it serves (``*_vs_same_weights``: engine against engine on the same
bytes; on a CPU one stream is bound by the bytes of weights read per token, Q8_0's 1.5x Q4_1's, so
only this ratio says what the fleet itself costs or gains). ``peer_single`` is the bundled file's
one stream as read beside the fleet serving that file; ``cpu_peer.peer`` is its reading alone at
the start.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from bench import llama_server
from bench.harness import Harness, percentile

PROMPTS = ["Write one sentence about rivers.", "Explain what a volcano is.", "Give me a recipe idea with bread.",
           "Why do owls hunt at night?", "Describe winter in a city.", "What makes a good bridge?",
           "Tell me a fact about tea.", "How do robots learn?"]
NEW_TOKENS = 64


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def chats(n: int) -> list[list[dict[str, str]]]:
    """``n`` requests' messages, the prompts in turn (as the fleets and the peer get them)."""
    return [messages(prompt) for prompt in (PROMPTS * n)[:n]]


def llama_model(settings: Any, requantize: str | None = None) -> dict[str, Any]:
    """The bundled model's entry served by the llama_cpp backend (same source file, same method;
    ``requantize``: served converted to that type, as the backend's option does)."""
    bundled = settings.models[0].model_dump(mode="json")
    suffix = f"-{requantize.lower()}" if requantize else ""
    return {**bundled, "name": f"{bundled['name']}-llama{suffix}", "backend": "llama_cpp",
            "options": {"requantize": requantize} if requantize else {}}


class Peer:
    """llama-cpp-python's ``Llama`` on a GGUF file, in this process: llama.cpp's single stream.
    Driven from the calling thread (``interleaved``), not a pool thread (``closed_loop``): from a
    pool thread the same ``Llama`` decoded at half the rate (bench/RESULTS.md)."""

    def __init__(self, gguf: str) -> None:
        from llama_cpp import Llama

        from workers.backends.llama_cpp import LlamaCppOptions
        from workers.backends.llama_cpp.llama_engine import cpu_threads

        # Flash attention as the llama_cpp backend sets it (off by library default on a CPU, and
        # slower there): the ratios compare batching and the fleet, not one flag.
        self.llm = Llama(model_path=gguf, n_ctx=2048, n_threads=cpu_threads(), n_threads_batch=cpu_threads(),
                         verbose=False, flash_attn=LlamaCppOptions().flash_attn)
        self.llm.create_chat_completion(messages=messages("Hello"), max_tokens=4, temperature=0)  # warm-up

    def one(self, chat: list[dict[str, str]]) -> tuple[int, float]:
        """One streamed chat completion, greedy: (completion tokens, ms to the first text)."""
        t0, first, tokens = time.perf_counter(), None, 0
        for i, chunk in enumerate(self.llm.create_chat_completion(messages=chat, max_tokens=NEW_TOKENS, temperature=0,
                                                                  stream=True)):
            if i == 1:  # the first chunk carries only the role
                first = (time.perf_counter() - t0) * 1000
            tokens += bool(chunk["choices"][0]["delta"].get("content"))
        return tokens, first if first is not None else (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.llm.close()


def interleaved(sides: dict[str, Callable[[Any], tuple[int, float]]], requests: list[Any]) -> dict[str, dict[str, Any]]:
    """One stream on each side, request by request: every request goes through every side in turn
    (the order rotated each request), and each side's tok/s is its tokens over its own requests'
    time. Why: this machine's speed drifts by 10-30 % over minutes, so two sides' rounds run
    minutes apart compare the minutes as much as the sides; turns of one request (under a second
    each) put both in the same minute."""
    spans: dict[str, list[tuple[int, float, float]]] = {name: [] for name in sides}
    names = list(sides)
    for index, request in enumerate(requests):
        for name in names[index % len(names):] + names[: index % len(names)]:
            started = time.perf_counter()
            tokens, first_ms = sides[name](request)
            spans[name].append((tokens, time.perf_counter() - started, first_ms))
    return {name: {"tok_per_s": round(sum(t for t, _, _ in done) / sum(s for _, s, _ in done), 1),
                   "ttft_p50_ms": round(percentile([f for _, _, f in done], 50), 1),
                   "ttft_p95_ms": round(percentile([f for _, _, f in done], 95), 1), "requests": len(done),
                   "in_flight": 1}
            for name, done in spans.items()}


def fleet_one(client: Any, model: str) -> Callable[[list[dict[str, str]]], tuple[int, float]]:
    """One streamed request to the fleet (-> completion tokens, ms to the first text), warmed up."""
    def one(chat: list[dict[str, str]]) -> tuple[int, float]:
        t0 = time.perf_counter()
        handle = client.submit({"task_type": "text_generation", "messages": chat, "model": model,
                                "max_new_tokens": NEW_TOKENS, "stream": True, "priority": "interactive"})
        first = None
        for _ in handle.stream(timeout=600):
            if first is None:
                first = (time.perf_counter() - t0) * 1000
        # Done when its stream ends, as for the peer (the end entry carries the usage; the result
        # is stored a moment later and a streaming client never waits for it)
        usage = handle.usage or handle.result(timeout=600).usage
        return usage.completion_tokens, first if first is not None else (time.perf_counter() - t0) * 1000

    one(messages(PROMPTS[0]))  # warm-up
    return one


def fleet_generation(client: Any, model: str, in_flight: int, n: int) -> dict[str, Any]:
    """``n`` requests, ``in_flight`` at a time (closed loop), each streamed."""
    return closed_loop(fleet_one(client, model), chats(n), in_flight)


def closed_loop(one: Callable[[Any], tuple[int, float]], requests: list[Any], in_flight: int) -> dict[str, Any]:
    """``requests`` through ``one`` (-> completion tokens, ms to the first text), ``in_flight`` at a
    time (closed loop): the fleets and llama.cpp's server are driven and read the same way.
    ``tok_per_s`` is the rate while all of them run (``steady``); ``drained_tok_per_s`` all tokens
    over the whole round."""
    def timed(request: Any) -> Span:
        started = time.perf_counter()
        tokens, first_ms = one(request)
        return Span(started, started + first_ms / 1000, time.perf_counter(), tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        done = list(pool.map(timed, requests))
    drained = sum(span.tokens for span in done) / (time.perf_counter() - started)
    rate, window = steady(done, in_flight)
    first = [(span.first - span.begin) * 1000 for span in done]
    return {"tok_per_s": round(rate if window else drained, 1), "drained_tok_per_s": round(drained, 1),
            **({"window_s": round(window, 2)} if window else {}),
            "ttft_p50_ms": round(percentile(first, 50), 1), "ttft_p95_ms": round(percentile(first, 95), 1),
            "requests": len(requests), "in_flight": in_flight}


class Span(NamedTuple):
    """One request of a closed loop: when it was sent, its first text came, its answer came."""

    begin: float
    first: float
    end: float
    tokens: int


def steady(done: list[Span], in_flight: int) -> tuple[float, float]:
    """(tokens per second, window seconds) while all ``in_flight`` requests were running: from the
    moment the loop is full to the first answer after the last request went in; (0, 0) where the
    loop never held more than one request or never refilled.

    Why: a closed loop of N requests also fills (every prompt at once) and drains (its last wave
    finishing one by one, the longest answer alone at the end). In rounds of four waves of 8 a third
    of the decoding steps ran under 8 rows (bench/RESULTS.md), so whole-round tokens over
    whole-round time read the makespan of N requests rather than the rate at that load. Each
    request's tokens are spread evenly over its span from first text to answer, and count in the
    part inside the window."""
    if in_flight < 2 or len(done) <= in_flight:
        return 0.0, 0.0
    begins = sorted(span.begin for span in done)
    start, end = begins[in_flight - 1], min(span.end for span in done if span.end > begins[-1])
    inside = 0.0
    for span in done:
        if span.end > span.first:
            inside += span.tokens * max(0.0, min(span.end, end) - max(span.first, start)) / (span.end - span.first)
        elif start <= span.end <= end:
            inside += span.tokens
    return inside / (end - start), end - start


def serving(binary: str, gguf: str, continuous: Any) -> llama_server.LlamaServer:
    """llama.cpp's server on ``gguf``, configured as the backend's generation context is (its rows
    as slots, its KV cells, its flash-attention flag, the CPUs' threads), warmed up."""
    from workers.backends.llama_cpp import LlamaCppOptions
    from workers.backends.llama_cpp.llama_engine import cpu_threads

    options = LlamaCppOptions()
    server = llama_server.LlamaServer(binary, gguf, cpu_threads(), options.flash_attn,
                                      continuous.max_rows + continuous.interactive_reserve, options.kv_tokens, NEW_TOKENS)
    try:
        server.one(messages(PROMPTS[0]))  # warm-up
    except BaseException:
        server.close()
        raise
    return server


def best(results: dict[str, Any], key: str, result: dict[str, Any]) -> None:
    """Keep the round with more tok/s under ``key``."""
    results[key] = max(result, results.get(key, {}), key=lambda r: r.get("tok_per_s", 0))


def fleet_classification(client: Any, model: str, rows: list[tuple[str, list[str]]]) -> tuple[float, list[str]]:
    requests = [{"task_type": "classification", "text": text, "labels": labels, "model": model, "priority": "bulk"}
                for text, labels in rows]
    client.submit(requests[0]).result(timeout=600)  # warm-up
    started = time.perf_counter()
    handles = client.submit_many(requests)
    labels = [h.result(timeout=3600).output.label for h in handles]
    return round(len(rows) / (time.perf_counter() - started), 2), labels


def run(h: Harness, quick: bool) -> dict[str, Any]:
    from bench import isolation
    from shared.config import ModelConfig
    from workers.artifacts import resolve_source
    from workers.backends.llama_cpp import LlamaCppBackend, gguf_path, served_gguf
    from workers.prepare.evaluation import families, new_families

    settings = h.settings
    transformers_model = settings.models[0].model_dump(mode="json")
    llama, llama_q8, llama_q4 = llama_model(settings), llama_model(settings, "Q8_0"), llama_model(settings, "Q4_0")
    # 8 in flight: four waves at least, so the window where all 8 run (closed_loop) is most of a round
    # One stream beside the llama_cpp fleets: 16 requests a side (quick), as 8 moved the fleet's ratio
    # by several per cent between two runs of the same code (bench/RESULTS.md)
    singles, batched = (4, 32) if quick else (8, 64)
    rows = [(text, family.labels) for family in (*families(), *new_families())
            for text, _ in family.examples("report")[: 4 if quick else None]]
    source = resolve_source(settings.models[0].source)
    bundled = str(gguf_path(settings.models[0], source))
    bundled_peer = Peer(bundled)
    out: dict[str, Any] = {"peer": interleaved({"peer": bundled_peer.one}, chats(singles))["peer"]}
    print(f"[bench] cpu-peer: llama.cpp single stream {json.dumps(out['peer'])}", flush=True)
    labels: dict[str, list[str]] = {}
    server = llama_server.binary()
    if server is None:
        out["server_skipped"] = llama_server.MISSING
    for name, model in (("transformers", transformers_model), ("llama_cpp", llama), ("llama_cpp_q8_0", llama_q8),
                        ("llama_cpp_q4_0", llama_q4)):
        served = None
        if name != "transformers":
            config = ModelConfig(**model)
            served = str(served_gguf(settings, config, source, LlamaCppBackend.options(config)))
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(h.fleet(f"peer-{name}", models=[model]))
            srv = stack.enter_context(serving(server, served, settings.batching.continuous)) if served and server else None
            theirs = out.setdefault(f"server_{name}", {}) if srv else {}
            if served:
                # One stream: request by request in turn with llama.cpp on the bundled file, on the
                # file this fleet serves and its server (``interleaved``: this machine's speed
                # drifts by 10-30 % over minutes). Under load: rounds alternated with the server,
                # best round each.
                sides = {"peer": bundled_peer.one}
                if served != bundled:
                    sides["same_weights"] = stack.enter_context(contextlib.closing(Peer(served))).one
                sides["fleet"] = fleet_one(client, model["name"])
                if srv:
                    sides["server"] = srv.one
                got = interleaved(sides, chats(4 * singles))
                out[f"peer_beside_{name}"], out[f"{name}_single"] = got["peer"], got["fleet"]
                out[f"peer_{name}"] = got.get("same_weights", got["peer"])
                if srv:
                    theirs["single"] = got["server"]
            else:
                out[f"{name}_single"] = fleet_generation(client, model["name"], 1, singles)
            for in_flight, n in ((8, batched), (16, 2 * batched)):
                for _ in range(2 if srv and in_flight == 8 else 1):
                    best(out, f"{name}_{in_flight}", fleet_generation(client, model["name"], in_flight, n))
                    if srv:
                        best(theirs, str(in_flight), closed_loop(srv.one, chats(n), in_flight))
            if srv:
                theirs["resent"] = srv.resent
            out[f"{name}_classify_tasks_per_s"], labels[name] = fleet_classification(client, model["name"], rows)
        print(f"[bench] cpu-peer: {name} {json.dumps({k: v for k, v in out.items() if k.startswith(name + '_') or k in (f'peer_{name}', f'peer_beside_{name}', f'server_{name}')})}",
              flush=True)
    bundled_peer.close()

    def versus_server(name: str) -> dict[str, float]:
        """The fleet against llama.cpp's server on the same file, by load; and the server's own
        8 (16) in flight against its one stream: what llama.cpp's batching gets on this CPU."""
        if f"server_{name}" not in out:
            return {}
        theirs = out[f"server_{name}"]
        return {f"{name}_{k}_vs_server_{k}": round(out[f"{name}_{k}"]["tok_per_s"] / theirs[k]["tok_per_s"], 3)
                for k in ("single", "8", "16")} | \
               {f"server_{name}_{k}_vs_its_single": round(theirs[k]["tok_per_s"] / theirs["single"]["tok_per_s"], 3)
                for k in ("8", "16")}

    def agreement(name: str) -> float:
        return round(sum(a == b for a, b in zip(labels["transformers"], labels[name], strict=True)) / len(rows), 4)

    llama_harness = Harness(settings, h.redis_url, {**h.env, "AUTOGLM_MODELS": json.dumps([llama_q8])})
    isolated = isolation.run(llama_harness, 20 if quick else 40, 400 if quick else 2000, 16)
    # The reference: llama.cpp's one stream on the bundled file, as read in turns beside the
    # fleet serving that file (its reading alone at the start, ``cpu_peer.peer``, stays in the record).
    peer_single = out["peer_beside_llama_cpp"]["tok_per_s"]
    return {
        "cpu_peer": out,
        "cpu_peer_tok_per_s": {"peer_single": peer_single,
                               "peer_q8_0_single": out["peer_llama_cpp_q8_0"]["tok_per_s"],
                               "peer_q4_0_single": out["peer_llama_cpp_q4_0"]["tok_per_s"],
                               "llama_cpp_single": out["llama_cpp_single"]["tok_per_s"],
                               "llama_cpp_8": out["llama_cpp_8"]["tok_per_s"],
                               "llama_cpp_16": out["llama_cpp_16"]["tok_per_s"],
                               "transformers_single": out["transformers_single"]["tok_per_s"],
                               "transformers_8": out["transformers_8"]["tok_per_s"],
                               "transformers_16": out["transformers_16"]["tok_per_s"],
                               "llama_cpp_q8_0_single": out["llama_cpp_q8_0_single"]["tok_per_s"],
                               "llama_cpp_q8_0_8": out["llama_cpp_q8_0_8"]["tok_per_s"],
                               "llama_cpp_q8_0_16": out["llama_cpp_q8_0_16"]["tok_per_s"],
                               "llama_cpp_q4_0_single": out["llama_cpp_q4_0_single"]["tok_per_s"],
                               "llama_cpp_q4_0_8": out["llama_cpp_q4_0_8"]["tok_per_s"],
                               "llama_cpp_q4_0_16": out["llama_cpp_q4_0_16"]["tok_per_s"],
                               **{f"server_{k}": out["server_llama_cpp"][k]["tok_per_s"]
                                  for k in ("single", "8", "16") if "server_llama_cpp" in out}},
        # Against llama.cpp on the bundled file as read beside each fleet (its one stream in turns
        # with the fleet's).
        **{f"{name}_{n}_vs_peer": round(out[f"{name}_{n}"]["tok_per_s"] / out[f"peer_beside_{name}"]["tok_per_s"], 3)
           for name in ("llama_cpp", "llama_cpp_q8_0", "llama_cpp_q4_0") for n in ("single", "8")},
        **{f"{name}_{n}_vs_same_weights": round(out[f"{name}_{n}"]["tok_per_s"] / out[f"peer_{name}"]["tok_per_s"], 3)
           for name in ("llama_cpp", "llama_cpp_q8_0", "llama_cpp_q4_0") for n in ("single", "8")},
        **{key: value for name in ("llama_cpp", "llama_cpp_q8_0", "llama_cpp_q4_0") for key, value in versus_server(name).items()},
        "llama_cpp_label_agreement": agreement("llama_cpp"),
        "llama_cpp_q8_0_label_agreement": agreement("llama_cpp_q8_0"),
        "llama_cpp_q4_0_label_agreement": agreement("llama_cpp_q4_0"),
        "llama_cpp_label_rows": len(rows),
        "llama_cpp_interactive_p95_ratio": isolated["interactive_p95_ratio"],
        "llama_cpp_isolation": isolated,
    }
