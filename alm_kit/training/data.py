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

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from alm_kit.data.batch import AudioTextDataset, Batch, collate

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
                 lengths: Sequence[Any] | None = None, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.lengths = lengths
        self.num_workers = num_workers
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
                                                 num_workers=self.num_workers, generator=generator)
            for batch in loader:
                self.index += self.world
                yield batch
            self.epoch, self.index = self.epoch + 1, 0
