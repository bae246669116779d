"""Dataset and batching: each clip decoded once, prepared once per encoder, clips of a batch flattened."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from alm_kit.audio.io import AudioError, AudioSource, prepare_for_specs
from alm_kit.audio.io import load_audio as load_audio_file
from alm_kit.data.manifest import Example
from alm_kit.interfaces import AudioFeatures, AudioSpec


@dataclass
class Batch:
    ids: list[str]
    prompts: list[str]
    responses: list[str] | None
    #: clips of example i are rows sum(clips_per_example[:i]) ... of every clip tensor
    clips_per_example: list[int]
    #: identity of each clip (its path, or shard/member name)
    clip_keys: list[str]
    #: per encoder id: (clips, samples) and (clips,) real lengths, for the encoders a cache does not hold
    waveforms: dict[str, Tensor] | None = None
    lengths: dict[str, Tensor] | None = None
    #: per encoder id the features a cache holds (the other encoders get waveforms)
    features: dict[str, AudioFeatures] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (DataLoader ``pin_memory``), so they reach a GPU with
        non-blocking copies while the previous step runs."""
        pin = lambda t: t.pin_memory() if t.device.type == "cpu" else t  # noqa: E731
        if self.waveforms is not None:
            self.waveforms = {k: pin(v) for k, v in self.waveforms.items()}
            self.lengths = {k: pin(v) for k, v in self.lengths.items()}
        if self.features is not None:
            self.features = {k: AudioFeatures(pin(f.frames), pin(f.mask), None if f.pooled is None else pin(f.pooled))
                             for k, f in self.features.items()}
        return self


class AudioTextDataset(torch.utils.data.Dataset):
    """Examples -> dicts with per-encoder waveforms, and cached encoder features for the encoders ``cache`` holds.

    ``load_audio=False`` (without a cache) yields text only.
    """

    def __init__(self, examples: list[Example], specs: Mapping[str, AudioSpec], *, train: bool = False,
                 seed: int = 0, load_audio: bool = True, cache: FeatureLookup | None = None) -> None:
        self.examples = examples
        self.specs = dict(specs)
        self.train = train
        self.seed = seed
        self.load_audio = load_audio
        self.cache = cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return example_item(self.examples[index], self.specs, train=self.train, rng=rng,
                            load_audio=self.load_audio, cache=self.cache)


class FeatureLookup(Protocol):
    """What the data path needs of a feature cache (alm_kit.training.feature_cache.FeatureCache)."""

    #: the encoder ids it holds features for (the others get waveforms)
    keys: Mapping[str, str]

    def lookup(self, source: AudioSource) -> Mapping[str, Any]: ...


def example_item(example: Example, specs: Mapping[str, AudioSpec], *, train: bool, rng: np.random.Generator,
                 load_audio: bool = True, cache: FeatureLookup | None = None) -> dict:
    """One example for :func:`collate`: its clips decoded and fitted per encoder, or their cached features
    (and, for the encoders the cache does not hold, the fitted clips)."""
    item: dict[str, Any] = {"example": example, "clips": []}
    if cache is not None:
        item["features"] = [cache.lookup(src) for src in example.audio]
        specs = {enc: spec for enc, spec in specs.items() if enc not in cache.keys}
        if not specs:
            return item
    clips = item["clips"]
    if load_audio or cache is not None:
        for source in example.audio:
            try:
                wave, rate = load_audio_file(source)
            except AudioError as exc:
                raise AudioError(f"{example.source or example.id}: {exc}") from None
            clips.append(prepare_for_specs(wave, rate, specs, train=train, rng=rng))
    return item


def collate_waveforms(clips: list[dict[str, tuple[np.ndarray, int]]], encoder_ids: list[str]
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stack prepared clips per encoder, zero-padding variable-length ones."""
    waveforms, lengths = {}, {}
    for enc in encoder_ids:
        waves = [c[enc][0] for c in clips]
        longest = max(len(w) for w in waves)
        stacked = np.zeros((len(waves), longest), dtype=np.float32)
        for i, w in enumerate(waves):
            stacked[i, : len(w)] = w
        waveforms[enc] = torch.from_numpy(stacked)
        lengths[enc] = torch.tensor([c[enc][1] for c in clips], dtype=torch.long)
    return waveforms, lengths


def collate_features(per_clip: list[Mapping[str, Any]], encoder_ids: list[str]) -> dict[str, AudioFeatures]:
    """Stack cached per-clip features (``frames`` (T, D), ``mask`` (T,), ``pooled``) per encoder,
    zero-padding (mask False) clips with fewer frames."""
    out = {}
    for enc in encoder_ids:
        rows = [clip[enc] for clip in per_clip]
        lengths = {r.frames.shape[0] for r in rows}
        if len(lengths) == 1:
            frames = torch.stack([r.frames for r in rows])
            mask = torch.stack([r.mask for r in rows])
        else:
            longest = max(lengths)
            frames = rows[0].frames.new_zeros(len(rows), longest, rows[0].frames.shape[-1])
            mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].mask.device)
            for i, r in enumerate(rows):
                frames[i, : len(r.frames)], mask[i, : len(r.mask)] = r.frames, r.mask
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        out[enc] = AudioFeatures(frames, mask, pooled)
    return out


def collate(items: list[dict]) -> Batch:
    examples: list[Example] = [item["example"] for item in items]
    clips = [clip for item in items for clip in item["clips"]]
    responses = [e.response for e in examples]
    batch = Batch(
        ids=[e.id for e in examples],
        prompts=[e.prompt for e in examples],
        responses=None if any(r is None for r in responses) else responses,
        clips_per_example=[len(e.audio) for e in examples],
        clip_keys=[str(p) for e in examples for p in e.audio],
    )
    if clips:
        batch.waveforms, batch.lengths = collate_waveforms(clips, list(clips[0]))
    features = [clip for item in items for clip in item.get("features", ())]
    if features:
        batch.features = collate_features(features, list(features[0]))
    return batch
