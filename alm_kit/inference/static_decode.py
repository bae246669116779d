"""Decode steps of one fixed shape, captured as CUDA graphs (``generation.cuda_graphs``).

A decode step of a small model on a GPU costs far less than launching its few hundred kernels
from Python, so the engine can replay the step as one CUDA graph instead. That needs a step
whose shapes and device addresses never change:

* the batch is padded to a bucket (1, 2, 4, 8, ... rows) and the KV cache to a capacity bucket
  (a multiple of :data:`CAPACITY_STEP` positions); finished rows keep decoding padding instead of
  leaving the batch;
* the cache (:func:`~alm_kit.inference.kv_cache.static_cache`) is written at a column held in a
  device tensor, and attention reads the whole buffer through a (rows, 1, 1, capacity) mask in
  which the step itself switches on the column it writes;
* positions, column and mask live on the device and the step advances them in place.

Buffers and graph are kept per (decoder, rows, capacity, dtype) in a small cache
(:class:`StepSlot`), so a server or an evaluation captures each shape once (a warm-up of a few
eager steps and one capture, well under a second for a small model). The prefill stays an
ordinary eager forward into the same cache. On the CPU (``cuda_graphs: true``) the same
fixed-shape step runs eagerly, which is how the tests check that it gives the eager path's tokens.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from alm_kit.inference.kv_cache import set_stepping, static_cache
from alm_kit.interfaces import Decoder, DecoderInputs

#: capacities are rounded up to a multiple of this many positions (fewer distinct graphs)
CAPACITY_STEP = 256
#: captured shapes kept at once (each holds its KV cache)
MAX_SLOTS = 6


def batch_bucket(rows: int) -> int:
    """The next power of two: the batch sizes a step is captured for."""
    return 1 << max(0, rows - 1).bit_length()


def static_decoding_supported(decoder: Decoder) -> str | None:
    """None when ``decoder`` can take fixed-shape steps, else why not (the eager path is used then)."""
    lm = getattr(decoder, "language_model", None)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) is None:
        return "the decoder is not a transformers model"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attn_implementation {getattr(config, '_attn_implementation', None)!r} (needs 'sdpa')"
    return None


class StepSlot:
    """The persistent buffers of one step shape, and its CUDA graph once captured."""

    def __init__(self, decoder: Decoder, rows: int, capacity: int, device: torch.device, graph: bool) -> None:
        self.decoder = decoder
        self.rows, self.capacity = rows, capacity
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = static_cache(decoder.language_model.config.num_hidden_layers, capacity, self.column)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.logits: Tensor | None = None
        self.want_graph = graph
        self.graph: Any = None

    def _step(self) -> Tensor:
        self.mask.index_fill_(3, self.column, True)
        embeds = self.decoder.embed(self.tokens[:, None])
        hidden, _ = self.decoder(embeds, self.mask, self.position[:, None], past_key_values=self.cache,
                                 use_cache=True)
        logits = self.decoder.logits(hidden[:, -1]).float()
        self.position.add_(1)
        self.column.add_(1)
        return logits

    def prefill(self, inputs: DecoderInputs) -> Tensor:
        """Write the prompt into the cache (an eager forward) and set up the first step; the last
        position's hidden states."""
        embeds, mask, positions = _padded(inputs, self.rows)
        length = embeds.shape[1]
        set_stepping(self.cache, False)
        hidden, _ = self.decoder(embeds, mask, positions, past_key_values=self.cache, use_cache=True)
        set_stepping(self.cache, True)
        self.mask.zero_()
        self.mask[:, 0, 0, :length] = True if mask is None else mask.bool()
        self.position.copy_(positions[:, -1] + 1)
        self.column.fill_(length)
        return hidden[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """One decode step for ``tokens`` (the first rows of the bucket); logits of every row of the bucket."""
        self.tokens[: len(tokens)].copy_(tokens)
        if self.want_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step (state it changes is reset by the next prefill,
        so the capture happens before the first real step: the buffers are saved and restored)."""
        saved = [t.clone() for t in (self.tokens, self.position, self.column, self.mask)]
        layers = [(layer._k.clone(), layer._v.clone()) for layer in self.cache.layers]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), _graph_autocast():
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_pool()), _graph_autocast():
                self.logits = self._step()
            self.graph = graph
        except RuntimeError as exc:  # e.g. a host synchronisation inside a plugin's forward
            warnings.warn(f"alm-kit: the decode step could not be captured as a CUDA graph ({exc}); "
                          "decoding eagerly", stacklevel=3)
            self.want_graph = False
        for t, old in zip((self.tokens, self.position, self.column, self.mask), saved):
            t.copy_(old)
        for layer, (k, v) in zip(self.cache.layers, layers):
            layer._k.copy_(k)
            layer._v.copy_(v)


def _graph_autocast():
    """The caller's autocast without its weight-cast cache (cached casts would be freed under the graph)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return torch.autocast("cuda", enabled=False)


_POOL: Any = None
_SLOTS: OrderedDict[tuple, StepSlot] = OrderedDict()


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


def _padded(inputs: DecoderInputs, rows: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """The prefix padded to ``rows`` rows (copies of the last row) and its positions."""
    embeds, mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
    b, length = embeds.shape[:2]
    if positions is None:
        positions = torch.arange(length, device=embeds.device).expand(b, length)
    extra = rows - b
    if extra:
        pad = lambda t: None if t is None else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])  # noqa: E731
        embeds, mask, positions = pad(embeds), pad(mask), pad(positions)
    return embeds, mask, positions


def step_slot(decoder: Decoder, rows: int, length: int, extra: int, graph: bool) -> StepSlot:
    """The slot for a batch of ``rows`` rows whose prompts take ``length`` positions and that may grow by
    ``extra``; made (and, on CUDA, captured at its first step) the first time its shape is asked for."""
    device = decoder.language_model.device
    capacity = -(-(length + extra) // CAPACITY_STEP) * CAPACITY_STEP
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (id(decoder), batch_bucket(rows), capacity, decoder.language_model.dtype, autocast, graph, str(device))
    slot = _SLOTS.pop(key, None)
    if slot is None or slot.decoder is not decoder:
        while len(_SLOTS) >= MAX_SLOTS:
            _SLOTS.popitem(last=False)
        slot = StepSlot(decoder, batch_bucket(rows), capacity, device, graph)
    _SLOTS[key] = slot
    return slot


def clear_slots() -> None:
    """Free every captured step and its cache (tests; a model being unloaded)."""
    _SLOTS.clear()


class StaticRows:
    """The decoder-side state of a batch decoded with fixed-shape steps (the eager path's ``_Rows``
    without row dropping: finished rows stay in the batch)."""

    can_drop = False

    def __init__(self, decoder: Decoder, inputs: DecoderInputs, extra: int, graph: bool) -> None:
        b, length = inputs.inputs_embeds.shape[:2]
        self.slot = step_slot(decoder, b, length, extra, graph)
        self.rows = b
        self.index = torch.arange(b, device=inputs.inputs_embeds.device)
        self.logits = decoder.logits(self.slot.prefill(inputs)[:b]).float()

    def step(self, tokens: Tensor) -> None:
        self.logits = self.slot.step(tokens)[: self.rows]
