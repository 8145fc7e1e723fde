"""Continuous batching on llama.cpp: every running request is a llama.cpp sequence, and one
``llama_decode`` call per step feeds them all (each decoding row's last token, and prompt chunks of
rows that joined) - the scheme of llama.cpp's own server (parallel slots, continuous batching).

``Slots`` speaks the two halves of the interface the engine core's continuous batching drives
(workers/core/continuous.py): the manager's (``add_request``, ``cancel_request``, ``get_result``)
and the stepper's (``run`` one step, ``failed``, ``close``). Unlike transformers' manager it samples
per row (temperature, top-p), so sampled requests are continuously batched too.

KV cells are reserved at admission (prompt + max_new_tokens of each row, in one unified cache), so
a running row never finds the cache full mid-answer; a row waits here until its cells are free.

**Prompt prefixes are read once** (llama.cpp's server does the same: ``cache_prompt``): a sequence
that finishes keeps its tokens in the cache, and a joining row starts from the longest prefix it
shares with any kept or running sequence - its own sequence's cache cut where they part, or
another's cells shared into it (``llama_memory_seq_cp``: in a unified cache a cell may belong to
several sequences). Chat prompts share their template's system turn, so most of a prompt is
already in the cache; kept caches are dropped, least recently used first, when a row needs their
cells.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.backends.llama_cpp.tokens import TokenBatch

log = logging.getLogger(__name__)


@dataclass
class SlotOutput:
    """What a step produced for one request: every token generated so far (the manager's format)."""

    request_id: str
    generated_tokens: list[int]
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    streaming: bool
    temperature: float
    top_p: float
    stop_ids: frozenset[int]
    sink: Callable[[SlotOutput], None] | None
    seq_id: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None

    @property
    def cells(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def in_cache(self) -> list[int]:
        """The tokens whose KV this sequence holds (a sampled token is in the cache once fed)."""
        if self.fed < len(self.prompt):
            return self.prompt[: self.fed]
        return self.prompt + self.generated[:-1]


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top-p), then a draw."""
    if temperature == 0 or rng is None:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order]
        keep = order[(np.cumsum(ranked) - ranked) < top_p]  # the smallest set reaching top_p (>= 1 token)
        kept = probs[keep]
        return int(rng.choice(keep, p=kept / kept.sum()))
    return int(rng.choice(len(probs), p=probs))


class Slots:
    """Requests decoded together on one llama.cpp context (``context``: llama-cpp-python's
    ``LlamaContext``), at most ``sequences`` at once and ``kv_tokens`` KV cells in all; a step feeds
    at most ``step_tokens`` tokens (decoding rows first, then prompt chunks)."""

    def __init__(self, llama: Any, context: Any, n_vocab: int, sequences: int, kv_tokens: int, step_tokens: int) -> None:
        self.llama = llama  # the llama_cpp module (imported by the engine, an optional dependency)
        self.context = context
        self.n_vocab = n_vocab
        self.kv_tokens = kv_tokens
        self.step_tokens = step_tokens
        self._batch = TokenBatch(llama, step_tokens)
        # Free sequences, least recently used first, each with the tokens its cache still holds.
        self._idle: dict[int, list[int]] = {seq_id: [] for seq_id in range(sequences)}
        self._kept = 0  # cells the idle sequences' caches hold
        #: prompt tokens joining rows found in the cache instead of decoding them
        self.reused_tokens = 0
        self._pending: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}
        self._results: deque[SlotOutput] = deque()
        self._reserved = 0
        self.failed: Exception | None = None
        self._logits_at: tuple[int | None, int] = (None, 0)  # (address, rows) of the view below
        self._logits_view = np.zeros((0, n_vocab), dtype=np.float32)

    # -- the manager's half ----------------------------------------------------------------------
    def add_request(self, input_ids: list[int], request_id: str, max_new_tokens: int, streaming: bool = False,
                    eos_token_id: list[int] | int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                    sink: Callable[[SlotOutput], None] | None = None) -> None:
        """Queue a request; ``sink`` (else ``get_result``) receives its outputs."""
        stops = eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id]
        seq = _Seq(request_id, list(input_ids), max_new_tokens, streaming, temperature, top_p, frozenset(stops), sink,
                   rng=np.random.default_rng() if temperature > 0 else None)
        if seq.cells > self.kv_tokens:
            self._emit(seq, SlotOutput(request_id, [], True, f"prompt + max_new_tokens = {seq.cells} tokens, over the "
                                                             f"{self.kv_tokens} KV cells of this context"))
            return
        self._pending.append(seq)

    def cancel_request(self, request_id: str) -> None:
        """The request leaves now (its cells freed); it gets no further output."""
        seq = self._running.pop(request_id, None)
        if seq is not None:
            self._release(seq)
            return
        self._pending = deque(s for s in self._pending if s.request_id != request_id)

    def get_result(self, timeout: float = 0) -> SlotOutput | None:
        return self._results.popleft() if self._results else None

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._running)

    # -- the stepper's half ----------------------------------------------------------------------
    def run(self) -> None:
        """One step; an exception is kept in ``failed`` (the caller sends later rows elsewhere) and raised."""
        try:
            self._step()
        except Exception as exc:
            self.failed = exc
            raise

    def close(self) -> None:
        for seq in list(self._running.values()):
            self._release(seq)
        self._running.clear()
        self._pending.clear()
        for seq_id in self._idle:
            self._forget(seq_id)

    # -- internals -------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._pending and self._idle and self._reserved + self._pending[0].cells <= self.kv_tokens:
            seq = self._pending[0]
            seq_id, source, common = self._choose(seq.prompt)
            # Other kept caches give way, least recently used first, until the row fits: its own
            # sequence's cache becomes part of its reservation, and the loop's condition says the
            # running rows' reservations leave room, so once they are all gone it fits.
            for other in [i for i, cache in self._idle.items() if cache and i != seq_id]:
                if self._reserved + self._kept - len(self._idle[seq_id]) + seq.cells <= self.kv_tokens:
                    break
                self._forget(other)
            self._pending.popleft()
            cache = self._idle.pop(seq_id)
            self._kept -= len(cache)
            memory = self.context.memory
            if source == seq_id:
                if len(cache) > common and not self.llama.llama_memory_seq_rm(memory, seq_id, common, -1):
                    self.llama.llama_memory_seq_rm(memory, seq_id, -1, -1)  # cannot cut it: read it all again
                    common = 0
            else:
                if cache:
                    self.llama.llama_memory_seq_rm(memory, seq_id, -1, -1)
                self.llama.llama_memory_seq_cp(memory, source, seq_id, 0, common)
            seq.seq_id, seq.fed = seq_id, common
            self.reused_tokens += common
            self._reserved += seq.cells
            self._running[seq.request_id] = seq

    def _choose(self, prompt: list[int]) -> tuple[int, int, int]:
        """(sequence for the row, sequence whose cache it starts from, tokens shared). At least the
        prompt's last token is decoded again: its logits give the first new token."""
        limit = len(prompt) - 1
        best, source = 0, -1
        for seq_id, cache in self._idle.items():
            if cache and (n := min(shared_prefix(cache, prompt), limit)) > best:
                best, source = n, seq_id
        for running in self._running.values():
            if (n := min(shared_prefix(running.in_cache, prompt), limit)) > best:
                best, source = n, running.seq_id
        if source in self._idle:
            return source, source, best
        empty = next((i for i, cache in self._idle.items() if not cache), None)
        seq_id = empty if empty is not None else next(iter(self._idle))  # else the least recently used
        return seq_id, (source if best else seq_id), best

    def _forget(self, seq_id: int) -> None:
        """Drop an idle sequence's kept cache."""
        cache = self._idle[seq_id]
        if cache:
            self.llama.llama_memory_seq_rm(self.context.memory, seq_id, -1, -1)
            self._kept -= len(cache)
            self._idle[seq_id] = []

    def _step(self) -> None:
        self._admit()
        if not self._running:
            return
        batch = self._batch
        batch.clear()
        reading: list[_Seq] = []  # rows whose logits this step produces, in batch order
        for seq in self._running.values():  # decoding rows: one token each
            if seq.fed == len(seq.prompt):
                batch.add_one(seq.generated[-1], len(seq.prompt) + len(seq.generated) - 1, seq.seq_id, True)
                reading.append(seq)
        for seq in self._running.values():  # rows still reading their prompt: chunks of what is left
            left = self.step_tokens - batch.count
            if left <= 0:
                break
            if seq.fed == len(seq.prompt):
                continue
            take = min(left, len(seq.prompt) - seq.fed)
            start = batch.add(seq.prompt[seq.fed : seq.fed + take], seq.fed, seq.seq_id)
            seq.fed += take
            if seq.fed == len(seq.prompt):
                batch.output[start + take - 1] = 1
                reading.append(seq)
        code = batch.decode(self.llama, self.context.ctx)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} for {batch.count} tokens of {len(self._running)} rows")
        if not reading:
            return
        for row, seq in zip(self._logits(len(reading)), reading, strict=True):
            token = sample(row, seq.temperature, seq.top_p, seq.rng)
            seq.generated.append(token)
            if token in seq.stop_ids or len(seq.generated) >= seq.max_new_tokens:
                del self._running[seq.request_id]
                self._release(seq)
                self._emit(seq, SlotOutput(seq.request_id, list(seq.generated), True))
            elif seq.streaming:
                self._emit(seq, SlotOutput(seq.request_id, list(seq.generated)))

    def _logits(self, rows: int) -> np.ndarray:
        """The step's logits, ``rows`` x vocabulary, read in place. The view is kept while llama.cpp's
        output buffer stays where it was (it moves only when a step asks for more rows than any
        before): building one cost tens of microseconds between two decodes."""
        pointer = self.llama.llama_get_logits(self.context.ctx)
        at = (ctypes.cast(pointer, ctypes.c_void_p).value, rows)
        if at != self._logits_at:
            self._logits_view = np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))
            self._logits_at = at
        return self._logits_view

    def _release(self, seq: _Seq) -> None:
        """The row's sequence goes idle, its cache kept for a later row's prefix (none after a
        failed decode: what it holds is not known)."""
        cache = [] if self.failed is not None else seq.in_cache
        if not cache:
            self.llama.llama_memory_seq_rm(self.context.memory, seq.seq_id, -1, -1)
        self._idle[seq.seq_id] = cache  # the most recently used last
        self._kept += len(cache)
        self._reserved -= seq.cells

    def _emit(self, seq: _Seq, output: SlotOutput) -> None:
        (seq.sink or self._results.append)(output)
