"""WebDataset tar shards: write them from a manifest, read them back (training streams them with
:class:`alm_kit.training.data.ShardData`).

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
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alm_kit.audio.io import AudioBlob
from alm_kit.data.manifest import Example, ManifestError, check_audio_files, read_manifest

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


def read_samples(path: str, wanted=None) -> Iterator[tuple[int, RawSample | None]]:
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
    return sum(1 for _ in read_samples(path, wanted=lambda i: False))


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
    for _, sample in read_samples(path):
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
