"""The llama_cpp backend (workers/backends/llama_cpp/): the bundled GGUF file itself on llama.cpp.

Real model, real library: answers are judged where a 135M model is reliable (a capital city,
clear reviews), and labels are compared with the transformers backend's on the same rows. Skipped,
saying why, where the extra is not installed (`make setup LLAMA_CPP=1` installs it, `make test
LLAMA_CPP=1` runs these too).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from opentelemetry import trace

from shared.config import ModelConfig, Settings, load_settings
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest
from tests.unit.test_continuous import BULK, INTERACTIVE, Sink, drive, generator
from workers.core.continuous import eligible

NOT_INSTALLED = "llama-cpp-python (the llama_cpp extra) is not installed: `make setup LLAMA_CPP=1` builds it"
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def llama_config(settings: Settings, **options: Any) -> ModelConfig:
    bundled = settings.models[0]
    return ModelConfig(**{**bundled.model_dump(), "name": "smollm2-135m-llama", "backend": "llama_cpp",
                          "options": options})


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def llama(settings: Settings) -> Any:
    pytest.importorskip("llama_cpp", reason=NOT_INSTALLED)
    from workers.backends import batch_side

    engine = batch_side(settings, llama_config(settings))
    yield engine
    engine.close()


def ask(engine: Any, **request: Any) -> Any:
    return engine.prepare(GenerateRequest(**request))


def test_the_bundled_gguf_answers_a_question_it_knows(llama: Any) -> None:
    answer = llama.generate([ask(llama, messages=CAPITAL, max_new_tokens=12)])[0]
    assert "Paris" in answer.output.text
    assert answer.usage.prompt_tokens > 10 and 1 <= answer.usage.completion_tokens <= 12


def test_rows_joining_a_running_batch_answer_as_they_do_alone(llama: Any) -> None:
    """Rows join while others decode, and each answers its own question. Compared by the fact each
    answer must hold, not word for word: llama.cpp's kernels depend on the batch's shape (one row:
    vector products; several: matrix products), which moves log-probabilities by up to ~0.1 and
    flips near-ties (seen: "The most obvious colour" alone, "This is the most obvious" beside others)."""
    questions = {"What is the capital of France? Answer in one word.": "Paris",
                 "What is the opposite of hot? One word.": "cold",
                 "How many legs does a spider have? Answer with a number.": "8",
                 "What is the chemical symbol for water?": "H2O"}
    items = [ask(llama, messages=[{"role": "user", "content": q}], max_new_tokens=n)
             for q, n in zip(questions, (24, 12, 20, 16), strict=True)]
    alone = [llama.generate([item])[0].output.text for item in items]
    assert all(fact in text for fact, text in zip(questions.values(), alone, strict=True)), alone
    static: list[str] = []
    gen = generator(llama, Sink(), static)
    first = gen.submit(items[0], BULK, "a", trace.INVALID_SPAN_CONTEXT)
    for _ in range(3):
        gen.step()  # the first row is decoding when the others join
    rest = [gen.submit(item, BULK, t, trace.INVALID_SPAN_CONTEXT) for item, t in zip(items[1:], "bcd", strict=True)]
    drive(gen, [first, *rest])
    together = [f.result()[0].output.text for f in [first, *rest]]
    assert all(fact in text for fact, text in zip(questions.values(), together, strict=True)), together
    assert static == [], "no row should have left the continuous batch"
    assert not llama.slots.busy


def test_sampled_rows_are_batched_continuously_and_vary(llama: Any) -> None:
    sampled = ask(llama, prompt="Once upon a time", max_new_tokens=16, temperature=1.2, top_p=0.95)
    assert eligible(sampled, llama), "llama.cpp rows sample per row, so sampled requests join the running batch"
    static: list[str] = []
    gen = generator(llama, Sink(), static)
    futures = [gen.submit(sampled, BULK, f"s{i}", trace.INVALID_SPAN_CONTEXT) for i in range(4)]
    drive(gen, futures)
    texts = {f.result()[0].output.text for f in futures}
    assert len(texts) > 1 and static == []


def test_a_nucleus_of_one_token_is_greedy(llama: Any) -> None:
    greedy = llama.generate([ask(llama, messages=CAPITAL, max_new_tokens=8)])[0].output.text
    narrow = llama.generate([ask(llama, messages=CAPITAL, max_new_tokens=8, temperature=1.0, top_p=1e-6)])[0].output.text
    assert narrow == greedy


def test_a_stream_carries_the_text_in_order_and_a_stop_string_never_reaches_it(llama: Any) -> None:
    full = llama.generate([ask(llama, prompt="List the days of the week:", max_new_tokens=40)])[0].output.text
    assert len(full) > 12
    stop = full[8:11]
    sink = Sink()
    gen = generator(llama, sink, [])
    done = gen.submit(ask(llama, prompt="List the days of the week:", max_new_tokens=40, stream=True, stop=[stop]),
                      INTERACTIVE, "t", trace.INVALID_SPAN_CONTEXT)
    drive(gen, [done])
    answer = done.result()[0]
    streamed = "".join(text for _, text in sink.pieces["t"])
    assert answer.output.finish_reason == "stop" and sink.ends["t"] == "stop"
    assert stop not in streamed and streamed.strip() == answer.output.text
    assert full.startswith(answer.output.text)


def test_a_cancelled_row_leaves_and_frees_its_sequence(llama: Any) -> None:
    gen = generator(llama, Sink(), [])
    done = gen.submit(ask(llama, prompt="Count from one to a hundred:", max_new_tokens=200), BULK, "c",
                      trace.INVALID_SPAN_CONTEXT)
    for _ in range(4):
        gen.step()
    gen.cancel({"c"})
    with pytest.raises(FleetError) as error:
        done.result(timeout=1)
    assert error.value.code == ErrorCode.CANCELLED
    assert not llama.slots.busy


def test_a_prompt_prefix_already_in_the_cache_is_not_read_again(llama: Any) -> None:
    """A finished row's sequence keeps its cache: the next chat prompt starts after the template's
    shared system turn, and the same prompt again decodes only its last token. Answers keep their facts."""
    first = ask(llama, messages=CAPITAL, max_new_tokens=8)
    spider = ask(llama, messages=[{"role": "user", "content": "How many legs does a spider have? Answer with a number."}],
                 max_new_tokens=12)
    shared = next(i for i, (a, b) in enumerate(zip(first.input_ids, spider.input_ids)) if a != b)
    assert shared > 10, "the chat template's system turn is a shared prefix"
    llama.generate([first])
    before = llama.slots.reused_tokens
    assert "8" in llama.generate([spider])[0].output.text
    assert llama.slots.reused_tokens - before >= shared
    before = llama.slots.reused_tokens
    assert "Paris" in llama.generate([first])[0].output.text
    assert llama.slots.reused_tokens - before == len(first.input_ids) - 1


def test_a_joining_row_shares_the_prefix_of_a_running_one(llama: Any) -> None:
    llama.slots.close()  # no kept caches: only the running row can lend its cells
    static: list[str] = []
    gen = generator(llama, Sink(), static)
    story = gen.submit(ask(llama, messages=[{"role": "user", "content": "Tell me a long story about a cat."}],
                           max_new_tokens=40), BULK, "story", trace.INVALID_SPAN_CONTEXT)
    for _ in range(3):
        gen.step()
    before = llama.slots.reused_tokens
    capital = gen.submit(ask(llama, messages=CAPITAL, max_new_tokens=12), INTERACTIVE, "capital",
                         trace.INVALID_SPAN_CONTEXT)
    drive(gen, [story, capital])
    assert llama.slots.reused_tokens - before > 10
    assert "Paris" in capital.result()[0].output.text and static == []


def test_kept_caches_give_their_cells_to_a_row_that_needs_them(llama: Any) -> None:
    for question in ("What is the opposite of hot? One word.", "What is the chemical symbol for water?"):
        llama.generate([ask(llama, messages=[{"role": "user", "content": question}], max_new_tokens=6)])
    slots = llama.slots
    assert slots._kept > 0 and not slots.busy
    slots.add_request([1] * 10, "big", max_new_tokens=slots.kv_tokens - 10)  # every cell of the context
    slots.run()
    assert "big" in slots._running and slots._kept == 0, "the kept caches were dropped to admit it"
    slots.cancel_request("big")
    assert not slots.busy


def test_labels_agree_with_the_transformers_backend(llama: Any, settings: Settings) -> None:
    """Same method, same tokens, other kernels: the labels agree (a guard on 16 rows;
    `python -m bench.probes.label_agreement` measures every report row, bench/RESULTS.md)."""
    from workers.artifacts import prepared_path
    from workers.backends.transformers.batch_side import Engine
    from workers.prepare.evaluation import families

    reference = Engine(settings.models[0], prepared_path(settings, settings.models[0]), device="cpu")
    rows = [(family, text) for family in families()[:2] for text, _ in family.examples("report")[:8]]
    prepared = [(llama.prepare(ClassifyRequest(text=t, labels=f.labels)), reference.prepare(ClassifyRequest(text=t, labels=f.labels)))
                for f, t in rows]
    ours = [a.output.label for a in llama.classify([p for p, _ in prepared])]
    theirs = [a.output.label for a in reference.classify([p for _, p in prepared])]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(rows)
    assert agree >= 0.9, list(zip(ours, theirs, strict=True))


def test_classification_scores_are_the_same_in_a_batch_and_alone(llama: Any) -> None:
    requests = [ClassifyRequest(text="An excellent, wonderful film: I loved every minute of it.", labels=["positive", "negative"]),
                ClassifyRequest(text="Broken on arrival, useless, and the seller never answered my emails.",
                                labels=["positive", "negative", "neutral"])]
    items = [llama.prepare(r) for r in requests]
    alone = [llama.classify([item])[0].output for item in items]
    together = [a.output for a in llama.classify(items)]
    assert [a.label for a in alone] == [b.label for b in together] == ["positive", "negative"]
    # Other batch shapes take other kernels (ggml's quantized matmuls differ for one row and for
    # many), and the sharp calibration magnifies small log-probability differences: close, not equal
    # (up to 0.08 measured on an AVX2-only CPU; a row reading another row's tokens moves far more).
    for a, b in zip(alone, together, strict=True):
        assert b.scores == pytest.approx(a.scores, abs=0.12)


def test_a_prompts_multi_token_labels_are_scored_off_one_read_of_the_prompt(llama: Any) -> None:
    """A packed row's prompt belongs to one sequence per label branch, so llama.cpp reads it once;
    each branch sees the prompt and itself only, and scores as a row of its own does: within what a
    batch's shape moves llama.cpp's kernels (seen: up to 0.26 on a -14.9 sum over a three-token
    label, the rest equal); a branch that saw another's tokens would move its later tokens by units."""
    import torch

    labels = ["lost or stolen card", "card payment declined", "exchange rate question"]
    requests = [ClassifyRequest(text="I lost my wallet with the card in it", labels=labels),
                ClassifyRequest(text="Stocks rose", labels=["finance and markets", "sport", "the weather today"])]
    items = [llama.prepare(r) for r in requests]
    rows = llama._lm_rows(items[0], 0)
    assert any(len(row.branches) == len(labels) for row in rows), "a prompt and a branch per label in one row"
    packed = llama._lm_scores(items)
    llama.packs_labels = False
    try:
        apart = llama._lm_scores(items)
    finally:
        del llama.packs_labels
    for one, other in zip(packed, apart, strict=True):
        assert one.tolist() == pytest.approx(other.tolist(), abs=0.5)
        assert one.argmax() == other.argmax()
    assert not torch.equal(packed[0], packed[0].roll(1))


def test_a_classification_batch_makes_room_for_interactive_work_between_its_decodes(llama: Any) -> None:
    """A batch's rows are scored in decodes of ``score_chunk_tokens``; between two of them the engine
    calls ``between_chunks`` (the engine core runs interactive generation there), and the scores
    are those of the batch run whole."""
    texts = [f"Review {i}: the food was {'great' if i % 2 else 'awful'} and the staff {'kind' if i % 2 else 'rude'}."
             for i in range(12)]
    items = [llama.prepare(ClassifyRequest(text=t, labels=["positive", "negative"])) for t in texts]
    whole = [a.output for a in llama.classify(items)]
    calls: list[int] = []
    llama.between_chunks = lambda: calls.append(1)
    try:
        parted = [a.output for a in llama.classify(items)]
    finally:
        llama.between_chunks = None
    assert len(calls) >= 2, "a batch of 12 rows over score_chunk_tokens decodes should make room at least twice"
    assert [a.label for a in parted] == [b.label for b in whole]
    for a, b in zip(parted, whole, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-6)  # the same decodes either way


def test_a_requantized_file_is_made_once_and_answers_as_the_source(settings: Settings) -> None:
    """``requantize: Q8_0``: the file is converted once into the models folder (llama.cpp's own
    quantizer), later loads take the cached file, and the model still knows its facts."""
    pytest.importorskip("llama_cpp", reason=NOT_INSTALLED)
    from workers.artifacts import resolve_source
    from workers.backends import batch_side
    from workers.backends.llama_cpp import LlamaCppBackend, served_gguf

    config = llama_config(settings, requantize="Q8_0")
    engine = batch_side(settings, config)
    try:
        assert engine.path.name.endswith("-q8_0.gguf") and engine.path.parent == settings.models_dir / "gguf"
        made = engine.path.stat().st_mtime_ns
        assert served_gguf(settings, config, resolve_source(config.source), LlamaCppBackend.options(config)) == engine.path
        assert engine.path.stat().st_mtime_ns == made, "the cached conversion must be reused, not made again"
        assert "Paris" in engine.generate([ask(engine, messages=CAPITAL, max_new_tokens=12)])[0].output.text
        labels = [a.output.label for a in engine.classify([engine.prepare(ClassifyRequest(text=t, labels=["positive", "negative"]))
                                                            for t in ("An excellent, wonderful film: I loved every minute of it.",
                                                                      "Broken on arrival, useless, a waste of money.")])]
        assert labels == ["positive", "negative"]
    finally:
        engine.close()


def test_a_row_over_the_kv_cells_is_refused_not_stuck(llama: Any) -> None:
    outputs: list[Any] = []
    llama.slots.add_request([1] * 10, "too-long", max_new_tokens=llama.slots.kv_tokens, sink=outputs.append)
    assert outputs and outputs[0].finished and "KV cells" in outputs[0].error
    assert not llama.slots.busy


def test_unknown_options_are_refused_by_name(settings: Settings) -> None:
    from workers.backends.llama_cpp import LlamaCppBackend

    with pytest.raises(FleetError) as error:
        LlamaCppBackend.options(llama_config(settings, thread=2))
    assert error.value.code == ErrorCode.INVALID_INPUT and "thread" in error.value.message


def test_without_the_extra_the_backend_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.backends.llama_cpp.llama_engine import import_llama

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the extra sees
    with pytest.raises(FleetError) as error:
        import_llama()
    assert error.value.code == ErrorCode.MODEL_UNAVAILABLE and "llama-cpp" in error.value.message


def test_the_readme_model_entry_is_valid_configuration() -> None:
    """README's llama_cpp model entry loads as settings and its options as the backend's."""
    import re
    from pathlib import Path

    import yaml

    from workers.backends.llama_cpp import LlamaCppBackend

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "backend: llama_cpp" in b]
    settings = load_settings(models=yaml.safe_load(block)["models"])
    (model,) = settings.models
    assert model.backend == "llama_cpp" and LlamaCppBackend.options(model).kv_tokens == 8192
