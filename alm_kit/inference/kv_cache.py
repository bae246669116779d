"""A preallocated KV cache for transformers decoders.

Every layer's keys and values live in one buffer of fixed capacity, allocated
at the first write; each step writes its new positions in place and attention
reads a view of the filled part. Nothing is re-allocated or concatenated per
token (transformers' DynamicCache copies the whole cache every step), and
unlike a cache that always attends over its full capacity, a step costs only
what has been filled so far. Rows can be dropped (finished examples) and
reordered (beam search) in place.
"""

from __future__ import annotations

from functools import cache

from torch import Tensor


@cache
def _layer_class():
    # transformers is imported lazily (alm_kit.inference must import fast for the CLI)
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        is_compileable = False

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self._k: Tensor | None = None
            self._v: Tensor | None = None

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty(b, h, self.capacity, d)
            self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True
            self._refresh()

        def _refresh(self) -> None:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            end = self.length + new
            if end > self.capacity:
                raise RuntimeError(f"KV cache full: {end} positions > capacity {self.capacity}")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self._refresh()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.capacity

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._refresh()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self.length = max(0, self.length + tokens_to_remove)
                if self.is_initialized:
                    self._refresh()

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self._k = self._k[indices]
                self._v = self._v[indices]
                self._refresh()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._refresh()

        def reorder_cache(self, beam_idx: Tensor) -> None:
            if self.is_initialized:
                idx = beam_idx.to(self._k.device)
                self._k = self._k.index_select(0, idx)
                self._v = self._v.index_select(0, idx)
                self._refresh()

    return PreallocatedLayer


@cache
def _static_layer_class():
    class StaticLayer(_layer_class()):
        """A preallocated layer whose decode steps all have one shape (for CUDA graphs).

        In prefill mode it is a :class:`PreallocatedLayer` (the prompt is written at the start and
        attention reads the filled part). In step mode each update writes at ``column`` (a device
        tensor the step advances in place) and attention reads the whole buffer, the not yet
        written positions hidden by the step's mask: no host value changes from step to step.
        """

        def __init__(self, capacity: int, column: Tensor) -> None:
            super().__init__(capacity)
            self.column = column
            self.stepping = False

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            # attention reads the whole buffer: unwritten positions are masked, but NaN in uninitialised
            # memory would still poison the softmax (NaN + -inf) and the weighted sum (0 * NaN)
            self._k.zero_()
            self._v.zero_()

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.stepping:
                return super().update(key_states, value_states)
            self._k.index_copy_(2, self.column, key_states)
            self._v.index_copy_(2, self.column, value_states)
            return self._k, self._v

    return StaticLayer


def static_cache(num_layers: int, capacity: int, column: Tensor):
    """A cache of :func:`_static_layer_class` layers sharing the write ``column`` (a (1,) long tensor)."""
    from transformers.cache_utils import Cache

    layer = _static_layer_class()
    return Cache(layers=[layer(capacity, column) for _ in range(num_layers)])


def set_stepping(cache, stepping: bool) -> None:
    """Prefill mode (False: rewind and write from position 0) or step mode (True) for every layer."""
    for layer in cache.layers:
        if not stepping:
            layer.reset()
        layer.stepping = stepping


def preallocated_cache(num_layers: int, capacity: int):
    """A transformers ``Cache`` of ``num_layers`` preallocated layers holding ``capacity`` positions."""
    from transformers.cache_utils import Cache

    layer = _layer_class()
    return Cache(layers=[layer(capacity) for _ in range(num_layers)])


def select_rows(cache, indices: Tensor) -> None:
    """Keep only the cache rows ``indices`` (finished examples leave the batch)."""
    for layer in cache.layers:
        layer.batch_select_indices(indices)


def reorder_rows(cache, indices: Tensor) -> None:
    """Row i becomes old row ``indices[i]`` (beam search)."""
    for layer in cache.layers:
        layer.reorder_cache(indices)


def repeat_rows(cache, repeats: int) -> None:
    """Every row ``repeats`` times in a row (one per beam)."""
    for layer in cache.layers:
        layer.batch_repeat_interleave(repeats)
