"""The transformers backend's batch side: one model loaded through the real ``from_pretrained`` path
(GPTQ folders included), batched generation and batched label scoring.

Created once per model in the engine core (workers/core/); ``run`` takes a whole batch of one task
type in one call from the core's loop (classification) or its continuous-batching generator.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, GPTQConfig

from shared.config import ContinuousConfig, ModelConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyOutput, ClassifyRequest, GenerateOutput, GenerateRequest, Usage
from workers.artifacts import encoder_folder
from workers.backends.transformers.request_side import Preparer
from workers.backends.transformers.sampling import PerRowSampling, PerRowStop
from workers.prompts import CALIBRATION_TEXTS, NO_SHOTS, Shots, descriptions_of, shots_for
from workers.wire import Answer, Channel, Examples, Prepared, PreparedClassify, PreparedGenerate

log = logging.getLogger(__name__)
GPTQ_CACHE_ENV = "GPTQ_TORCH_CACHE_WEIGHTS"



class Row(NamedTuple):
    """One sequence of a scoring pass and the (position, target token, slot) pairs read off it.

    ``branches``: where each branch starts, for a row that packs several continuations of one
    prompt (a request's multi-token labels): tokens from ``branches[0]`` on see the prompt
    (``ids[:branches[0]]``) and the earlier tokens of their own branch only, at the positions they
    would have right after the prompt. The prompt is read once instead of once per label."""

    ids: list[int]
    scored: list[tuple[int, int, int]]
    branches: tuple[int, ...] = ()

# Scored positions per LM-head call: bounds memory to SCORE_CHUNK x vocab floats.
SCORE_CHUNK = 1024
# Padded tokens per scoring forward pass. A batch within the batcher's token budget is one pass; a
# single request bigger than that (many multi-token labels x a long text) is scored in several, so
# its attention memory stays bounded (one such request took 7 GB in one pass on a CPU).
MAX_FORWARD_TOKENS = 16384
# On a CPU, padding is paid for in full: a batch's rows (prompts, label prefixes + texts of every
# length) are sorted by length and scored in passes of at most this many padded tokens. On the
# selection split, batches of 16: 1.75-1.89 padded tokens per real one as one pass, 1.16-1.25 sorted
# in passes of 2,048: 1.79x faster per request (bench/RESULTS.md, 2026-12-03 morning). A GPU is
# launch-bound at these sizes: one pass there.
CPU_FORWARD_TOKENS = 2048


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, "worker.device is 'cuda' but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)
    return torch.float16 if device.type == "cuda" else torch.float32


def _groups(rows: list[Row], budget: int) -> list[list[Row]]:
    """Consecutive rows, as few groups as keep each group's rows x longest row within ``budget``
    (a row longer than the budget is a group of its own)."""
    groups: list[list[Row]] = [[]]
    width = 0
    for row in rows:
        wider = max(width, len(row.ids))
        if groups[-1] and (len(groups[-1]) + 1) * wider > budget:
            groups.append([])
            wider = len(row.ids)
        groups[-1].append(row)
        width = wider
    return groups


@contextmanager
def _gptq_weight_cache(enabled: bool) -> Iterator[None]:
    """gptqmodel's TorchLinear (its CPU kernel for 8-bit) dequantizes every weight on every call:
    10-32 tok/s against 95 for float on a 2-core EPYC. Its switch (this variable, read in
    ``TorchLinear.__init__``) keeps the dequantized weight after the first call instead: the same
    matmul on the same weights, 5.5x faster (bench/probes/weight_cache.py). Modules read it when
    they are built, inside ``from_pretrained``, so it is set only for that call.

    Such a layer dequantizes once, so the ``torch.compile`` wrapper TorchLinear's ``optimize()``
    puts around its dequantization would only slow that one call (~9 s of compiling on 2 cores).
    For the same call its ``optimize`` is the base class's, which marks the layer optimized and
    wraps nothing: building 210 wrappers was a quarter of an 8-bit engine's load (1.6 s of 6.9 on
    a 2-core EPYC), paid by every worker start, only for ``_eager_dequantize`` to drop them."""
    if not enabled:
        yield
        return
    before = os.environ.get(GPTQ_CACHE_ENV)
    os.environ[GPTQ_CACHE_ENV] = "1"
    torch_linear, base = _gptq_linear_classes()
    compiling = torch_linear.__dict__.get("optimize") if torch_linear is not None else None
    if compiling is not None:
        torch_linear.optimize = base.optimize  # marks the layer optimized; no torch.compile
    try:
        yield
    finally:
        if compiling is not None:
            torch_linear.optimize = compiling
        if before is None:
            os.environ.pop(GPTQ_CACHE_ENV, None)
        else:
            os.environ[GPTQ_CACHE_ENV] = before


def _gptq_linear_classes() -> tuple[type | None, type | None]:
    """gptqmodel's TorchLinear and the base class of its kernels; Nones where gptqmodel is not installed."""
    try:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    except ImportError:
        return None, None
    return TorchLinear, BaseQuantLinear


def _eager_dequantize(model: torch.nn.Module) -> None:
    """Layers that keep their dequantized weight dequantize once: were a compiled wrapper put
    around that call (gptqmodel's ``optimize()``; ``_gptq_weight_cache`` keeps it from being made),
    its first call (inside the warm-up) would take ~9 s of an 8-bit engine's load on 2 cores,
    against ~2 s for the whole warm-up eagerly. Dropping the instance's compiled wrapper falls back
    to the class's own (eager) method: the same arithmetic."""
    for module in model.modules():
        if getattr(module, "_cache_enabled", False) and "dequantize_weight" in vars(module):
            del module.dequantize_weight


def gptq_bits(path: Path) -> int | None:
    """The bit width of a GPTQ folder (its config.json's quantization_config), None for a float model."""
    try:
        quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return quant.get("bits") if quant.get("quant_method") == "gptq" else None


def kernel_attempts(configured: str | None, bits: int | None) -> list[str | None]:
    """The kernels to try loading with, in order: the configured one, then GPTQModel's own choice
    (None). A float model has no kernel to choose."""
    if bits is None or configured is None:
        return [None]
    return [configured, None]


def _label_means(embedded: torch.Tensor, index: torch.Tensor, labels: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples' mean, and each label's mean example centred on it at unit length (a zero row for
    a label without examples): the prototype expert's reference points."""
    centre = embedded.mean(dim=0)
    means = torch.stack([(embedded[index == label] - centre).mean(dim=0) if (index == label).any()
                         else torch.zeros_like(centre) for label in labels])
    return centre, torch.nn.functional.normalize(means, dim=1)


def padded_shape(rows: int, width: int, widths: list[int]) -> tuple[int, int]:
    """The (rows, width) a classification forward pass runs at: as given without ``widths``; else rows
    to the next power of two and width to the first of ``widths`` that fits (past the last: as is).
    Rows are right-padded and scored positions read from real rows only, so the padding changes no
    score; it bounds the shapes a GPU compiles or captures to a few."""
    if not widths:
        return rows, width
    return 1 << (rows - 1).bit_length(), next((w for w in widths if w >= width), width)


def gptq_kernels(model: Any) -> set[str]:
    """The GPTQ kernels GPTQModel chose for this model's layers (class names, e.g. MarlinQuantLinear,
    ExllamaV2QuantLinear, TritonV2QuantLinear, TorchLinear); empty for a float model."""
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel.")
            and hasattr(m, "qweight")}


class Engine:
    """A causal LM loaded with the real ``from_pretrained`` path (GPTQ folders included)."""

    #: whether its continuous batching takes sampled requests too (transformers' manager samples
    #: all its rows or none: greedy only)
    samples_per_row: bool = False
    #: set by the engine core while it serves: a batch made of parts (the llama_cpp backend's
    #: classification decodes) calls it between two parts, and interactive generation runs there
    between_chunks: Callable[[], None] | None = None

    def __init__(self, config: ModelConfig, path: Path, device: str = "auto", widths: list[int] | None = None) -> None:
        """``widths``: classification forward passes are padded to these shapes (``padded_shape``)."""
        self.config = config
        self.path = path
        self.widths = sorted(widths or [])
        self.device = pick_device(device)
        self.dtype = pick_dtype(config.dtype, self.device)
        started = time.perf_counter()
        self.preparer = Preparer(config, path)
        self.tokenizer = self.preparer.tokenizer
        bits = gptq_bits(path)
        # The weight cache's switch for a GPTQ folder only: a float one has no such layers, and would
        # import gptqmodel for nothing (a tiny test model's engine loaded in 5.3 CPU-s with it, 4.4 without).
        with _gptq_weight_cache(config.cpu_weight_cache and self.device.type == "cpu" and bits is not None):
            self.model = self._load(path, bits)
        self.model.eval()
        if config.cpu_weight_cache and self.device.type == "cpu":
            _eager_dequantize(self.model)
        # One forward pass at a time, whichever thread calls: when continuous batching ran in its own
        # thread beside classification batches, the two interleaved unguarded gave wrong
        # classifications for the rest of the process (seen: 3/10 clear reviews right).
        self.model_lock = threading.RLock()
        self.model.register_forward_pre_hook(lambda *_: (self.model_lock.acquire(), None)[1])  # None: inputs unchanged
        self.model.register_forward_hook(lambda *_: self.model_lock.release(), always_call=True)
        self._classification_state()
        self._warm_up()
        self.kernels = gptq_kernels(self.model)
        if self.kernels:
            log.info("GPTQ kernel for %s on %s: %s", config.name, self.device, ", ".join(sorted(self.kernels)))
        self.load_seconds = time.perf_counter() - started
        self.context = self.preparer.context
        self.stop_token_ids = self._stop_token_ids()
        log.info("loaded %s from %s on %s/%s in %.1fs", config.name, path, self.device, self.dtype, self.load_seconds)

    def _classification_state(self) -> None:
        """What the classification method keeps beside the LM, whatever runs the LM (the llama_cpp
        engine sets it up too): the sentence encoder and the caches of priors and embedded sets."""
        encoder = self.config.classification_encoder
        self.encoder = None if encoder is None else AutoModel.from_pretrained(
            encoder_folder(encoder.source), dtype=torch.float32, device_map=str(self.device)).eval()
        self._priors: dict[tuple, torch.Tensor] = {}
        self._example_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._encoded_cache: dict[tuple, torch.Tensor] = {}  # phrase sets and example sets, embedded
        self._example_priors: dict[tuple, dict[str, torch.Tensor]] = {}
        self._remembered: dict[tuple, torch.Tensor] | None = None  # see remembering_scores

    @property
    def name(self) -> str:
        return self.config.name

    def _load(self, path: Path, bits: int | None) -> Any:
        """The model through ``from_pretrained``; a GPTQ folder with the configured kernel first, then
        GPTQModel's own choice if that kernel cannot take this artifact here (``kernel_attempts``)."""
        for kernel in kernel_attempts(self.config.gptq_kernel, bits):
            extra = {} if kernel is None else {"quantization_config": GPTQConfig(bits=bits, backend=kernel)}
            try:
                return AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, device_map=str(self.device),
                                                            trust_remote_code=self.config.trust_remote_code, **extra)
            except (ValueError, NotImplementedError, RuntimeError, ImportError) as exc:
                if kernel is None:
                    raise
                log.warning("GPTQ kernel %s cannot load %s on %s (%s); letting GPTQModel choose", kernel,
                            self.config.name, self.device, exc)
        raise AssertionError("unreachable: the last attempt is GPTQModel's own choice")

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One forward pass now, in one thread. Kernels finish setting up on their first call
        (gptqmodel's CPU kernel repacks its weights then, unguarded); the engine core later runs
        continuous-batching steps and classification batches in two threads, which must never
        both make that first call (seen: 'rshift_cpu not implemented for BFloat16')."""
        ids = self.tokenizer("Hello", return_tensors="pt")["input_ids"].to(self.device)
        self.model(input_ids=ids)

    def prepare(self, request: GenerateRequest | ClassifyRequest) -> Prepared:
        return self.preparer.prepare(request)

    def _stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    # -- per batch, in the batcher's thread ----------------------------------------------------
    @torch.inference_mode()
    def generate(self, items: list[PreparedGenerate], streamer: Any = None) -> list[Answer]:
        """Left-padded batched ``generate``; each row keeps its own sampling and stop settings.
        ``streamer``: transformers' streamer hook, called once per decoding step (the bench times
        a static batch's first token with it)."""
        pad = self.tokenizer.pad_token_id
        width = max(len(item.input_ids) for item in items)
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, width - len(item.input_ids) :] = torch.tensor(item.input_ids)
            attention[row, width - len(item.input_ids) :] = 1
        requests = [item.request for item in items]
        sampling = any(r.temperature > 0 for r in requests)
        # Sampling knobs live in PerRowSampling; the built-in warpers are neutralised (top_k=0 is off).
        knobs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sampling else {"do_sample": False}
        config = GenerationConfig(
            max_new_tokens=max(r.max_new_tokens for r in requests),
            pad_token_id=pad,
            eos_token_id=self.stop_token_ids,
            **knobs,
        )
        processors = [PerRowSampling([r.temperature for r in requests], [r.top_p for r in requests], self.device)]
        stopper = PerRowStop(width, [r.max_new_tokens for r in requests], [r.stop for r in requests], self.tokenizer)
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=processors if sampling else None,
            stopping_criteria=[stopper],
            streamer=streamer,
        )
        return [self.decode_row(item, output[row, width:].tolist()) for row, item in enumerate(items)]

    def continuous_batches(self, config: ContinuousConfig) -> tuple[Any, Any]:
        """The scheduler the engine core's continuous batching drives: transformers' manager and
        the stepper that runs it in the core's loop (workers/backends/transformers/steps.py)."""
        from workers.backends.transformers.steps import continuous_batches

        return continuous_batches(self, config)

    def cut_row(self, item: PreparedGenerate, new_ids: list[int]) -> tuple[list[int], str, str]:
        """A row's tokens and text up to its limit, first stop token or first stop string (the
        text unstripped: a token stream's offsets count in it), and its finish reason."""
        request = item.request
        new_ids = new_ids[: request.max_new_tokens]
        finish = "length"
        for index, token in enumerate(new_ids):
            if token in self.stop_token_ids:
                new_ids, finish = new_ids[:index], "stop"
                break
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in request.stop if stop in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return new_ids, text, finish

    def decode_row(self, item: PreparedGenerate, new_ids: list[int]) -> Answer:
        new_ids, text, finish = self.cut_row(item, new_ids)
        usage = Usage(prompt_tokens=item.prompt_tokens, completion_tokens=len(new_ids))
        return Answer(GenerateOutput(text=text.strip(), finish_reason=finish), usage)

    # The transformers engine packs a prompt's multi-token labels into one row (a 4D attention
    # mask; llama_cpp: a sequence per branch); an engine whose _score takes plain rows only says False.
    packs_labels = True

    def _direct_rows(self, prompt: list[int], labels: list[list[int]], first_slot: int) -> list[Row]:
        """Rows scoring log P(label | prompt) for each label into slots ``first_slot + i``.

        A label's first token is read off the prompt's last position, so a query whose labels are
        all single tokens (the usual case: " positive", " negative") costs one row, not one per
        label. A multi-token label's later tokens are read off a branch after the prompt (one row
        for them all: ``Row.branches``), or, where the engine does not pack, a row (prompt + label)
        of its own.
        """
        long_labels = [label for label in labels if len(label) > 1]
        if self.packs_labels and long_labels:
            ids, scored, branches = list(prompt), [], []
            for index, label in enumerate(labels):
                scored.append((len(prompt) - 1, label[0], first_slot + index))  # logits at t predict token t+1
                if len(label) > 1:
                    branches.append(len(ids))
                    scored += [(len(ids) + k - 1, label[k], first_slot + index) for k in range(1, len(label))]
                    ids += label[:-1]  # a label's last token is only read, never read from
            return [Row(ids, scored, tuple(branches))]
        rows = [Row(prompt + label, []) for label in long_labels] or [Row(prompt, [])]
        row = 0
        for index, label in enumerate(labels):
            slot = first_slot + index
            rows[0].scored.append((len(prompt) - 1, label[0], slot))
            if len(label) > 1:
                rows[row].scored.extend((len(prompt) + k - 1, label[k], slot) for k in range(1, len(label)))
                row += 1
        return rows

    @staticmethod
    def _channel_rows(channel: Channel, first_slot: int) -> list[Row]:
        """Rows scoring log P(text | prefix of label i) into slots ``first_slot + i``."""
        text = channel.text_ids
        return [
            Row(prefix + text, [(len(prefix) + k - 1, token, first_slot + index) for k, token in enumerate(text)])
            for index, prefix in enumerate(channel.prefix_ids)
        ]

    def _score(self, rows: list[Row], slots: int) -> torch.Tensor:
        """Sum the log-probabilities of every row's (position, target) pairs into their slots, in
        one forward pass (more when the rows exceed MAX_FORWARD_TOKENS; on a CPU, sorted by length
        in passes of CPU_FORWARD_TOKENS, so short rows are not padded to the longest). Rows are right-padded; only
        the hidden states at scored positions go through the LM head, in chunks, so memory stays
        O(chunk x vocab)."""
        picked_parts, targets, slot_of = [], [], []
        budget = MAX_FORWARD_TOKENS
        if self.device.type == "cpu":
            rows, budget = sorted(rows, key=lambda row: len(row.ids)), min(budget, CPU_FORWARD_TOKENS)
        for group in _groups(rows, budget):
            height, width = padded_shape(len(group), max(len(row.ids) for row in group), self.widths)
            input_ids = torch.full((height, width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((height, width), dtype=torch.long)
            attention[:, 0] = 1  # filler rows attend to one token: a fully masked row can turn NaN
            seq_index, positions = [], []
            for r, row in enumerate(group):
                input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
                attention[r, : len(row.ids)] = 1
                for position, target, slot in row.scored:
                    seq_index.append(r)
                    positions.append(position)
                    targets.append(target)
                    slot_of.append(slot)
            inputs: dict[str, torch.Tensor] = {"attention_mask": attention}
            if any(row.branches for row in group):
                inputs = self._branch_inputs(group, height, width)
            hidden = self.model.get_decoder()(
                input_ids=input_ids.to(self.device), **{k: v.to(self.device) for k, v in inputs.items()}
            ).last_hidden_state
            picked_parts.append(hidden[torch.tensor(seq_index), torch.tensor(positions)])
        picked = torch.cat(picked_parts)
        wanted = torch.tensor(targets, device=picked.device)
        head = self.model.get_output_embeddings()
        pieces = []
        for start in range(0, len(targets), SCORE_CHUNK):
            logits = head(picked[start : start + SCORE_CHUNK]).float()
            chosen = logits.gather(1, wanted[start : start + SCORE_CHUNK, None]).squeeze(1)
            pieces.append((chosen - logits.logsumexp(dim=-1)).cpu())
        return torch.zeros(slots).index_add_(0, torch.tensor(slot_of), torch.cat(pieces))

    def _branch_inputs(self, group: list[Row], height: int, width: int) -> dict[str, torch.Tensor]:
        """The 4D attention mask (additive: 0 where a token may look, the dtype's minimum where not)
        and position ids of a pass holding packed rows: causal within the prompt, each branch sees
        the prompt and itself, at positions counted on from the prompt's end; every other row is
        plainly causal. Padding looks at the first token only (a fully masked row can turn NaN)."""
        allowed = torch.zeros((height, width, width), dtype=torch.bool)
        allowed[:, :, 0] = True
        position_ids = torch.zeros((height, width), dtype=torch.long)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        for r, row in enumerate(group):
            n = len(row.ids)
            prompt = row.branches[0] if row.branches else n
            allowed[r, :n, :prompt] = causal[:n, :prompt]
            position_ids[r, :prompt] = torch.arange(prompt)
            for start, end in zip(row.branches, (*row.branches[1:], n)):  # (none for a plain row)
                allowed[r, start:end, start:end] = causal[: end - start, : end - start]
                position_ids[r, start:end] = torch.arange(prompt, prompt + end - start)
        dtype = self.model.get_input_embeddings().weight.dtype  # what the attention computes in
        mask = torch.zeros((height, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        return {"attention_mask": mask, "position_ids": position_ids}

    def _label_logprobs(self, queries: list[tuple[list[int], list[list[int]]]]) -> list[torch.Tensor]:
        """log P(label | prompt) for every label of every (prompt_ids, label_ids) query, in one forward."""
        rows: list[Row] = []
        slot = 0
        for prompt, labels in queries:
            rows += self._direct_rows(prompt, labels, slot)
            slot += len(labels)
        return list(self._score(rows, slot).split([len(labels) for _, labels in queries]))

    def _label_prior(self, template: str | None, labels: list[str], label_ids: list[list[int]],
                     shots: Shots = NO_SHOTS) -> torch.Tensor:
        """Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the model's label
        log-probs for the calibration texts (``classification_calibration``: neutral sentences or
        content-free strings), averaged, cached per (mode, template, labels, descriptions).

        Small and quantized models carry a strong prior for some label words whatever the text
        says; dividing it out measured 85 % -> 93 % (4-bit) and 97 % -> 95 % (float) on the
        built-in sentiment set (docs/quantization.md).
        """
        mode = self.config.classification_calibration
        key = (mode, template, tuple(labels), shots)
        prior = self._priors.get(key)
        if prior is None:  # with descriptions: measured on the same prompt, descriptions included
            queries = [(self.preparer.classify_ids(text, labels, template, shots), label_ids)
                       for text in CALIBRATION_TEXTS[mode]]
            prior = torch.stack(self._label_logprobs(queries)).mean(dim=0)
            if len(self._priors) >= 1024:
                self._priors.pop(next(iter(self._priors)))
            self._priors[key] = prior
        return prior

    def classify(self, items: list[PreparedClassify]) -> list[Answer]:
        with self.model_lock:  # the decoder is called directly here, not through the hooked forward
            return self._classify(items)

    @contextmanager
    def remembering_scores(self) -> Iterator[None]:
        """Within it, a request's LM scores (its direct, channel and plain rows) are kept by their
        token ids and not computed again. For a run that scores the same texts under the same labels
        more than once: prepare's gate classifies each family zero-shot and then with examples,
        whose LM prompts are the same (examples go to the encoder and the calibration, which scores
        the example texts themselves zero-shot). Not for serving: a benchmark that repeats its texts
        would measure the memo, and batch-mates would stop being checked against each other."""
        self._remembered = {}
        try:
            yield
        finally:
            self._remembered = None

    @staticmethod
    def _lm_slots(item: PreparedClassify) -> dict[str, slice]:
        """Where each expert's scores sit among a request's LM slots: direct, then channel and
        plain where the method has them, one slot per label each. The one place the layout is
        written: the rows are laid out by it and the scores read back by it."""
        names = ["direct"] + ["channel"] * (item.channel is not None) + ["plain"] * (item.plain is not None)
        n = len(item.label_ids)
        return {name: slice(index * n, (index + 1) * n) for index, name in enumerate(names)}

    def _lm_rows(self, item: PreparedClassify, first_slot: int) -> list[Row]:
        """A request's LM rows, laid out as ``_lm_slots`` says from ``first_slot``."""
        slots = self._lm_slots(item)
        rows = self._direct_rows(item.prompt_ids, item.label_ids, first_slot + slots["direct"].start)
        if item.channel is not None:
            rows += self._channel_rows(item.channel, first_slot + slots["channel"].start)
        if item.plain is not None:
            rows += self._direct_rows(item.plain.prompt_ids, item.plain.label_ids, first_slot + slots["plain"].start)
        return rows

    @staticmethod
    def _lm_key(item: PreparedClassify) -> tuple:
        """Everything a request's LM rows are made of: equal keys, equal rows."""
        channel = None if item.channel is None else (tuple(item.channel.text_ids), tuple(map(tuple, item.channel.prefix_ids)))
        plain = None if item.plain is None else (tuple(item.plain.prompt_ids), tuple(map(tuple, item.plain.label_ids)))
        return tuple(item.prompt_ids), tuple(map(tuple, item.label_ids)), channel, plain

    def _lm_scores(self, items: list[PreparedClassify]) -> list[torch.Tensor]:
        """Per request, the summed log-probabilities of its LM rows' slots (direct, channel,
        plain), from one ``_score`` call for the whole batch (within ``remembering_scores``: for
        the requests not scored before)."""
        remembered = self._remembered
        keys = [self._lm_key(item) for item in items] if remembered is not None else list(range(len(items)))
        todo: dict[Any, PreparedClassify] = {}
        for key, item in zip(keys, items, strict=True):
            if (remembered is None or key not in remembered) and key not in todo:
                todo[key] = item
        found: dict[Any, torch.Tensor] = {}
        if todo:
            rows: list[Row] = []
            spans: list[tuple[Any, int, int]] = []
            slot = 0
            for key, item in todo.items():
                width = max(span.stop for span in self._lm_slots(item).values())
                rows += self._lm_rows(item, slot)
                spans.append((key, slot, slot + width))
                slot += width
            per_slot = self._score(rows, slot)
            found = {key: per_slot[start:end] for key, start, end in spans}
            if remembered is not None:
                remembered.update(found)
        return [found[key] if key in found else remembered[key] for key in keys]  # type: ignore[index]

    def _expert_scores(self, items: list[PreparedClassify]) -> list[dict[str, torch.Tensor]]:
        """Per request, each expert's log-probabilities normalised over its labels, from one
        forward pass for the whole batch: ``direct`` (the label as the chat answer, or after the
        caller's template; calibrated unless the model says not), and with the default method
        ``channel`` (log P(text | "The following message is <label>:")) and ``plain`` (the label
        after the plain prompt, calibrated). bench/probes/experts.py weighs them offline."""
        calibrate = self.config.classification_calibration != "none"
        found = []
        for item, per_slot in zip(items, self._lm_scores(items), strict=True):
            slots = self._lm_slots(item)
            labels = item.request.labels
            shots = Shots(descriptions=descriptions_of(item.request))  # the prompt's own (examples: below)
            scores = per_slot[slots["direct"]]
            if calibrate:
                scores = scores - self._label_prior(item.template, labels, item.label_ids, shots)
            experts = {"direct": scores.log_softmax(dim=0)}
            if "channel" in slots:
                experts["channel"] = per_slot[slots["channel"]].log_softmax(dim=0)
            if "plain" in slots:
                plain_scores = per_slot[slots["plain"]]
                if calibrate:
                    plain_scores = plain_scores - self._label_prior(item.plain.template, labels, item.plain.label_ids, shots)  # type: ignore[union-attr]
                experts["plain"] = plain_scores.log_softmax(dim=0)
            found.append(experts)
        self._encoder_experts(items, found)
        # The LM's own prototype expert: skipped at weight 0 (with an encoder, the default), one pass saved.
        with_examples = [(experts, item.examples) for experts, item in zip(found, items, strict=True)
                         if item.examples and self.config.classification_examples_weight > 0]
        if with_examples:
            texts = self._embed([examples.text_ids for _, examples in with_examples])
            for (experts, examples), text in zip(with_examples, texts, strict=True):
                experts["examples"] = self._prototype_scores(text, examples, len(experts["direct"]))
        return found

    def _encode(self, sequences: list[list[int]]) -> torch.Tensor:
        """The sentence encoder's embeddings (mean of its last hidden states over real tokens, unit
        length: how all-MiniLM-style encoders are pooled), one padded pass per call."""
        assert self.encoder is not None
        width = max(map(len, sequences))
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for r, ids in enumerate(sequences):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
        hidden = self.encoder(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).last_hidden_state
        mask = attention.to(hidden.device).unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden.float() * mask).sum(dim=1) / mask.sum(dim=1), dim=1).cpu()

    def _encoded_set(self, sequences: list[list[int]]) -> torch.Tensor:
        """Embeddings of a set that recurs across requests (a label set's phrases, an example set),
        cached: a caller who sends the same labels or examples pays for them once."""
        key = tuple(map(tuple, sequences))
        found = self._encoded_cache.get(key)
        if found is None:
            found = self._encode(sequences)
            if len(self._encoded_cache) >= 1024:
                self._encoded_cache.pop(next(iter(self._encoded_cache)))
            self._encoded_cache[key] = found
        return found

    def _encoder_experts(self, items: list[PreparedClassify], found: list[dict[str, torch.Tensor]]) -> None:
        """The sentence encoder's experts, added to each request's ``found``: ``encoder`` (the text's
        cosine to each label's phrase) and, with examples, ``encoder_examples`` (its cosine to each
        label's mean example, both centred on the examples' mean; a label without examples gets the
        mean of the others' cosines). Log-softmax at the encoder's ``temperature``."""
        encoder = self.config.classification_encoder
        encoded = [(experts, item.encoded) for experts, item in zip(found, items, strict=True) if item.encoded]
        if encoder is None or self.encoder is None or not encoded:
            return
        texts = self._encode([e.text_ids for _, e in encoded])
        for (experts, e), text in zip(encoded, texts, strict=True):
            labels = len(experts["direct"])
            if e.phrase_ids:
                cosine = self._encoded_set(e.phrase_ids) @ text
                experts["encoder"] = (cosine / encoder.temperature).log_softmax(dim=0)
            if e.example_ids:
                shown = self._encoded_set(e.example_ids)
                index = torch.tensor(e.labels)
                centre, means = _label_means(shown, index, range(labels))
                cosine = means @ torch.nn.functional.normalize(text - centre, dim=0)
                present = torch.zeros(labels, dtype=torch.bool)
                present[index] = True
                cosine = torch.where(present, cosine, cosine[present].mean())
                experts["encoder_examples"] = (cosine / encoder.temperature).log_softmax(dim=0)

    def _embed(self, sequences: list[list[int]]) -> torch.Tensor:
        """Each sequence's final hidden states (after the model's last norm), averaged over its
        tokens: the text's representation the prototype expert compares. Right-padded passes of at
        most MAX_FORWARD_TOKENS padded tokens."""
        means = []
        for group in _groups([Row(ids, []) for ids in sequences], MAX_FORWARD_TOKENS):
            width = max(len(row.ids) for row in group)
            input_ids = torch.full((len(group), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for r, row in enumerate(group):
                input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
                attention[r, : len(row.ids)] = 1
            hidden = self.model.get_decoder()(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
            ).last_hidden_state.float()
            mask = attention.to(hidden.device).unsqueeze(-1).float()
            means.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).cpu())
        return torch.cat(means)

    def _prototypes(self, examples: Examples, labels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The examples' centre, each label's mean example (centred, unit length) and how well those
        separate the examples (``_separation``); cached per example set (a named set, or a caller who
        sends the same examples, pays for them once)."""
        key = (tuple(map(tuple, examples.example_ids)), tuple(examples.labels), labels)
        cached = self._example_cache.get(key)
        if cached is None:
            embedded = self._embed(examples.example_ids)
            index = torch.tensor(examples.labels)
            centre, means = _label_means(embedded, index, range(labels))
            cached = (centre, means, self._separation(embedded, index, labels))
            if len(self._example_cache) >= 256:
                self._example_cache.pop(next(iter(self._example_cache)))
            self._example_cache[key] = cached
        return cached

    @staticmethod
    def _separation(embedded: torch.Tensor, index: torch.Tensor, labels: int) -> float:
        """How well the examples' own prototypes tell them apart, 0 (chance) to 1: each example
        classified by the prototypes of the others (leave one out). Where the model's representation
        does not separate the labels (sentiment: the mean hidden state says what a text is about more
        than how it feels), the expert's vote counts for that much less."""
        right, counted = 0, 0
        for held in range(len(index)):
            keep = torch.arange(len(index)) != held
            rest, rest_index = embedded[keep], index[keep]
            present = [label for label in range(labels) if (rest_index == label).any()]
            if index[held].item() not in present or len(present) < 2:
                continue
            centre, means = _label_means(rest, rest_index, present)
            guess = present[int((means @ torch.nn.functional.normalize(embedded[held] - centre, dim=0)).argmax())]
            right, counted = right + (guess == index[held].item()), counted + 1
        if not counted:
            return 0.0
        chance = 1 / max(2, len(set(index.tolist())))
        return max(0.0, (right / counted - chance) / (1 - chance))

    def _prototype_scores(self, text: torch.Tensor, examples: Examples, labels: int) -> torch.Tensor:
        """The prototype expert: cosine of the text to each label's mean example (both centred on
        the examples' mean), as log-probabilities at ``classification_examples_temperature``. A
        label with no example gets no say: its cosine is the mean of the others'."""
        centre, prototypes, separation = self._prototypes(examples, labels)
        cosine = prototypes @ torch.nn.functional.normalize(text - centre, dim=0)
        shown = torch.zeros(labels, dtype=torch.bool)
        shown[torch.tensor(examples.labels)] = True
        cosine = torch.where(shown, cosine, cosine[shown].mean())
        return separation * (cosine / self.config.classification_examples_temperature).log_softmax(dim=0)

    ZERO_SHOT_EXPERTS = ("direct", "channel", "plain", "encoder")

    def _examples_prior(self, item: PreparedClassify) -> dict[str, torch.Tensor]:
        """Each zero-shot expert's mean score over the request's examples, cached per (example set,
        labels, descriptions, template): batch calibration on the caller's own texts. Balanced
        examples from the caller's domain show the bias the experts have *there*, which neutral
        sentences cannot (on emotions, support tickets and intents it moved selection accuracy most).
        An example too long to classify on its own is left out of the mean."""
        shots = shots_for(item.request, self.config)
        key = (item.template, tuple(item.request.labels), shots)
        prior = self._example_priors.get(key)
        if prior is None:
            prepared = []
            for text, _ in shots.examples:
                plain = item.request.model_copy(update={"text": text, "examples": None, "example_set": None})
                try:
                    prepared.append(self.preparer.prepare(plain))
                except FleetError:
                    continue
            scored = self._expert_scores(prepared) if prepared else []  # type: ignore[arg-type]
            prior = {name: torch.stack([experts[name] for experts in scored]).mean(dim=0)
                     for name in self.ZERO_SHOT_EXPERTS if scored and name in scored[0]}
            if len(self._example_priors) >= 256:
                self._example_priors.pop(next(iter(self._example_priors)))
            self._example_priors[key] = prior
        return prior

    @torch.inference_mode()
    def _classify(self, items: list[PreparedClassify]) -> list[Answer]:
        """Score every (request, label) pair in one forward pass; probabilities per label.

        A template request is its direct score alone; the default method weighs its experts
        (``classification_weights``) and adds them: a product of experts. A request with examples
        adds the prototype expert (``classification_examples_weight``) to either. A model with a
        sentence encoder adds its zero-shot expert to the default method and its prototype expert
        to a request with examples (``classification_encoder`` weights). With examples, every
        zero-shot expert is calibrated on them (``classification_calibrate_on_examples``).
        """
        weights = self.config.classification_weights
        answers = []
        for item, experts in zip(items, self._expert_scores(items), strict=True):
            labels = item.request.labels
            if self.config.classification_calibrate_on_examples and (item.examples or item.encoded and item.encoded.example_ids):
                for name, prior in self._examples_prior(item).items():
                    experts[name] = experts[name] - prior
            combined = experts["direct"]
            if "channel" in experts or "plain" in experts:  # the default method: weighted experts
                combined = combined * weights.chat
                for name in ("channel", "plain"):
                    if name in experts:
                        combined = combined + getattr(weights, name) * experts[name]
            if "examples" in experts:
                combined = combined + self.config.classification_examples_weight * experts["examples"]
            encoder = self.config.classification_encoder
            if encoder is not None:
                combined = combined + encoder.weight * experts.get("encoder", 0) + encoder.examples_weight * experts.get(
                    "encoder_examples", 0)
            probs = combined.softmax(dim=0).tolist()
            best = max(range(len(labels)), key=probs.__getitem__)
            answers.append(
                Answer(
                    ClassifyOutput(label=labels[best], scores=dict(zip(labels, probs, strict=True))),
                    Usage(prompt_tokens=item.prompt_tokens, completion_tokens=0),
                )
            )
        return answers

    def run(self, items: list[Prepared]) -> list[Answer]:
        """Run one homogeneous batch (all generate or all classify)."""
        if isinstance(items[0], PreparedGenerate):
            return self.generate(items)  # type: ignore[arg-type]
        return self.classify(items)  # type: ignore[arg-type]
