"""Frozen-encoder feature cache: encode every clip once, train from the stored features.

A frozen encoder (deterministic in eval mode, no trainable parameters) gives the same output
for a clip every time, so recomputing it each step is wasted work; encoders that train run at
every step beside the cache (:func:`cache_plan`). Entries are keyed by

* the clip's **content** (SHA-256 of the audio file's bytes, not its path), and
* the **encoder key**: a hash of the encoder's registered name, class, provider and
  version, its full ``Config`` values, its :class:`AudioSpec`, a digest of its weights
  (whatever they came from: a checkpoint file, the hub, a seeded random init), the
  storage dtype and :data:`FORMAT_VERSION`. Changing any encoder setting gives a
  different key, i.e. a miss; nothing is ever silently reused.

Two stores share that scheme: :class:`MemoryStore` (a dict, lost at exit) and
:class:`DiskStore` (one safetensors file per clip and encoder under
``<cache dir>/<encoder name>-<key[:16]>/<digest[:2]>/<digest>.safetensors``, written
atomically). docs/feature-cache.md describes the layout and its limits.

Features are always computed in fp32 and with each encoder's *evaluation* crop
(random crops are impossible from a cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from alm_kit.audio.io import AudioBlob, AudioSource, load_audio, prepare_for_specs
from alm_kit.errors import AlmKitError
from alm_kit.hashing import file_sha256
from alm_kit.interfaces import AudioFeatures

#: bump when the stored layout or what a key covers changes: old entries become misses
FORMAT_VERSION = 1
#: alm-kit's cache root (features go to $ALM_KIT_CACHE/features)
CACHE_ENV = "ALM_KIT_CACHE"
StorageDtype = Literal["float32", "float16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_cache_dir() -> Path:
    """``$ALM_KIT_CACHE/features``, else ``$XDG_CACHE_HOME/alm-kit/features`` (``~/.cache/...``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "features"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "alm-kit" / "features"


def resolve_cache_dir(configured: str | None) -> Path:
    """``training.cache_dir`` when set, else :func:`default_cache_dir` (shared by every recipe)."""
    return Path(configured).expanduser() if configured else default_cache_dir()


# --------------------------------------------------------------------------- content digests
def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DigestMemo:
    """Remembers file digests by (absolute path, size, mtime) in a small SQLite file, so that a
    warm start on 100k clips costs 100k ``stat`` calls instead of re-reading every file.

    A file rewritten with the same size within the same mtime tick is not noticed (the
    heuristic make and git use); delete the memo (``file-digests.sqlite``) to re-hash.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[str, int, int, str]] = []

    def _connect(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("CREATE TABLE IF NOT EXISTS digests "
                             "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, digest TEXT)")
        return self._db

    def digest(self, path: Path) -> str:
        path = Path(path).absolute()
        st = path.stat()
        db = self._connect()
        if db is not None:
            row = db.execute("SELECT size, mtime_ns, digest FROM digests WHERE path = ?", (str(path),)).fetchone()
            if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                return row[2]
        digest = file_sha256(path)
        if db is not None:
            self._pending.append((str(path), st.st_size, st.st_mtime_ns, digest))
            if len(self._pending) >= 1000:
                self.flush()
        return digest

    def flush(self) -> None:
        if self._db is not None and self._pending:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", self._pending)
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


# --------------------------------------------------------------------------- encoder keys
def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _provider(name: str, cls: type) -> str:
    try:
        from alm_kit.registry import get_registry

        return str(get_registry().get("encoder", name).provider)
    except Exception:  # built with a custom registry: fall back to the class's package
        from importlib.metadata import PackageNotFoundError, version

        top = cls.__module__.split(".")[0]
        try:
            return f"{top} {version(top.replace('_', '-'))}"
        except PackageNotFoundError:
            return top


def encoder_identity(name: str, encoder: torch.nn.Module, dtype: StorageDtype = "float32") -> dict[str, Any]:
    """Everything an encoder's output depends on, as plain data (stored next to its entries)."""
    cls = type(encoder)
    config = encoder.config
    return {
        "format": FORMAT_VERSION,
        "encoder": name,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "provider": _provider(name, cls),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "spec": dataclasses.asdict(encoder.spec),
        "weights": weights_digest(encoder),
        "dtype": dtype,
    }


def identity_key(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- stored entries
@dataclass
class ClipFeatures:
    """One clip's encoder output: frames (T, D), mask (T,), pooled (G,) or None."""

    frames: Tensor
    mask: Tensor
    pooled: Tensor | None = None


def split_clips(features: AudioFeatures, fixed_length: bool) -> list[ClipFeatures]:
    """Per-clip rows of a batch output, on the CPU. Variable-length streams are cut after their last
    real frame (the rest is batch padding); fixed-length ones keep every frame, masked or not."""
    frames, mask = features.frames.detach().float().cpu(), features.mask.detach().cpu()
    pooled = None if features.pooled is None else features.pooled.detach().float().cpu()
    out = []
    for i in range(frames.shape[0]):
        length = frames.shape[1]
        if not fixed_length:
            real = mask[i].nonzero()
            length = int(real[-1]) + 1 if len(real) else 1
        out.append(ClipFeatures(frames[i, :length].clone(), mask[i, :length].clone(),
                                None if pooled is None else pooled[i].clone()))
    return out


def to_tensors(clip: ClipFeatures, dtype: torch.dtype) -> dict[str, Tensor]:
    """Storage form. Runs of identical consecutive frames (HTS-AT repeats each step 32x) are stored
    once with a repeat count: exact, and 32x smaller for Mellow's SED frames."""
    frames = clip.frames.to(dtype)
    out = {"mask": clip.mask.contiguous()}
    if frames.shape[0] > 1:
        starts = torch.ones(frames.shape[0], dtype=torch.bool)
        starts[1:] = (frames[1:] != frames[:-1]).any(-1)
        if int(starts.sum()) * 2 <= frames.shape[0]:
            index = starts.nonzero().squeeze(1)
            ends = torch.cat([index[1:], torch.tensor([frames.shape[0]])])
            out["repeats"] = (ends - index).to(torch.int32)
            frames = frames[index]
    out["frames"] = frames.contiguous()
    if clip.pooled is not None:
        out["pooled"] = clip.pooled.to(dtype).contiguous()
    return out


def from_tensors(tensors: dict[str, Tensor]) -> ClipFeatures:
    frames = tensors["frames"].float()
    if "repeats" in tensors:  # output_size: no device sync when the entry lives on a GPU
        frames = frames.repeat_interleave(tensors["repeats"].long(), dim=0, output_size=tensors["mask"].shape[0])
    pooled = tensors.get("pooled")
    return ClipFeatures(frames, tensors["mask"], None if pooled is None else pooled.float())


class MemoryStore:
    """(encoder key, digest) -> ClipFeatures in this process; the default before disk caching."""

    kind = "memory"

    def __init__(self, dtype: StorageDtype = "float32", device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self._entries: dict[tuple[str, str], dict[str, Tensor]] = {}

    def prepare(self, key: str, identity: dict[str, Any]) -> None:
        pass

    def has(self, key: str, digest: str) -> bool:
        return (key, digest) in self._entries

    def get(self, key: str, digest: str) -> ClipFeatures:
        return from_tensors(self._entries[(key, digest)])

    def put(self, key: str, digest: str, clip: ClipFeatures) -> int:
        tensors = {k: v.to(self.device) for k, v in to_tensors(clip, _DTYPES[self.dtype]).items()}
        self._entries[(key, digest)] = tensors
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def __len__(self) -> int:
        return len(self._entries)


class DiskStore:
    """One safetensors file per (encoder key, clip digest), written to a temporary name and renamed.

    Several processes (DDP ranks, two runs sharing an encoder) may fill the same folder:
    a rename is atomic, and two writers of one entry write the same bytes.
    """

    kind = "disk"

    def __init__(self, root: str | Path, dtype: StorageDtype = "float32") -> None:
        self.root = Path(root)
        self.dtype = dtype
        self._folders: dict[str, Path] = {}

    def folder(self, key: str) -> Path:
        if key not in self._folders:
            raise KeyError(f"encoder key {key[:16]} was not prepared (FeatureCache.for_model does that)")
        return self._folders[key]

    def prepare(self, key: str, identity: dict[str, Any]) -> None:
        """Create the encoder's folder with an ``encoder.json`` saying what its entries were made by."""
        folder = self.root / f"{identity['encoder']}-{key[:16]}"
        self._folders[key] = folder
        info = folder / "encoder.json"
        if not info.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(info, json.dumps({"key": key, **identity}, indent=2, default=str).encode())

    def path(self, key: str, digest: str) -> Path:
        return self.folder(key) / digest[:2] / f"{digest}.safetensors"

    def has(self, key: str, digest: str) -> bool:
        return self.path(key, digest).exists()

    def get(self, key: str, digest: str) -> ClipFeatures:
        from safetensors.torch import load_file

        path = self.path(key, digest)
        try:
            return from_tensors(load_file(str(path)))
        except FileNotFoundError:
            raise FileNotFoundError(f"feature cache entry missing: {path} (was the cache folder cleaned "
                                    "during training? run `alm-kit cache RECIPE` again)") from None
        except Exception as exc:
            raise OSError(f"feature cache entry {path} is unreadable ({exc}); delete it and run "
                          "`alm-kit cache RECIPE` again") from None

    def put(self, key: str, digest: str, clip: ClipFeatures) -> int:
        from safetensors.torch import save_file

        path = self.path(key, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(to_tensors(clip, _DTYPES[self.dtype]), str(tmp),
                      metadata={"alm_kit_feature_cache": str(FORMAT_VERSION)})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path.stat().st_size

    def size_bytes(self, keys: Iterable[str]) -> int:
        total = 0
        for key in keys:
            for dirpath, _, files in os.walk(self.folder(key)):
                total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the cache
@dataclass
class CacheReport:
    clips: int = 0
    #: (clip, encoder) pairs found / computed
    hits: int = 0
    misses: int = 0
    #: bytes written by this fill; size of these encoders' folders (disk store)
    written_bytes: int = 0
    size_bytes: int | None = None

    def __str__(self) -> str:
        size = "" if self.size_bytes is None else f", cache size {self.size_bytes / 2**20:.1f} MiB"
        return (f"{self.clips} clips: {self.hits} hits, {self.misses} misses (computed), "
                f"{self.written_bytes / 2**20:.1f} MiB written{size}")


class FeatureCache:
    """Lookup side of the cache (picklable into DataLoader workers): encoder keys, a store, digests."""

    def __init__(self, keys: dict[str, str], store: MemoryStore | DiskStore,
                 fixed_length: dict[str, bool], memo: DigestMemo | None = None) -> None:
        #: encoder id (recipe order) -> encoder key
        self.keys = keys
        self.store = store
        self.fixed_length = fixed_length
        self.memo = memo or DigestMemo(None)
        #: str(path) -> content digest, for the clips seen by fill()/digest()
        self.digests: dict[str, str] = {}

    @classmethod
    def for_model(cls, model, store: MemoryStore | DiskStore, encoders: list[str] | None = None) -> FeatureCache:
        """Keys for the model's encoders, or for the ``encoders`` named (hashing their weights once)."""
        keys, fixed = {}, {}
        for (enc_id, encoder), spec in zip(model.encoders.items(), model.config.encoders):
            if encoders is not None and enc_id not in encoders:
                continue
            identity = encoder_identity(spec.name, encoder, store.dtype)
            keys[enc_id] = identity_key(identity)
            store.prepare(keys[enc_id], identity)
            fixed[enc_id] = encoder.info.num_frames is not None
        memo = DigestMemo(store.root / "file-digests.sqlite") if isinstance(store, DiskStore) else None
        return cls(keys, store, fixed, memo)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["memo"] = DigestMemo(None)  # sqlite connections do not cross processes
        return state

    def digest(self, source: AudioSource) -> str:
        if isinstance(source, AudioBlob):
            return bytes_digest(source.data)
        name = str(source)
        if name not in self.digests:
            self.digests[name] = self.memo.digest(Path(source))
        return self.digests[name]

    def missing(self, digest: str) -> list[str]:
        return [enc for enc, key in self.keys.items() if not self.store.has(key, digest)]

    def on_device(self, sources: Iterable[AudioSource], device: torch.device, budget_bytes: int) -> FeatureCache | None:
        """A copy of this cache's entries for ``sources`` held in ``device`` memory (lookups then give
        tensors already on the GPU: no decoding, no copies, no worker processes), or None when they
        take more than ``budget_bytes``."""
        store = MemoryStore(self.store.dtype, device)
        used = 0
        for source in _unique(sources):
            digest = self.digest(source)
            for key in self.keys.values():
                if store.has(key, digest):
                    continue
                used += store.put(key, digest, self.store.get(key, digest))
                if used > budget_bytes:
                    return None
        resident = FeatureCache(self.keys, store, self.fixed_length)
        resident.digests = dict(self.digests)
        return resident

    def lookup(self, source: AudioSource) -> dict[str, ClipFeatures]:
        digest = self.digest(source)
        return {enc: self.store.get(key, digest) for enc, key in self.keys.items()}

    @torch.no_grad()
    def fill(self, model, sources: Iterable[AudioSource], *, total: int | None = None, batch_size: int = 16,
             progress: bool = True, desc: str = "caching encoder features") -> CacheReport:
        """Encode (in batches, fp32, eval crop) every clip some encoder has no entry for."""
        from tqdm.auto import tqdm

        from alm_kit.data.batch import collate_waveforms

        report = CacheReport()
        specs = {enc: spec for enc, spec in model.audio_specs.items() if enc in self.keys}
        was_training = model.training
        model.eval()
        bar = tqdm(total=total, desc=desc, unit="clip", disable=not progress)
        seen: set[str] = set()
        pending: list[tuple[str, AudioSource, list[str]]] = []

        def flush() -> None:
            clips = [prepare_for_specs(*load_audio(src), specs) for _, src, _ in pending]
            encoders = sorted({e for _, _, todo in pending for e in todo}, key=list(self.keys).index)
            waveforms, lengths = collate_waveforms(clips, encoders)
            device = model.device
            for enc in encoders:
                out = model.encoders[enc](waveforms[enc].to(device), lengths[enc].to(device))
                for (digest, _, todo), clip in zip(pending, split_clips(out, self.fixed_length[enc])):
                    if enc in todo:
                        report.written_bytes += self.store.put(self.keys[enc], digest, clip)
            bar.set_postfix(hits=report.hits, misses=report.misses)
            pending.clear()

        try:
            for source in _unique(sources):
                bar.update(1)
                digest = self.digest(source)
                if digest in seen:
                    continue
                seen.add(digest)
                report.clips += 1
                todo = self.missing(digest)
                report.hits += len(self.keys) - len(todo)
                report.misses += len(todo)
                if todo:
                    pending.append((digest, source, todo))
                    if len(pending) >= batch_size:
                        flush()
            if pending:
                flush()
        finally:
            bar.close()
            self.memo.flush()
            model.train(was_training)
        if isinstance(self.store, DiskStore):
            report.size_bytes = self.store.size_bytes(self.keys.values())
        return report


def _unique(sources: Iterable[AudioSource]) -> Iterator[AudioSource]:
    """Drop repeated paths early (blobs are deduplicated by digest)."""
    paths: set[str] = set()
    for source in sources:
        if not isinstance(source, AudioBlob):
            name = str(source)
            if name in paths:
                continue
            paths.add(name)
        yield source


def cache_plan(setting: str, model) -> tuple[Literal["off", "memory", "disk"], list[str]]:
    """``training.cache_features`` -> (the store to use, the encoders it holds).

    Only encoders whose features never change in training can be cached: frozen, with no
    ``trainable`` parameters (``model.cacheable_encoders``); the others run at every step on the
    clips, as without a cache. ``auto``: a disk cache of every cacheable encoder, unless one of the
    encoders left to run crops clips at random in training (its random crop and the cache's
    evaluation crop would see different parts of a clip: then no cache). ``memory``/``disk``: every
    cacheable encoder, an error when there is none.
    """
    if setting == "off":
        return "off", []
    cacheable = model.cacheable_encoders
    if not cacheable:
        if setting in ("memory", "disk"):
            raise AlmKitError(f"training.cache_features: {setting} needs at least one encoder frozen (train: frozen, "
                              "no trainable parameters), and every encoder of this recipe trains; use auto or off")
        return "off", []
    if setting == "auto":
        return ("off", []) if live_random_crops(model) else ("disk", cacheable)
    return setting, cacheable  # type: ignore[return-value]


def live_random_crops(model) -> list[str]:
    """Encoders that cannot be cached (they train) and crop clips at random in training."""
    cacheable = model.cacheable_encoders
    return [name for name, spec in model.audio_specs.items() if name not in cacheable and spec.crop == "random"]


def open_cache(model, training) -> FeatureCache | None:
    """The feature cache ``training.*`` asks for (None when off), before filling."""
    mode, encoders = cache_plan(training.cache_features, model)
    if mode == "off":
        return None
    store = DiskStore(resolve_cache_dir(training.cache_dir), training.cache_dtype) if mode == "disk" \
        else MemoryStore(training.cache_dtype)
    return FeatureCache.for_model(model, store, encoders)


def random_crop_encoders(model, cache: FeatureCache) -> tuple[list[str], list[str]]:
    """Encoders whose training crop is random, (held by the cache: they get the evaluation crop
    instead; run live beside a cache: they see another part of a clip than the cached encoders)."""
    random = [name for name, spec in model.audio_specs.items() if spec.crop == "random"]
    return [n for n in random if n in cache.keys], [n for n in random if n not in cache.keys]
