"""The decode loop: prefill once, then one token per step for every unfinished row.

Works on :class:`DecoderInputs` built by any layout (left-padded, with or without
an attention mask) and any :class:`Decoder` plugin. With a transformers decoder
the KV cache is preallocated (:mod:`alm_kit.inference.kv_cache`); finished rows
leave the batch so that the remaining ones run at their own cost. Each row
stops at an end token, at a stop string, or at ``max_new_tokens``; thinking
decoders get a thought budget after which the thought is closed for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alm_kit.config.schema import GenerationConfig
from alm_kit.errors import GenerationError
from alm_kit.inference.kv_cache import preallocated_cache, reorder_rows, repeat_rows, select_rows
from alm_kit.inference.sampling import TokenChooser
from alm_kit.interfaces import Decoder, DecoderInputs
from alm_kit.text.thinking import THINK_CLOSE, THINK_OPEN


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)
    #: "stop" (end token), "stop_string", "length"
    finish_reason: str = "length"
    #: the prompt opened a thought that the answer continues (Qwen3-Thinking templates)
    opened_in_prompt: bool = False
    #: the thought was closed because it reached the budget
    budget_hit: bool = False


def single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class RowMonitor:
    """Per-row bookkeeping: end tokens, stop strings, thought budget and forced tokens."""

    def __init__(self, tokenizer, params: GenerationConfig, end_ids: set[int], prompt_ids: list[list[int]]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.end_ids = end_ids
        self.stops = [s for s in params.stop if s]
        # a stop string of n characters spans at most n tokens (+1 for a token straddling its start)
        self.window = max((len(s) for s in self.stops), default=0) + 1
        self.open_id = single_token_id(tokenizer, THINK_OPEN)
        self.close_id = single_token_id(tokenizer, THINK_CLOSE)
        budget = params.thinking_budget
        if budget is not None and (self.open_id is None or self.close_id is None):
            raise GenerationError(f"thinking_budget needs a decoder whose tokenizer has single {THINK_OPEN} and "
                             f"{THINK_CLOSE} tokens")
        self.close_ids = tokenizer.encode(params.thinking_close, add_special_tokens=False) if budget else []
        self.rows = [RowOutput() for _ in prompt_ids]
        #: stop strings and forced tokens (the thinking budget) need every token on the host as it comes
        self.needs_each_token = bool(self.stops) or budget is not None
        #: where the time went: prefill and decode seconds, decode forward passes
        self.timings: dict[str, float] = {}
        self.done = [False] * len(prompt_ids)
        self.thinking = [False] * len(prompt_ids)
        self.thought_len = [0] * len(prompt_ids)
        self.forced: list[list[int]] = [[] for _ in prompt_ids]
        #: called with (row, its output, done) after every token a row gets (streaming); None costs nothing
        self.on_token: Callable[[int, RowOutput, bool], object] | None = None
        for i, ids in enumerate(prompt_ids):
            if self.open_id is not None:
                opened = max((j for j, t in enumerate(ids) if t == self.open_id), default=-1)
                closed = max((j for j, t in enumerate(ids) if t == self.close_id), default=-1)
                self.thinking[i] = self.rows[i].opened_in_prompt = opened > closed

    def forced_token(self, row: int) -> int | None:
        return self.forced[row][0] if self.forced[row] else None

    def push(self, row: int, token: int) -> None:
        """Record the token a row produced and decide whether the row is finished."""
        self._record(row, token)
        if self.on_token is not None:
            self.on_token(row, self.rows[row], self.done[row])

    def _record(self, row: int, token: int) -> None:
        out = self.rows[row]
        out.tokens.append(token)
        if self.forced[row] and self.forced[row][0] == token:
            self.forced[row].pop(0)
        if token in self.end_ids and not self.forced[row]:
            out.tokens.pop()
            out.finish_reason = "stop"
            self.done[row] = True
            return
        if self.open_id is not None:
            if token == self.open_id:
                self.thinking[row], self.thought_len[row] = True, 0
            elif token == self.close_id:
                self.thinking[row] = False
            elif self.thinking[row]:
                self.thought_len[row] += 1
                budget = self.params.thinking_budget
                if budget is not None and self.thought_len[row] >= budget and not self.forced[row]:
                    self.forced[row] = list(self.close_ids)
                    out.budget_hit = True
        if self.stops:
            tail = self.tokenizer.decode(out.tokens[-self.window:], skip_special_tokens=False)
            if any(s in tail for s in self.stops):
                out.finish_reason = "stop_string"
                self.done[row] = True
                return
        if len(out.tokens) >= self.params.max_new_tokens:
            self.done[row] = True


def end_token_ids(layout, tokenizer) -> set[int]:
    ids = {layout.end_token_id()}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _cache_for(decoder: Decoder, capacity: int):
    """A preallocated cache for transformers decoders; None lets a plugin decoder make its own."""
    lm = getattr(decoder, "language_model", None)
    layers = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    if layers is None or getattr(lm.config, "sliding_window", None):
        return None
    return preallocated_cache(layers, capacity)


class _Rows:
    """The decoder-side state of the rows still running: cache, mask, next position."""

    #: finished rows leave the batch (``keep``)
    can_drop = True

    def __init__(self, decoder: Decoder, inputs: DecoderInputs, extra: int, use_cache: bool = True) -> None:
        self.decoder = decoder
        self.use_cache = use_cache
        embeds = inputs.inputs_embeds
        b, length = embeds.shape[:2]
        self.mask = inputs.attention_mask
        self.position = (inputs.position_ids[:, -1] + 1 if inputs.position_ids is not None
                         else torch.full((b,), length, dtype=torch.long, device=embeds.device))
        positions = inputs.position_ids
        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(b, length)
        if not use_cache:  # everything so far is re-run at every step
            self.embeds, self.positions, self.cache = embeds, positions, None
            hidden, _ = decoder(embeds, self.mask, positions)
        else:
            self.cache = _cache_for(decoder, length + extra)
            hidden, self.cache = decoder(embeds, self.mask, positions, past_key_values=self.cache, use_cache=True)
        self.logits = decoder.logits(hidden[:, -1]).float()
        self.index = torch.arange(b, device=embeds.device)  # original row of each running row

    def step(self, tokens: Tensor) -> None:
        embeds = self.decoder.embed(tokens[:, None])
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        if not self.use_cache:
            self.embeds = torch.cat([self.embeds, embeds.to(self.embeds.dtype)], dim=1)
            self.positions = torch.cat([self.positions, self.position[:, None]], dim=1)
            hidden, _ = self.decoder(self.embeds, self.mask, self.positions)
        else:
            hidden, self.cache = self.decoder(embeds, self.mask, self.position[:, None],
                                              past_key_values=self.cache, use_cache=True)
        self.position = self.position + 1
        self.logits = self.decoder.logits(hidden[:, -1]).float()

    def keep(self, keep: Tensor) -> None:
        if not self.use_cache:
            self.embeds, self.positions = self.embeds[keep], self.positions[keep]
        else:
            select_rows(self.cache, keep)
        if self.mask is not None:
            self.mask = self.mask[keep]
        self.position, self.index, self.logits = self.position[keep], self.index[keep], self.logits[keep]


#: with fixed-shape steps, the host reads the new tokens (and checks for the end) every this many steps
CHECK_EVERY = 16


@torch.no_grad()
def sample_or_greedy(decoder: Decoder, inputs: DecoderInputs, params: GenerationConfig,
                     monitor: RowMonitor, *, static: bool = False, graph: bool = False) -> list[RowOutput]:
    """Greedy decoding or sampling. ``static``: fixed-shape steps (:mod:`alm_kit.inference.static_decode`),
    replayed as a CUDA graph with ``graph``; the host then reads tokens only every :data:`CHECK_EVERY`
    steps unless a stop string or a thinking budget needs every token as it comes."""
    extra = params.max_new_tokens + (len(monitor.close_ids) if params.thinking_budget else 0)
    start = time.perf_counter()
    if static:
        from alm_kit.inference.static_decode import StaticRows

        rows = StaticRows(decoder, inputs, extra, graph)
    else:
        rows = _Rows(decoder, inputs, extra, use_cache=params.use_cache)
    monitor.timings["prefill"] = time.perf_counter() - start
    start = time.perf_counter()
    chooser = TokenChooser(params, len(monitor.rows), rows.logits.shape[-1], rows.logits.device)
    if static and not monitor.needs_each_token:
        steps = _on_device(rows, chooser, params, monitor)
    else:
        steps = _token_by_token(rows, chooser, params, monitor)
    monitor.timings.update(decode=time.perf_counter() - start, steps=steps)
    return monitor.rows


def _token_by_token(rows, chooser: TokenChooser, params: GenerationConfig, monitor: RowMonitor) -> int:
    """The host sees every token as it comes: forced tokens, stop strings; finished rows leave the batch
    (eager rows only). Returns the decode forward passes."""
    pad = next(iter(monitor.end_ids))
    end_ids = torch.tensor(sorted(monitor.end_ids), device=rows.logits.device)
    step = 0
    while True:
        if step < params.min_new_tokens:
            rows.logits[:, end_ids] = float("-inf")
        step += 1
        tokens = chooser.choose(rows.logits)
        for j, row in enumerate(rows.index.tolist()):
            forced = monitor.forced_token(row)
            if forced is not None:
                tokens[j] = forced
            if not monitor.done[row]:
                monitor.push(row, int(tokens[j]))
            if monitor.done[row]:
                tokens[j] = pad
        chooser.record(tokens)
        running = torch.tensor([not monitor.done[r] for r in rows.index.tolist()], device=tokens.device)
        if not running.any():
            break
        # drop finished rows once a quarter of the batch has finished (copying the cache costs about a step)
        if rows.can_drop and int(running.sum()) <= 0.75 * len(running):
            keep = running.nonzero().squeeze(-1)
            rows.keep(keep)
            chooser.keep_rows(keep)
            tokens = tokens[keep]
        rows.step(tokens)
    return step - 1


def _on_device(rows, chooser: TokenChooser, params: GenerationConfig, monitor: RowMonitor) -> int:
    """Tokens are chosen, recorded and checked for the end on the device; the host reads them every
    :data:`CHECK_EVERY` steps (up to that many steps past the last row's end are wasted, and dropped).
    Returns the decode forward passes."""
    device = rows.logits.device
    b = len(monitor.rows)
    pad = next(iter(monitor.end_ids))
    end_ids = torch.tensor(sorted(monitor.end_ids), device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    history = torch.full((b, params.max_new_tokens), pad, dtype=torch.long, device=device)
    read = 0
    for step in range(params.max_new_tokens):
        if step < params.min_new_tokens:
            rows.logits[:, end_ids] = float("-inf")
        tokens = torch.where(done, pad, chooser.choose(rows.logits))
        chooser.record(tokens)
        history[:, step] = tokens
        done |= torch.isin(tokens, end_ids)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == params.max_new_tokens:
            for row, new in enumerate(history[:, read : step + 1].tolist()):
                for token in new:
                    if monitor.done[row]:
                        break
                    monitor.push(row, token)
            read = step + 1
            if all(monitor.done):
                return step
        rows.step(tokens)
    return params.max_new_tokens - 1


@torch.no_grad()
def beam_search(decoder: Decoder, inputs: DecoderInputs, params: GenerationConfig,
                monitor: RowMonitor) -> list[RowOutput]:
    """Beam search with ``num_beams`` beams per example; an example is done when it has that many
    finished hypotheses (transformers' ``early_stopping=True``)."""
    k = params.num_beams
    start = time.perf_counter()
    rows = _Rows(decoder, inputs, params.max_new_tokens)
    monitor.timings["prefill"] = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    b, vocab = rows.logits.shape
    device = rows.logits.device
    repeat_rows(rows.cache, k)
    if rows.mask is not None:
        rows.mask = rows.mask.repeat_interleave(k, dim=0)
    rows.position = rows.position.repeat_interleave(k)
    logits = rows.logits.repeat_interleave(k, dim=0)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: only the first one may expand at step 1
    history: list[list[int]] = [[] for _ in range(b * k)]
    finished: list[list[tuple[float, list[int], str]]] = [[] for _ in range(b)]
    done = [False] * b

    def normalised(score: float, length: int) -> float:
        return score / (max(length, 1) ** params.length_penalty)

    for _ in range(params.max_new_tokens):
        chooser = TokenChooser(params, b * k, vocab, device)
        if chooser.seen is not None:
            for i, h in enumerate(history):
                if h:
                    chooser.seen[i, torch.tensor(h, device=device)] = True
        logp = chooser.penalize(logits).log_softmax(-1)
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=-1)
        new_scores = torch.full((b, k), float("-inf"), device=device)
        sources = torch.zeros(b, k, dtype=torch.long, device=device)
        new_tokens = torch.full((b, k), next(iter(monitor.end_ids)), dtype=torch.long, device=device)
        for e in range(b):
            if done[e]:
                sources[e] = e * k
                continue
            filled = 0
            for rank, (score, flat) in enumerate(zip(top_scores[e].tolist(), top_ids[e].tolist())):
                beam, token = divmod(flat, vocab)
                seq = history[e * k + beam] + [token]
                if token in monitor.end_ids:
                    if rank < k:
                        finished[e].append((normalised(score, len(seq)), seq[:-1], "stop"))
                    continue
                new_scores[e, filled], sources[e, filled], new_tokens[e, filled] = score, e * k + beam, token
                filled += 1
                if filled == k:
                    break
            done[e] = len(finished[e]) >= k
        if all(done):
            break
        source_list = sources.view(-1).tolist()
        history = [history[s] + [t] for s, t in zip(source_list, new_tokens.view(-1).tolist())]
        scores = new_scores
        reorder_rows(rows.cache, sources.view(-1))
        if rows.mask is not None:
            rows.mask = rows.mask[sources.view(-1)]
        rows.step(new_tokens.view(-1))
        steps += 1
        logits = rows.logits
    monitor.timings.update(decode=time.perf_counter() - start, steps=steps)
    for e in range(b):
        if not done[e]:
            for j in range(k):
                if scores[e, j] > float("-inf"):
                    seq = history[e * k + j]
                    finished[e].append((normalised(float(scores[e, j]), len(seq)), seq, "length"))
        _, best, reason = max(finished[e], key=lambda f: f[0])
        monitor.rows[e].tokens, monitor.rows[e].finish_reason = best, reason
    return monitor.rows


def decode(decoder: Decoder, inputs: DecoderInputs, params: GenerationConfig, monitor: RowMonitor) -> list[RowOutput]:
    if params.num_beams > 1:
        return beam_search(decoder, inputs, params, monitor)
    device = inputs.inputs_embeds.device
    static = uses_static_steps(decoder, params, device)
    return sample_or_greedy(decoder, inputs, params, monitor, static=static, graph=static and device.type == "cuda")


def uses_static_steps(decoder: Decoder, params: GenerationConfig, device: torch.device) -> bool:
    """``generation.cuda_graphs``: auto = fixed-shape steps as CUDA graphs on CUDA when the decoder allows
    them; true = always (on the CPU: the same steps, eagerly); false = the eager path."""
    if params.cuda_graphs is False or not params.use_cache:
        return False
    from alm_kit.inference.static_decode import static_decoding_supported

    why_not = static_decoding_supported(decoder)
    if why_not is not None:
        if params.cuda_graphs is True:
            raise GenerationError(f"cuda_graphs: true is not possible here: {why_not}")
        return False
    return params.cuda_graphs is True or device.type == "cuda"
