"""Choosing the next token: repetition penalty, temperature, top-k, top-p, greedy or sampled."""

from __future__ import annotations

import torch
from torch import Tensor

from alm_kit.config.schema import GenerationConfig


class TokenChooser:
    """Turns a step's logits (rows, vocab) into one token per row.

    The repetition penalty (as in CTRL / transformers) applies to tokens each row
    has generated so far; ``seen`` tracks them as a boolean (rows, vocab) table.
    """

    def __init__(self, params: GenerationConfig, rows: int, vocab: int, device: torch.device) -> None:
        self.params = params
        self.seen = (torch.zeros(rows, vocab, dtype=torch.bool, device=device)
                     if params.repetition_penalty != 1.0 else None)
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def penalize(self, logits: Tensor) -> Tensor:
        if self.seen is None:
            return logits
        penalty = self.params.repetition_penalty
        scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(self.seen, scaled, logits)

    def filter(self, logits: Tensor) -> Tensor:
        """Temperature, top-k and top-p (nucleus) filtering; removed tokens get -inf."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            # drop a token when the ones before it already reach top_p (the first token always stays)
            drop = (cumulative - ordered.softmax(-1)) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        return logits

    def choose(self, logits: Tensor) -> Tensor:
        logits = self.penalize(logits.float())
        if not self.params.do_sample:
            return logits.argmax(-1)
        probs = self.filter(logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def record(self, tokens: Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True

    def keep_rows(self, rows: Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen[rows]
