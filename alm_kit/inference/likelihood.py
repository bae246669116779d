"""Logits and answer log-likelihoods: what the model thinks, not only what it says.

``prefix_logits`` returns the decoder's logits over a prompt's prefix exactly as generation lays it
out (the last row is the distribution of the first answer token). ``score_candidates`` is
likelihood-based multiple choice as lm-eval-harness does it: each candidate answer is appended to
the prompt and the log-probabilities of its tokens under the model are summed, in one teacher-forced
pass. The candidate is tokenized the way the recipe's layout tokenizes training answers
(lower-casing, ``response_suffix``, the end token), so the score is the log-likelihood of the model
answering exactly that and stopping — minus the training loss of that answer, in nats. Every clip is
encoded once however many candidates it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alm_kit.config.schema import GenerationConfig
from alm_kit.data.batch import Batch
from alm_kit.errors import GenerationError
from alm_kit.inference.engine import Request, clips_per_pass, make_batch
from alm_kit.interfaces import IGNORE
from alm_kit.model import AudioLanguageModel
from alm_kit.runtime import autocast


@dataclass
class CandidateScore:
    """One candidate answer under the model."""

    text: str
    #: sum of the log-probabilities (nats) of the answer's tokens, the layout's end token(s) included
    logprob: float
    #: every token is the most likely one at its position: greedy decoding would answer exactly this
    greedy: bool
    #: the answer's tokens as the layout tokenizes a training answer, and each one's log-probability
    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def mean_logprob(self) -> float:
        """Per-token average: compares answers of different lengths more evenly than the sum."""
        return self.logprob / max(len(self.token_ids), 1)


@torch.no_grad()
def prefix_logits(model: AudioLanguageModel, request: Request, params: GenerationConfig) -> Tensor:
    """(positions, vocab) float32 logits over one request's generation prefix (audio tokens and prompt
    as the layout places them; ``params.thinking`` reaches chat templates that read it)."""
    batch = make_batch(model, [request])
    with autocast(model.device):
        inputs = model.decoder_inputs(batch, for_generation=True, thinking=params.thinking)
        hidden, _ = model.decoder(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        return model.decoder.logits(hidden)[0].float()


@torch.no_grad()
def score_candidates(model: AudioLanguageModel, requests: Sequence[Request], candidates: Sequence[Sequence[str]],
                     params: GenerationConfig) -> list[list[CandidateScore]]:
    """The score of every candidate answer of every request, in one encoder call and one decoder pass
    (chunk the requests yourself for large batches). Raises GenerationError on a bad example."""
    if len(requests) != len(candidates):
        raise GenerationError(f"{len(requests)} requests but {len(candidates)} candidate lists")
    empty = [r.id or str(i) for i, (r, c) in enumerate(zip(requests, candidates)) if not c]
    if empty:
        raise GenerationError(f"example {empty[0]}: no candidate answers given")
    batch = make_batch(model, requests)
    starts = [sum(len(r.audio) for r in requests[:i]) for i in range(len(requests))]
    rows = [(i, text) for i, texts in enumerate(candidates) for text in texts]
    clip_rows = torch.tensor([starts[i] + k for i, _ in rows for k in range(len(requests[i].audio))])
    with autocast(model.device):
        encoded = model.encode(batch.waveforms, batch.lengths, clips_per_pass(params, model.device))
        scoring = Batch(ids=[requests[i].id for i, _ in rows], prompts=[requests[i].prompt for i, _ in rows],
                        responses=[text for _, text in rows],
                        clips_per_example=[len(requests[i].audio) for i, _ in rows],
                        clip_keys=[batch.clip_keys[c] for c in clip_rows.tolist()],
                        features={name: f.index(clip_rows.to(f.frames.device)) for name, f in encoded.items()})
        inputs = model.decoder_inputs(scoring, for_generation=False, thinking=params.thinking)
        hidden, _ = model.decoder(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        targets = inputs.labels[:, 1:]
        where = targets != IGNORE
        logits = model.decoder.logits(hidden[:, :-1][where]).float()
    logprobs = torch.log_softmax(logits, -1)
    wanted = targets[where]
    token_logprobs = logprobs.gather(-1, wanted[:, None])[:, 0]
    hits = logprobs.argmax(-1) == wanted
    row_of = where.nonzero()[:, 0]
    out: list[list[CandidateScore]] = [[] for _ in requests]
    for row, (i, text) in enumerate(rows):
        mine = row_of == row
        out[i].append(CandidateScore(text, float(token_logprobs[mine].sum()), bool(hits[mine].all()),
                                     wanted[mine].tolist(), token_logprobs[mine].tolist()))
    return out
