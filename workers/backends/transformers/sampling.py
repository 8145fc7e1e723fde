"""Per-row decoding controls, so requests with different sampling settings share one batch.

``transformers.generate`` takes one temperature/top_p/max_new_tokens/stop list per call; a batch of
independent requests needs them per row. These plug into ``generate`` as a logits processor and a
stopping criterion instead of splitting the batch by settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria


class PerRowSampling(LogitsProcessor):
    """Temperature and nucleus (top-p) per row; temperature 0 means greedy (argmax only)."""

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float], device: torch.device):
        temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
        self.greedy = temps == 0
        self.temperatures = torch.where(self.greedy, torch.ones_like(temps), temps)[:, None]
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32, device=device)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperatures
        neg_inf = torch.finfo(scores.dtype).min
        # nucleus: drop tokens outside the smallest set whose probability reaches top_p (keep >= 1)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= self.top_ps
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, neg_inf)
        # greedy rows: only the argmax survives, so sampling picks it with probability 1
        if self.greedy.any():
            best = scores.argmax(dim=-1, keepdim=True)
            only_best = torch.full_like(scores, neg_inf).scatter(-1, best, 0.0)
            scores = torch.where(self.greedy[:, None], only_best, scores)
        return scores


class PerRowStop(StoppingCriteria):
    """Stop each row at its own max_new_tokens or at its own stop strings."""

    def __init__(
        self,
        prompt_length: int,
        max_new_tokens: Sequence[int],
        stop_strings: Sequence[Sequence[str]],
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.prompt_length = prompt_length
        self.max_new_tokens = list(max_new_tokens)
        self.stop_strings = [list(s) for s in stop_strings]
        self.tokenizer = tokenizer
        # stop strings can span tokens; decoding a window of this many tokens is enough to see one
        self.window = 1 + max((len(s) for row in self.stop_strings for s in row), default=0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = torch.tensor([generated >= limit for limit in self.max_new_tokens], device=input_ids.device)
        for row, stops in enumerate(self.stop_strings):
            if stops and not done[row]:
                tail = self.tokenizer.decode(input_ids[row, -min(self.window, generated) :])
                done[row] = any(stop in tail for stop in stops)
        return done
