"""The llama_cpp backend's batch side (its engine): a GGUF file run by llama.cpp (llama-cpp-python's low-level
API), with the transformers backend's classification method and continuous batching of its own.

Why reuse the transformers ``Engine``: a label's log-probability is the only thing the default
classification method asks of the LM (``_score``); experts, calibration, the sentence encoder and
examples are the same code, so both backends answer by one method. What differs is how tokens go
through the model: here each scored row is a llama.cpp sequence, and many rows are one
``llama_decode`` call with logits read only where a label token is scored.

Two contexts share the weights: one for generation (``Slots``: rows join and leave at any step)
and one for scoring (cleared per batch), so a classification batch never disturbs running rows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import ContinuousConfig, ModelConfig
from shared.errors import ErrorCode, FleetError
from workers.backends.llama_cpp.slots import SlotOutput, Slots
from workers.backends.llama_cpp.tokens import TokenBatch
from workers.backends.transformers.batch_side import Engine, Row
from workers.backends.transformers.request_side import Preparer
from workers.wire import Answer, PreparedGenerate

log = logging.getLogger(__name__)
# Scored positions per scoring decode: the logits buffer holds this many x vocab floats.
SCORE_OUTPUTS = 512


def import_llama() -> Any:
    """llama-cpp-python, or MODEL_UNAVAILABLE saying how to install it (an optional extra)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise FleetError(ErrorCode.MODEL_UNAVAILABLE, "the llama_cpp backend needs llama-cpp-python: "
                         "`pip install '.[llama-cpp]'` (or `make setup LLAMA_CPP=1`)") from exc
    return llama_cpp


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaEngine(Engine):
    """A GGUF model on llama.cpp, answering as the transformers ``Engine`` does."""

    #: sampled requests are continuously batched too (``Slots`` samples per row)
    samples_per_row = True
    #: a prompt's multi-token labels are one packed row (Row.branches): the prompt's tokens belong
    #: to one sequence per branch, so llama.cpp reads them once for all its labels.
    packs_labels = True

    def __init__(self, config: ModelConfig, gguf: Path, tokenizer_path: Path, options: Any,
                 continuous: ContinuousConfig) -> None:
        # No Engine.__init__: it loads a torch model. What the shared methods read is set here.
        llama = self.llama = import_llama()
        started = time.perf_counter()
        self.config, self.path, self.widths = config, gguf, []
        self.device, self.dtype = torch.device("cpu"), torch.float32
        if config.classification_examples_weight > 0:
            raise FleetError(ErrorCode.INVALID_INPUT, f"model {config.name}: classification_examples_weight > 0 reads "
                             "the LM's hidden states, which the llama_cpp backend does not expose; set it to 0")
        self.preparer = Preparer(config, tokenizer_path)
        self.tokenizer = self.preparer.tokenizer
        self.context = self.preparer.context
        llama.llama_backend_init()
        if not options.log:
            llama.llama_log_set(_QUIET, None)
        threads = options.threads or cpu_threads()
        params = llama.llama_model_default_params()
        from llama_cpp import _internals

        self._model = _internals.LlamaModel(path_model=str(gguf), params=params, verbose=False)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model.model))
        rows = continuous.max_rows + continuous.interactive_reserve
        kv = max(options.kv_tokens, self.context)
        self.flash_attn = options.flash_attn
        self._generation = self._context(_internals, kv, options.step_tokens, rows, threads)
        self._scoring = self._context(_internals, options.score_tokens, options.score_tokens, options.score_rows, threads)
        self.score_rows, self.score_tokens = options.score_rows, options.score_tokens
        self.score_chunk = min(options.score_chunk_tokens, options.score_tokens)
        self._score_batch = TokenBatch(llama, options.score_tokens, options.score_rows)
        self.slots = Slots(llama, self._generation, self.n_vocab, rows, kv, options.step_tokens)
        self.model_lock = threading.RLock()
        self._classification_state()
        self.kernels: set[str] = set()
        self.stop_token_ids = self._stop_token_ids()
        self._warm_up()
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s from %s on llama.cpp (%d threads, %d rows, %d KV cells) in %.1fs", config.name, gguf.name,
                 threads, rows, kv, self.load_seconds)

    def _context(self, internals: Any, cells: int, batch: int, sequences: int, threads: int) -> Any:
        params = self.llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = cells, batch, min(batch, 512)
        params.n_seq_max, params.kv_unified = sequences, True
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (self.llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else self.llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        return internals.LlamaContext(model=self._model, params=params, verbose=False)

    def _stop_token_ids(self) -> list[int]:
        vocab = self.llama.llama_model_get_vocab(self._model.model)
        ids = {self.tokenizer.eos_token_id, self.llama.llama_vocab_eos(vocab), self.llama.llama_vocab_eot(vocab)}
        return sorted(i for i in ids if i is not None and i >= 0)

    def _warm_up(self) -> None:
        self._score([Row(self.tokenizer("Hello")["input_ids"], [(0, 0, 0)])], 1)

    # -- generation ------------------------------------------------------------------------------
    def continuous_batches(self, config: ContinuousConfig) -> tuple[Slots, Slots]:
        """The engine core's continuous batching drives ``Slots`` as manager and stepper in one."""
        return self.slots, self.slots

    def generate(self, items: list[PreparedGenerate], streamer: Any = None) -> list[Answer]:
        """A static batch: its rows join the slots (beside any continuous rows) and are stepped until
        all have finished; continuous rows' outputs stay queued for their generator."""
        found: dict[int, SlotOutput] = {}
        with self.model_lock:
            for index, item in enumerate(items):
                request = item.request
                self.slots.add_request(item.input_ids, f"static-{uuid.uuid4().hex}", request.max_new_tokens,
                                       eos_token_id=self.stop_token_ids, temperature=request.temperature,
                                       top_p=request.top_p, sink=lambda out, i=index: found.__setitem__(i, out))
            while len(found) < len(items):
                self.slots.run()
        for output in found.values():
            if output.error is not None:
                raise FleetError(ErrorCode.PROMPT_TOO_LONG, output.error)
        return [self.decode_row(item, found[index].generated_tokens) for index, item in enumerate(items)]

    # -- classification --------------------------------------------------------------------------
    def _score(self, rows: list[Row], slots: int) -> torch.Tensor:
        """Sum the log-probabilities of every row's (position, target) pairs into their slots.

        Rows go as sequences of one decode (a packed row as one sequence per branch, sharing its
        prompt's tokens), as many as fit ``score_rows`` sequences,
        ``score_chunk`` tokens (one longer row alone, up to ``score_tokens``) and SCORE_OUTPUTS
        read positions; logits are read only at scored positions (a position scored for several
        labels is read once). Between two decodes the engine core may run interactive generation
        (``between_chunks``)."""
        ctx = self._scoring
        total = torch.zeros(slots, dtype=torch.float64)
        batch = self._score_batch
        start = 0
        while start < len(rows):
            group, tokens, outputs, seqs = [], 0, 0, 0
            while start < len(rows):
                ids, scored, branches = rows[start]
                wanted = len({position for position, _, _ in scored}) or 1
                needs = max(1, len(branches))
                if group and (seqs + needs > self.score_rows or tokens + len(ids) > self.score_chunk
                              or outputs + wanted > SCORE_OUTPUTS):
                    break
                if len(ids) > self.score_tokens or needs > self.score_rows:
                    raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"a scored row of {len(ids)} tokens and {needs} "
                                     f"labels is over the llama_cpp backend's score_tokens ({self.score_tokens}) "
                                     f"or score_rows ({self.score_rows})")
                group.append(rows[start])
                tokens, outputs, seqs, start = tokens + len(ids), outputs + wanted, seqs + needs, start + 1
            self._score_group(batch, ctx, group, total)
            if self.between_chunks is not None and start < len(rows):
                self.between_chunks()
        return total.float()

    def _score_group(self, batch: TokenBatch, ctx: Any, group: list[Row], total: torch.Tensor) -> None:
        llama = self.llama
        llama.llama_memory_clear(ctx.memory, True)
        batch.clear()
        read: list[tuple[int, int]] = []  # (row, position) in output order
        first_seq = 0
        for row, (ids, scored, branches) in enumerate(group):
            positions = sorted({position for position, _, _ in scored})
            outputs = np.zeros(len(ids), dtype=np.int8)
            outputs[positions] = 1
            if not branches:
                batch.add(ids, 0, first_seq, outputs)
                first_seq += 1
            else:  # the prompt in every branch's sequence, then each branch in its own, after the prompt
                prompt = branches[0]
                batch.add(ids[:prompt], 0, list(range(first_seq, first_seq + len(branches))), outputs[:prompt])
                for begin, end in zip(branches, (*branches[1:], len(ids))):
                    batch.add(ids[begin:end], prompt, first_seq, outputs[begin:end])
                    first_seq += 1
            read += [(row, position) for position in positions]
        code = batch.decode(llama, ctx.ctx)
        if code != 0:
            raise FleetError(ErrorCode.INTERNAL, f"llama_decode returned {code} scoring {len(group)} rows ({batch.count} tokens)")
        if not read:
            return
        logits = torch.from_numpy(np.ctypeslib.as_array(llama.llama_get_logits(ctx.ctx), shape=(len(read), self.n_vocab)))
        where = {key: index for index, key in enumerate(read)}
        index, target, slot = zip(*((where[(row, p)], t, s) for row, (_, scored, _) in enumerate(group) for p, t, s in scored),
                                  strict=True)
        picked = logits[list(index)].double()
        scores = picked.gather(1, torch.tensor(target)[:, None]).squeeze(1) - picked.logsumexp(dim=-1)
        total.index_add_(0, torch.tensor(slot), scores)

    def _embed(self, sequences: list[list[int]]) -> torch.Tensor:
        raise FleetError(ErrorCode.INVALID_INPUT, "the llama_cpp backend has no LM prototype expert "
                         "(classification_examples_weight must be 0)")

    def close(self) -> None:
        self.slots.close()


def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log callback: only errors reach the worker's log (loading prints hundreds of lines)."""
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (5 continues the previous line: progress dots)
        log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())


def _callback() -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_log_callback(_quiet)


_QUIET = _callback()
