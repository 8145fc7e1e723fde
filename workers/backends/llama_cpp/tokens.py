"""A ``llama_batch`` whose arrays are numpy arrays this process owns.

Why not ``llama_batch_init``: its per-token sequence ids are separate heap cells reachable only
through a pointer per token, so filling a batch of thousands of prompt tokens cost a Python loop
of ctypes stores per token. Here each token's ``seq_id`` pointer is set once, to its row of one
numpy array (``max_seqs`` ids: a token may belong to several sequences, as a prompt shared by
several continuations does), and a batch is filled with slice assignments. llama.cpp only reads the struct during
``llama_decode``; nothing here is freed by it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class TokenBatch:
    def __init__(self, llama: Any, capacity: int, max_seqs: int = 1) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros((capacity, max_seqs), dtype=np.int32)
        self.output = np.zeros(capacity, dtype=np.int8)
        self._counts = np.ones(capacity, dtype=np.int32)
        int_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (int_p * capacity)(*(ctypes.cast(base + 4 * max_seqs * i, int_p) for i in range(capacity)))
        self.struct = llama.llama_batch()
        self.struct.token = self.token.ctypes.data_as(int_p)
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(int_p)
        self.struct.n_seq_id = self._counts.ctypes.data_as(int_p)
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(int_p))
        self.struct.logits = self.output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.count = 0

    def clear(self) -> None:
        self.count = 0

    def add(self, tokens: list[int] | np.ndarray, first_position: int, seq: int | list[int],
            outputs: np.ndarray | bool = False) -> int:
        """Append ``tokens`` of sequence ``seq`` (or of each of several) at positions from
        ``first_position``; ``outputs`` marks which of them have their logits read. Returns the
        index of the first."""
        start, end = self.count, self.count + len(tokens)
        if end > self.capacity:
            raise ValueError(f"{end} tokens in a batch of {self.capacity}")
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(first_position, first_position + len(tokens))
        seqs = [seq] if isinstance(seq, int) else seq
        self.seq[start:end, : len(seqs)] = seqs
        self._counts[start:end] = len(seqs)
        self.output[start:end] = outputs
        self.count = end
        return start

    def add_one(self, token: int, position: int, seq: int, output: bool) -> int:
        """Append one token of one sequence (a decoding row's step) by item stores: ``add``'s
        slices and ``arange`` for a single token cost tens of microseconds more between two decodes."""
        index = self.count
        if index >= self.capacity:
            raise ValueError(f"{index + 1} tokens in a batch of {self.capacity}")
        self.token[index], self.pos[index], self.seq[index, 0] = token, position, seq
        self._counts[index], self.output[index] = 1, output
        self.count = index + 1
        return index

    def decode(self, llama: Any, ctx: Any) -> int:
        self.struct.n_tokens = self.count
        return llama.llama_decode(ctx, self.struct)
