"""What the engine trains from: a resumable stream of micro-batches for this rank.

The engine asks three things of its training data (:class:`TrainingData`), so that a map-style
manifest and a stream of WebDataset shards plug in the same way:

* iterating yields this rank's micro-batches (:class:`~alm_kit.data.batch.Batch`) from the
  current position on, epoch after epoch, without end (the engine counts steps and stops);
* ``state_dict()`` is the position *after the last batch yielded*, a small dict of plain values
  (``{"epoch": 2, "index": 40}``); the engine stores it in each checkpoint;
* ``load_state_dict(state)`` continues from such a position, before iteration starts;
* ``batches_per_epoch`` is this rank's micro-batches per epoch, or None when a stream cannot say
  (then ``training.max_steps`` must be set).

For :class:`ManifestData` the position is the epoch and the number of micro-batches all ranks
together have consumed of that epoch's batch order; the order is a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from alm_kit.audio.io import AudioBlob
from alm_kit.data.batch import AudioTextDataset, Batch, FeatureLookup, collate, example_item
from alm_kit.data.manifest import Example
from alm_kit.data.shards import RawSample, ShardError, count_samples, read_samples, read_shard, to_example
from alm_kit.interfaces import AudioSpec

#: a mega-batch of this many batches is sorted by length before it is cut into batches
BUCKET_BATCHES = 64


@runtime_checkable
class TrainingData(Protocol):
    batches_per_epoch: int | None

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, lengths: Sequence[Any] | None = None,
                  bucket_batches: int = BUCKET_BATCHES) -> list[list[int]]:
    """The batch order of one epoch: shuffled, or (with ``lengths``) bucketed by length.

    Bucketing shuffles, sorts each mega-batch of ``bucket_batches`` batches by length, cuts it into
    batches and shuffles the batches, so each batch holds examples of similar length while the
    order still changes every epoch. Both are deterministic given ``(seed, epoch)``.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = batch_size * bucket_batches
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of the padded positions in batches that pad each example to the batch's longest."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / max(padded, 1)


class ManifestData:
    """Examples in memory, batched per epoch; rank ``r`` of ``w`` takes batches r, r+w, r+2w, ...

    Every epoch's batch list is cut to a multiple of the world size, so ranks step together. With
    ``w`` ranks and accumulation ``a``, optimizer step ``s`` uses batches ``s*w*a`` ... of the epoch:
    the same examples a single process with accumulation ``w*a`` uses.
    """

    def __init__(self, dataset: AudioTextDataset, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[Any] | None = None, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.lengths = lengths
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.index = 0
        n = len(dataset)
        full = -(-n // batch_size)
        self.batches_per_epoch = (full - full % world) // world if world > 1 else full
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training example(s) make fewer batches of {batch_size} than the "
                             f"{world} ranks; lower training.batch_size or add data")

    def batches(self, epoch: int) -> list[list[int]]:
        order = epoch_batches(len(self.dataset), self.batch_size, seed=self.seed, epoch=epoch, lengths=self.lengths)
        return order[: self.batches_per_epoch * self.world]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["index"] % self.world:
            raise ValueError(f"data position {state['index']} is not a multiple of the {self.world} ranks")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self.batches(self.epoch)
            mine = [order[i] for i in range(self.index + self.rank, len(order), self.world)]
            self.dataset.epoch = self.epoch  # random crops differ per epoch, not per rank
            # its own generator: creating a loader must not draw from the global RNG, or a resumed run,
            # which creates one mid-epoch, would continue with other random numbers (dropout) than the original
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=mine, collate_fn=collate,
                                                 num_workers=self.num_workers, generator=generator,
                                                 pin_memory=self.pin_memory,
                                                 prefetch_factor=4 if self.num_workers else None)
            for batch in loader:
                self.index += self.world
                yield batch
            self.epoch, self.index = self.epoch + 1, 0


# --------------------------------------------------------------------------- WebDataset shards
class ShuffleBuffer:
    """WebDataset's bounded shuffle: hold ``size`` items, emit a random one as each new one arrives.

    The random draws depend only on how many items arrive, so running it over sample *positions*
    gives the order the same run over the samples themselves gives: that is how a resumed run
    finds its place without reading the data it skips.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = max(1, size)
        self.rng = rng
        self.items: list[Any] = []

    def push(self, item: Any) -> Any | None:
        """Add ``item``; once full, return the item it displaces (the next one out)."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        i = int(self.rng.integers(self.size))
        out, self.items[i] = self.items[i], item
        return out

    def drain(self) -> list[Any]:
        items = [self.items[i] for i in self.rng.permutation(len(self.items))]
        self.items = []
        return items


class ShardData:
    """Training batches streamed from WebDataset shards (a :class:`TrainingData`).

    Rank ``r`` of ``w`` reads shards ``r, r + w, ...``; every epoch it visits its shards in a new
    order (seeded by seed, epoch and rank), shuffling samples through a bounded buffer. Each rank
    takes the same number of samples per epoch (the smallest rank's count), so ranks step together.
    The position is ``{"epoch", "index"}`` (batches done in the epoch), plus where the last sample
    came from (shard and sample number) for people reading it.
    """

    def __init__(self, shards: list[str], specs: Mapping[str, AudioSpec], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle_buffer: int = 1000, train: bool = True,
                 cache: FeatureLookup | None = None, limit: int | None = None, response_template: str | None = None,
                 num_workers: int = 0) -> None:
        if not shards:
            raise ShardError("data.train names no shards")
        if len(shards) < world:
            raise ShardError(f"data.train has {len(shards)} shard(s) for {world} ranks: every rank reads its own "
                             "shards, so write at least as many shards as ranks "
                             "(alm-kit data shard ... --max-per-shard N)")
        self.shards = list(shards)
        self.mine = self.shards[rank::world]
        self.specs = dict(specs)
        self.batch_size = batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.train = train
        self.cache = cache
        self.response_template = response_template
        self.num_workers = num_workers
        counts = [count_samples(s) for s in self.shards]
        empty = [s for s, c in zip(self.shards, counts) if c == 0]
        if empty:
            raise ShardError(f"shard holds no samples: {empty[0]}")
        self.counts = counts[rank::world]
        per_rank = min(sum(counts[r::world]) for r in range(world))
        if limit is not None:
            per_rank = min(per_rank, math.ceil(limit / world))
        self.samples_per_epoch = per_rank
        self.batches_per_epoch = math.ceil(per_rank / batch_size)
        self.epoch = 0
        self.index = 0
        self._last: tuple[int, int] | None = None

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        epoch, index = (self.epoch + 1, 0) if self.index >= self.batches_per_epoch else (self.epoch, self.index)
        state = {"epoch": epoch, "index": index, "shards": len(self.shards), "world": self.world}
        if self._last is not None:
            k, s = self._last
            state.update(shard=self.mine[k], shard_sample=s)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, ours in (("shards", len(self.shards)), ("world", self.world)):
            if key in state and int(state[key]) != ours:
                raise ShardError(f"the data position was saved with {state[key]} {key.rstrip('s')}(s), this run has "
                                 f"{ours}: a shard stream resumes exactly only with the same shards and ranks")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    # ------------------------------------------------------------------ the stream
    def _shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.mine)).tolist()

    def _positions(self, order: list[int]) -> Iterator[tuple[int, int]]:
        return ((k, s) for k in order for s in range(self.counts[k]))

    def _live(self, order: list[int], start: int, first_sample: int) -> Iterator[tuple[tuple[int, int], Example]]:
        """Samples of the shards ``order[start:]``, from sample ``first_sample`` of the first one on."""
        for n, k in enumerate(order[start:]):
            skip = first_sample if n == 0 else 0
            for s, raw in read_samples(self.mine[k], wanted=lambda i, skip=skip: i >= skip):
                if raw is None:
                    continue
                if s >= self.counts[k]:
                    raise ShardError(f"{self.mine[k]} changed during training (now more than {self.counts[k]} samples)")
                yield (k, s), self._example(k, raw, self.response_template)

    def _example(self, k: int, raw: RawSample, template: str | None) -> Example:
        example = to_example(self.mine[k], raw, require_response=template is None)
        if template is not None:
            from alm_kit.text.templates import apply_response_template

            example = apply_response_template([example], template)[0]
        return example

    def _fetch(self, positions: list[tuple[int, int]]) -> dict[tuple[int, int], Example]:
        """Read the samples at ``positions`` (what a resumed shuffle buffer held), shard by shard."""
        by_shard: dict[int, set[int]] = {}
        for k, s in positions:
            by_shard.setdefault(k, set()).add(s)
        found = {}
        for k, wanted in by_shard.items():
            for s, raw in read_samples(self.mine[k], wanted=wanted.__contains__):
                if raw is not None:
                    found[(k, s)] = self._example(k, raw, self.response_template)
        return found

    def samples(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, tuple[int, int], Example]]:
        """(sample number in the epoch, (shard, sample), example) of this rank's epoch, from number ``skip`` on."""
        order = self._shard_order(epoch)
        buffer = ShuffleBuffer(self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank, 1]))
        positions = self._positions(order)
        limit = self.samples_per_epoch
        emitted = consumed = 0
        exhausted = False
        # replay: the same draws over positions alone until `skip` samples have gone out (no data read)
        while emitted < skip:
            pos = next(positions, None)
            if pos is None:
                exhausted = True
                break
            consumed += 1
            if buffer.push(pos) is not None:
                emitted += 1
        if buffer.items:  # what the buffer held at that point is read back, shard by shard
            held = self._fetch(buffer.items)
            buffer.items = [(pos, held[pos]) for pos in buffer.items]
        if not exhausted:
            start, first = 0, consumed  # where the reader stands after `consumed` samples
            while start < len(order) and first >= self.counts[order[start]]:
                first -= self.counts[order[start]]
                start += 1
            for item in self._live(order, start, first):
                out = buffer.push(item)
                if out is not None:
                    if emitted >= limit:
                        return
                    yield emitted, out[0], out[1]
                    emitted += 1
        for pos, example in buffer.drain():
            if emitted >= limit:
                return
            if emitted >= skip:
                yield emitted, pos, example
            emitted += 1

    def _item(self, number: int, example: Example, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, self.rank, number])
        return example_item(example, self.specs, train=self.train, rng=rng, cache=self.cache)

    def __iter__(self) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 else None
        try:
            while True:
                epoch = self.epoch
                chunk: list[tuple[int, tuple[int, int], Example]] = []
                stream = self.samples(epoch, skip=self.index * self.batch_size)
                for item in stream:
                    chunk.append(item)
                    if len(chunk) == self.batch_size:
                        yield self._batch(chunk, epoch, pool)
                        chunk = []
                if chunk:
                    yield self._batch(chunk, epoch, pool)
                self.epoch, self.index = epoch + 1, 0
        finally:
            if pool is not None:
                pool.shutdown()

    def _batch(self, chunk, epoch: int, pool: ThreadPoolExecutor | None) -> Batch:
        make = lambda item: self._item(item[0], item[2], epoch)  # noqa: E731
        items = list(pool.map(make, chunk)) if pool is not None else [make(item) for item in chunk]
        self.index += 1
        self._last = chunk[-1][1]
        return collate(items)

    def clips(self) -> Iterable[AudioBlob]:
        """Every clip of this rank's shards, in file order (for filling the feature cache)."""
        for path in self.mine:
            for example in read_shard(path, require_response=False):
                yield from example.audio
