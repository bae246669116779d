"""WebDataset tar shards: write them from a manifest, stream them into training.

Layout (the WebDataset convention, docs/data.md#webdataset-shards): a sample is a run of
consecutive tar members sharing a *key* (the member name up to the first dot of its basename)::

    000123.json      {"id": "...", "prompt": "...", "response": "...", "meta": {...}}
    000123.0.flac    first clip: the bytes of the source file, not re-encoded
    000123.1.wav     second clip

Reading uses only :mod:`tarfile`. Nothing is indexed in memory: a shard is read member after
member (seeking over the samples a resumed run has already seen), and an epoch's order is a
pure function of ``(seed, epoch, rank)`` and the shards' sample counts, so the data position of
a checkpoint is two integers: the epoch and the batches done in it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alm_kit.audio.io import AudioBlob
from alm_kit.data.batch import Batch, FeatureLookup, collate, example_item
from alm_kit.data.manifest import Example, ManifestError, check_audio_files, read_manifest
from alm_kit.interfaces import AudioSpec

#: shard file names end like this
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(ManifestError):
    """A shard is missing, unreadable or holds a malformed sample; the message names shard and key."""


# --------------------------------------------------------------------------- naming
def expand_braces(pattern: str) -> list[str]:
    """``train-{000000..000002}.tar`` -> three names (zero padding from the first bound);
    ``{a,b}`` alternatives too; several groups expand as a product, left to right."""
    found = [m for m in (_RANGE.search(pattern), _ALTERNATIVES.search(pattern)) if m is not None]
    if found:
        match = min(found, key=lambda m: m.start())
        head, tail = pattern[: match.start()], pattern[match.end():]
        if match.re is _RANGE:
            lo, hi = match.group(1), match.group(2)
            if int(hi) < int(lo):
                raise ShardError(f"brace range {match.group(0)} in {pattern!r} runs backwards")
            width = len(lo) if lo.startswith("0") else 0
            parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            parts = match.group(1).split(",")
        return [name for part in parts for name in expand_braces(head + part + tail)]
    return [pattern]


def is_shard_name(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def shard_paths(train: str | list[str] | None) -> list[str] | None:
    """The shards ``data.train`` names, or None when it names a manifest.

    Shards: a ``.tar`` path, a brace pattern, or a list of either. Every one must exist.
    """
    if train is None:
        return None
    items = [train] if isinstance(train, str) else list(train)
    if isinstance(train, str) and not is_shard_name(train) and "{" not in train:
        return None
    paths = [p for item in items for p in expand_braces(item)]
    bad = [p for p in paths if not is_shard_name(p)]
    if bad:
        raise ShardError(f"data.train: {bad[0]!r} is not a tar shard (names end in {', '.join(SHARD_SUFFIXES)}); "
                         "give one manifest, or shards only")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ShardError(f"data.train: shard not found: {missing[0]}{more}")
    return paths


def split_key(member_name: str) -> tuple[str, str]:
    """``dir/000123.0.flac`` -> (``dir/000123``, ``0.flac``): WebDataset's key and field."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# --------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)


def _open(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise ShardError(f"cannot read shard {path}: {exc}") from None


def _samples(path: str, wanted=None) -> Iterator[tuple[int, RawSample | None]]:
    """(sample index, sample) in tar order; samples ``wanted(index)`` rejects come as (index, None)
    and their data is never read (the tar reader seeks over it)."""
    with _open(path) as tar:
        index, current, keep = -1, None, False
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield index, current if keep else None
                    index += 1
                    keep = wanted is None or wanted(index)
                    current = RawSample(key)
                if keep:
                    current.fields[ext] = tar.extractfile(member).read()
        except tarfile.TarError as exc:
            raise ShardError(f"shard {path} is damaged after sample {index}: {exc}") from None
        if current is not None:
            yield index, current if keep else None


def count_samples(path: str) -> int:
    """Samples in a shard, from the tar headers only."""
    return sum(1 for _ in _samples(path, wanted=lambda i: False))


def _audio_fields(sample: RawSample) -> list[tuple[int, str]]:
    """(clip index, field) of the audio members: ``N.ext`` is clip N; a bare ``flac``/``wav``/... is clip 0."""
    found = []
    for ext in sample.fields:
        if ext == "json":
            continue
        head, _, rest = ext.partition(".")
        if head.isdigit() and rest:
            found.append((int(head), ext))
        elif ext.lower() in AUDIO_EXTENSIONS:
            found.append((0, ext))
    return sorted(found)


AUDIO_EXTENSIONS = {"wav", "flac", "ogg", "mp3", "opus", "aiff", "aif", "au", "w64", "caf"}


def to_example(shard: str, sample: RawSample, *, require_response: bool = True) -> Example:
    where = f"{shard}:{sample.key}"
    if "json" not in sample.fields:
        raise ShardError(f"{where}: sample has no {sample.key}.json member (have: {', '.join(sample.fields)})")
    try:
        record = json.loads(sample.fields["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{where}.json: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ShardError(f"{where}.json: expected a JSON object")
    for key in ("prompt",) + (("response",) if require_response else ()):
        if not isinstance(record.get(key), str):
            raise ShardError(f"{where}.json: missing or non-string field '{key}'")
    clips = _audio_fields(sample)
    if not clips:
        raise ShardError(f"{where}: sample has no audio member ({sample.key}.0.flac, {sample.key}.0.wav, ...)")
    indices = [i for i, _ in clips]
    if indices != list(range(len(clips))):
        raise ShardError(f"{where}: audio members must be numbered 0, 1, ... without gaps, got {indices}")
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    return Example(
        id=str(record.get("id", sample.key)),
        audio=[AudioBlob(f"{shard}/{sample.key}.{ext}", sample.fields[ext]) for _, ext in clips],
        prompt=record["prompt"],
        response=record.get("response"),
        source=where,
        meta=dict(meta),
    )


def read_shard(path: str, *, require_response: bool = True) -> Iterator[Example]:
    """Every example of one shard, in order."""
    for _, sample in _samples(path):
        yield to_example(path, sample, require_response=require_response)


# --------------------------------------------------------------------------- writing
@dataclass
class ShardWriteReport:
    shards: list[Path]
    examples: int
    bytes: int
    skipped: list[str]

    @property
    def pattern(self) -> str:
        """A brace pattern naming every shard written (for data.train)."""
        if len(self.shards) == 1:
            return str(self.shards[0])
        first, last = self.shards[0].name, self.shards[-1].name
        number = re.search(r"(\d+)(?=\.tar$)", first)
        lo, hi = number.group(1), re.search(r"(\d+)(?=\.tar$)", last).group(1)
        return str(self.shards[0].with_name(first[: number.start()] + f"{{{lo}..{hi}}}" + first[number.end():]))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(manifest: str | Path, out_dir: str | Path, *, prefix: str | None = None,
                 max_per_shard: int = 1000, max_shard_bytes: float | None = 1 << 30, format: str = "auto",
                 skip_bad_audio: bool = False, progress: bool = True) -> ShardWriteReport:
    """Copy a manifest's examples and audio bytes into ``OUT_DIR/PREFIX-000000.tar``, ... .

    A shard closes at ``max_per_shard`` examples or once it passes ``max_shard_bytes``; each is
    written under a temporary name and renamed when complete. Audio is checked first (as training
    does), so shards hold only readable clips.
    """
    from tqdm.auto import tqdm

    if max_per_shard < 1:
        raise ValueError("max_per_shard must be >= 1")
    examples = read_manifest(manifest, format)
    examples, problems = check_audio_files(examples, skip_bad=skip_bad_audio)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or Path(manifest).stem
    written: list[Path] = []
    total_bytes = 0
    tar, tmp, in_shard, shard_bytes = None, None, 0, 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp, written[-1])
            tar = None

    bar = tqdm(total=len(examples), desc="writing shards", unit="ex", disable=not progress)
    try:
        for number, example in enumerate(examples):
            if tar is None or in_shard >= max_per_shard or (max_shard_bytes and shard_bytes >= max_shard_bytes):
                close()
                written.append(out / f"{prefix}-{len(written):06d}.tar")
                tmp = written[-1].with_name(written[-1].name + ".tmp")
                tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
                in_shard = shard_bytes = 0
            key = f"{number:06d}"
            record = {"id": example.id, "prompt": example.prompt, "response": example.response, "meta": example.meta}
            members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
            for i, clip in enumerate(example.audio):
                members.append((f"{key}.{i}{Path(clip).suffix.lower() or '.wav'}", Path(clip).read_bytes()))
            for name, data in members:
                _add(tar, name, data)
                shard_bytes += len(data)
                total_bytes += len(data)
            in_shard += 1
            bar.update(1)
        close()
    finally:
        bar.close()
        if tar is not None:
            tar.close()
            Path(tmp).unlink(missing_ok=True)
    return ShardWriteReport(written, len(examples), total_bytes, problems)


# --------------------------------------------------------------------------- training stream
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
    """Training batches streamed from WebDataset shards (a :class:`~alm_kit.training.data.TrainingData`).

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
            for s, raw in _samples(self.mine[k], wanted=lambda i, skip=skip: i >= skip):
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
            for s, raw in _samples(self.mine[k], wanted=wanted.__contains__):
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
