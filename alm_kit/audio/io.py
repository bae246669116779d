"""Decode (soundfile), mix to mono, resample (soxr) and fit each clip to an encoder's AudioSpec."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alm_kit.audio.wav import warn_if_cut_short
from alm_kit.errors import AudioError  # noqa: F401  (re-exported)
from alm_kit.interfaces import AudioSpec


@dataclass(frozen=True)
class AudioBlob:
    """An encoded audio file held in memory (a member of a WebDataset shard), decoded like a file."""

    #: where it came from, for messages and batch keys: "shard.tar/000123.0.flac"
    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


#: a clip of an example: a file on disk or the bytes of one
AudioSource = Path | AudioBlob


def load_audio(path: str | Path | AudioBlob, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any format libsndfile reads (wav, flac, ogg, ...) to float32 mono.

    With ``max_seconds`` a longer clip is refused from its header, before anything is decoded,
    and decoding stops at that length whatever the header says: a small compressed upload (an
    hour of silent FLAC is 180 KB) cannot make the process hold hours of samples. Channels are
    mixed down block by block, so a many-channel file never sits in memory whole.
    """
    import soundfile as sf

    if isinstance(path, AudioBlob):
        source, path = io.BytesIO(path.data), path.name
    else:
        path = Path(path)
        check_audio_path(path)
        source = str(path)
    try:
        with sf.SoundFile(source) as f:
            rate = f.samplerate
            # libsndfile reports 2**63 - 1 frames when the header does not say (a streamed FLAC)
            if max_seconds is not None and f.frames < 2**62 and f.frames / rate > max_seconds:
                raise AudioError(f"{path}: audio is {f.frames / rate:.1f} s long; at most {max_seconds:g} s "
                                 f"is accepted")
            cap = None if max_seconds is None else int(max_seconds * rate) + 1
            wave = _read_mono(f, cap)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types
        raise AudioError(f"cannot decode audio file {path}: {_reason(exc)}") from None
    if wave.size == 0:
        raise AudioError(f"audio file is empty (0 samples): {path}")
    if cap is not None and len(wave) >= cap:  # the header understated the length
        raise AudioError(f"{path}: audio is longer than {max_seconds:g} s; at most {max_seconds:g} s is accepted")
    warn_if_cut_short(source, str(path))
    return check_waveform(wave, str(path)), int(rate)


def _read_mono(f, cap: int | None) -> np.ndarray:
    """At most ``cap`` frames of an open SoundFile, mixed to mono one block (~4 MB) at a time."""
    block = max(1, 2**20 // f.channels)
    parts, total = [], 0
    while cap is None or total < cap:
        data = f.read(block if cap is None else min(block, cap - total), dtype="float32", always_2d=True)
        if len(data) == 0:
            break
        parts.append(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
        total += len(data)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _reason(exc: Exception) -> str:
    """libsndfile's reason without the object reprs (``<_io.BytesIO object at 0x...>``) it names files by."""
    reason = getattr(exc, "error_string", None) or str(exc)
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", reason)


def check_audio_path(path: Path) -> None:
    """What can be said before decoding, said plainly: libsndfile reports a missing file, a folder
    and an empty file alike as "Format not recognised"."""
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")


def check_waveform(wave: np.ndarray, name: str = "waveform") -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:  # (channels, samples) or (samples, channels): mix down the short axis
        wave = wave.mean(axis=0 if wave.shape[0] < wave.shape[1] else 1)
    if wave.ndim != 1:
        raise AudioError(f"{name}: expected mono or (channels, samples) audio, got shape {wave.shape}")
    if wave.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return wave


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return wave
    import soxr

    return soxr.resample(wave, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def fit_length(
    wave: np.ndarray, spec: AudioSpec, *, train: bool = False, rng: np.random.Generator | None = None,
    position: float | None = None,
) -> tuple[np.ndarray, int]:
    """Crop or pad to ``spec.clip_samples``; return the clip and how many of its samples are real.

    Random crops happen only in training; at evaluation a "random" crop becomes a
    deterministic crop from the start, so that results are reproducible. ``position`` in
    [0, 1) places a random crop within the possible starts (drawn from ``rng`` when None).

    Short clips: ``zero`` appends zeros; ``repeat`` tiles the clip to the end (Mellow's
    inference); ``repeatpad`` repeats it a whole number of times and appends zeros, exactly
    laion-clap's ``repeatpad`` (the zeros are padding). ``none`` leaves the clip short.
    """
    target = spec.clip_samples
    if target is None:
        return wave, len(wave)
    if len(wave) > target:
        start = 0
        if spec.crop == "center":
            start = (len(wave) - target) // 2
        elif spec.crop == "random" and train:
            if position is None:
                position = float((rng or np.random.default_rng()).random())
            start = min(int(position * (len(wave) - target + 1)), len(wave) - target)
        return wave[start : start + target], target
    if len(wave) == target or spec.pad == "none":
        return wave, len(wave)
    if spec.pad == "repeat":
        reps = -(-target // len(wave))
        return np.tile(wave, reps)[:target], target
    real = len(wave) * (target // len(wave) if spec.pad == "repeatpad" else 1)
    out = np.zeros(target, dtype=np.float32)
    out[:real] = np.tile(wave, real // len(wave))
    return out, real


def prepare_for_specs(
    wave: np.ndarray,
    rate: int,
    specs: Mapping[str, AudioSpec],
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> dict[str, tuple[np.ndarray, int]]:
    """One clip for every encoder: resampled once per distinct rate, then fitted per spec.

    In training one random position is drawn per clip and shared by every encoder's random
    crop, so encoders with the same ``clip_seconds`` see the same stretch of audio.
    """
    by_rate: dict[int, np.ndarray] = {}
    out = {}
    position = float((rng or np.random.default_rng()).random()) if train else None
    for name, spec in specs.items():
        if spec.sample_rate not in by_rate:
            by_rate[spec.sample_rate] = resample(wave, rate, spec.sample_rate)
        out[name] = fit_length(by_rate[spec.sample_rate], spec, train=train, position=position)
    return out
