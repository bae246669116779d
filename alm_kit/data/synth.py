"""Synthetic audio question-answering data with known answers.

`synthesize` writes real wav files plus a Mellow-style training manifest (``train.jsonl``) and an
MMAU test-mini style multiple-choice test set (``test.json``). Every answer is fixed by the audio
alone and is coarse enough (beep counts, pitch direction, loudness, order of events) that a tiny
audio-language model trained on CPU can learn it from ~4 log-mel frames per second.

Signals are generated with numpy only; each item draws from its own generator seeded with
``(seed, split, index)``, so an item never depends on how many other items were made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

from alm_kit.errors import with_choices

__all__ = ["SPEECH_TASK", "SPOKEN_WORDS", "SynthReport", "TASKS", "ensure_synth", "synth_tasks", "synthesize"]

VERSION = 1
DATASET_NAME = "alm-kit-synth"
SPEECH_TASK = "spoken_word"
SPOKEN_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "seven", "house", "water", "music")
MIN_CLIP_SECONDS = 3.0

_SPLIT_IDS = {"train": 0, "test": 1}
_PEAK_DBFS = (-6.0, -1.0)  # peak-normalisation target range for everything except `loudness`
_BACKGROUND_DBFS = (-62.0, -50.0)  # RMS of the ever-present faint background noise
_LOUDNESS_DBFS = {"loud": (-9.0, 1.0), "medium": (-20.0, 1.5), "quiet": (-34.0, 1.5)}  # event RMS
_PITCH_RATIO = (1.6, 2.5)  # "clearly higher/lower" frequency ratios
_MAX_PEAK = 0.98


@dataclass
class SynthReport:
    """What `synthesize` wrote, so callers need not re-read the metadata file."""

    out_dir: Path
    train_manifest: Path
    test_file: Path
    n_train: int
    n_test: int
    tasks: list[str]
    speech: bool


@dataclass(frozen=True)
class _Ctx:
    """Per-run constants the task generators need (no module-level state)."""

    sample_rate: int
    n_samples: int
    espeak: str | None = None
    tmp_dir: Path | None = None

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate


@dataclass(frozen=True)
class _Item:
    """One generated example: its clip(s) and the correct option text."""

    clips: list[np.ndarray]
    answer: str


@dataclass(frozen=True)
class _TaskSpec:
    """Question, fixed option set and generator of one task."""

    question: str
    options: tuple[str, ...]
    n_audio: int
    difficulty: str
    kind: str  # MMAU "task": "sound" or "speech"
    make: Callable[[np.random.Generator, _Ctx], _Item]


# --------------------------------------------------------------------------- signal helpers


def _db(x: float) -> float:
    return float(10.0 ** (x / 20.0))


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _fade(x: np.ndarray, sr: int, ms: float = 10.0) -> np.ndarray:
    """Raised-cosine fades so onsets do not click (clicks smear energy over all mel bins)."""
    n = min(int(sr * ms / 1000.0), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _tone(rng: np.random.Generator, freqs: np.ndarray, sr: int) -> np.ndarray:
    """Tone following an instantaneous-frequency track, with faint random harmonics for timbre.

    Harmonics stay at most -14 dB so the fundamental is always the dominant frequency, and are
    dropped if they would alias.
    """
    phase = 2.0 * np.pi * np.cumsum(freqs) / sr + rng.uniform(0.0, 2.0 * np.pi)
    x = np.sin(phase)
    top = float(np.max(freqs))
    for k in (2, 3):
        amp = rng.uniform(0.0, 0.2)
        if k * top < 0.45 * sr:
            x = x + amp * np.sin(k * phase)
    x /= np.max(np.abs(x)) + 1e-12
    return _fade(x, sr)


def _steady_tone(rng: np.random.Generator, freq: float, seconds: float, sr: int) -> np.ndarray:
    return _tone(rng, np.full(max(int(seconds * sr), 1), freq), sr)


def _white_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Unit-RMS white noise clipped at 2 sigma, so a loud burst cannot clip the file."""
    x = np.clip(rng.standard_normal(n), -2.0, 2.0)
    x /= np.sqrt(np.mean(x**2)) + 1e-12
    return _fade(x, sr)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Faint noise between white and pink at a random low level, present in every clip."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-rng.uniform(0.0, 1.0) / 2.0)
    x = np.fft.irfft(spec, n)
    x /= np.sqrt(np.mean(x**2)) + 1e-12
    return x * _db(rng.uniform(*_BACKGROUND_DBFS))


def _place(clip: np.ndarray, x: np.ndarray, start_s: float, sr: int) -> None:
    """Add `x` into `clip` at `start_s` seconds (truncating at the end of the clip)."""
    i = int(round(start_s * sr))
    n = min(len(x), len(clip) - i)
    if n > 0:
        clip[i : i + n] += x[:n]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def _finish(rng: np.random.Generator, events: np.ndarray, normalise: bool = True) -> np.ndarray:
    """Peak-normalise the foreground to a random level, add background noise, never clip."""
    x = events.copy()
    peak = float(np.max(np.abs(x)))
    if normalise and peak > 0:
        x *= _db(rng.uniform(*_PEAK_DBFS)) / peak
    x += _background(rng, len(x))
    peak = float(np.max(np.abs(x)))
    if peak > _MAX_PEAK:
        x *= _MAX_PEAK / peak
    return x.astype(np.float32)


def _start(rng: np.random.Generator, ctx: _Ctx, span: float, margin: float = 0.1) -> float:
    """Random onset (timing jitter) such that `span` seconds fit in the clip."""
    return float(rng.uniform(margin, max(margin, ctx.seconds - span - margin)))


# --------------------------------------------------------------------------- task generators


def _beep_clip(rng: np.random.Generator, ctx: _Ctx, count: int) -> np.ndarray:
    """`count` short beeps of one random frequency.

    Gaps are >= 0.5 s so that at 4 feature frames per second at least one whole frame of silence
    separates consecutive beeps.
    """
    sr = ctx.sample_rate
    freq = _loguniform(rng, 500.0, 2000.0)
    durs = rng.uniform(0.12, 0.2, count)
    gaps = rng.uniform(0.5, 0.65, count - 1)
    t = _start(rng, ctx, float(durs.sum() + gaps.sum()))
    clip = np.zeros(ctx.n_samples)
    for k, d in enumerate(durs):
        _place(clip, _steady_tone(rng, freq, float(d), sr), t, sr)
        t += float(d) + (float(gaps[k]) if k < count - 1 else 0.0)
    return _finish(rng, clip)


def _make_count_beeps(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    count = int(rng.integers(1, 5))
    return _Item([_beep_clip(rng, ctx, count)], ("one", "two", "three", "four")[count - 1])


def _pitch_pair(rng: np.random.Generator, relation: str) -> tuple[float, float]:
    """Two frequencies whose second is clearly higher, lower or the same as the first."""
    ratio = _loguniform(rng, *_PITCH_RATIO)
    low = _loguniform(rng, 200.0, 3000.0 / ratio)
    if relation == "same":
        f = _loguniform(rng, 250.0, 2000.0)
        return f, f
    return (low, low * ratio) if relation == "higher" else (low * ratio, low)


def _make_pitch_compare(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    sr = ctx.sample_rate
    answer = str(rng.choice(["higher", "lower", "same pitch"]))
    f1, f2 = _pitch_pair(rng, answer.split()[0])
    d1, d2, gap = rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.6)
    t = _start(rng, ctx, d1 + gap + d2)
    clip = np.zeros(ctx.n_samples)
    _place(clip, _steady_tone(rng, f1, d1, sr), t, sr)
    _place(clip, _steady_tone(rng, f2, d2, sr), t + d1 + gap, sr)
    return _Item([_finish(rng, clip)], answer)


def _sweep_track(rng: np.random.Generator, kind: str, n: int, sr: int) -> np.ndarray:
    """Instantaneous frequency of a rising/falling (>= 2.5x), steady or vibrato tone."""
    t = np.arange(n) / sr
    if kind in ("rising", "falling"):
        ratio = _loguniform(rng, 2.5, 4.0)
        low = _loguniform(rng, 200.0, 3200.0 / ratio)
        track = low * ratio ** (t / t[-1])
        return track if kind == "rising" else track[::-1].copy()
    if kind == "steady":
        return np.full(n, _loguniform(rng, 250.0, 2500.0))
    centre, depth, rate = _loguniform(rng, 300.0, 2000.0), rng.uniform(0.12, 0.25), rng.uniform(4.0, 8.0)
    return centre * (1.0 + depth * np.sin(2.0 * np.pi * rate * t + rng.uniform(0.0, 2.0 * np.pi)))


def _make_sweep_direction(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    sr = ctx.sample_rate
    answer = str(rng.choice(["rising", "falling", "steady", "warbling"]))
    dur = rng.uniform(1.0, 2.5)
    clip = np.zeros(ctx.n_samples)
    _place(clip, _tone(rng, _sweep_track(rng, answer, int(dur * sr), sr), sr), _start(rng, ctx, dur), sr)
    return _Item([_finish(rng, clip)], answer)


def _make_event_order(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    sr = ctx.sample_rate
    answer = str(rng.choice(["the tone", "the noise", "both together"]))
    d_tone, d_noise, gap = rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9), rng.uniform(0.15, 0.5)
    tone = _steady_tone(rng, _loguniform(rng, 300.0, 1500.0), d_tone, sr)
    noise = _white_noise(rng, int(d_noise * sr), sr) * _rms(tone) * _db(rng.uniform(-3.0, 3.0))
    clip = np.zeros(ctx.n_samples)
    if answer == "both together":
        t = _start(rng, ctx, max(d_tone, d_noise))
        _place(clip, tone, t, sr)
        _place(clip, noise, t, sr)
    else:
        first, second = (tone, noise) if answer == "the tone" else (noise, tone)
        t = _start(rng, ctx, (len(first) + len(second)) / sr + gap)
        _place(clip, first, t, sr)
        _place(clip, second, t + len(first) / sr + gap, sr)
    return _Item([_finish(rng, clip)], answer)


def _make_loudness(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    """Absolute level is the answer, so this task is not peak-normalised."""
    sr = ctx.sample_rate
    answer = str(rng.choice(["quiet", "medium", "loud", "silent"]))
    dur = rng.uniform(0.8, 2.0)
    if rng.random() < 0.5:
        event = _steady_tone(rng, _loguniform(rng, 250.0, 2500.0), dur, sr)
    else:
        event = _white_noise(rng, int(dur * sr), sr)
    clip = np.zeros(ctx.n_samples)
    if answer != "silent":
        centre, spread = _LOUDNESS_DBFS[answer]
        level = _db(centre + rng.uniform(-spread, spread))
        _place(clip, event * level / _rms(event), _start(rng, ctx, dur), sr)
    return _Item([_finish(rng, clip, normalise=False)], answer)


def _make_compare_count(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    answer = str(rng.choice(["first clip", "second clip", "equal count"]))
    if answer == "equal count":
        a = b = int(rng.integers(1, 5))
    else:
        pairs = [(x, y) for x in range(1, 5) for y in range(1, 5) if x > y]
        a, b = pairs[int(rng.integers(len(pairs)))]
        if answer == "second clip":
            a, b = b, a
    return _Item([_beep_clip(rng, ctx, a), _beep_clip(rng, ctx, b)], answer)


def _make_compare_pitch(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    sr = ctx.sample_rate
    answer = str(rng.choice(["first clip", "second clip", "equal pitch"]))
    relation = {"first clip": "lower", "second clip": "higher", "equal pitch": "same"}[answer]
    clips = []
    for freq in _pitch_pair(rng, relation):
        dur = rng.uniform(0.8, 2.0)
        clip = np.zeros(ctx.n_samples)
        _place(clip, _steady_tone(rng, freq, dur, sr), _start(rng, ctx, dur), sr)
        clips.append(_finish(rng, clip))
    return _Item(clips, answer)


def _espeak_word(ctx: _Ctx, word: str, pitch: int, speed: int) -> np.ndarray:
    """Speak `word` with espeak-ng, return it resampled to the target rate, silence trimmed."""
    import soxr

    assert ctx.espeak is not None and ctx.tmp_dir is not None
    wav = ctx.tmp_dir / "word.wav"
    cmd = [ctx.espeak, "-w", str(wav), "-v", "en", "-p", str(pitch), "-s", str(speed), word]
    subprocess.run(cmd, check=True, capture_output=True)
    x, sr_in = sf.read(str(wav), dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    if sr_in != ctx.sample_rate:
        x = soxr.resample(x, sr_in, ctx.sample_rate)
    loud = np.flatnonzero(np.abs(x) > 0.02 * (np.max(np.abs(x)) + 1e-12))
    return x[loud[0] : loud[-1] + 1] if len(loud) else x


def _make_spoken_word(rng: np.random.Generator, ctx: _Ctx) -> _Item:
    sr = ctx.sample_rate
    answer = str(rng.choice(SPOKEN_WORDS))
    voice = _espeak_word(ctx, answer, int(rng.integers(25, 76)), int(rng.integers(140, 191)))
    voice = voice[: int((ctx.seconds - 0.2) * sr)]
    clip = np.zeros(ctx.n_samples)
    _place(clip, _fade(voice.copy(), sr, 5.0), _start(rng, ctx, len(voice) / sr), sr)
    return _Item([_finish(rng, clip)], answer)


# Option texts are chosen so that MMAU's token string-match scores exactly one option correct.
_SPECS: dict[str, _TaskSpec] = {
    "count_beeps": _TaskSpec(
        question="how many beeps are there in the audio?",
        options=("one", "two", "three", "four"),
        n_audio=1,
        difficulty="medium",
        kind="sound",
        make=_make_count_beeps,
    ),
    "pitch_compare": _TaskSpec(
        question="is the second tone higher or lower than the first?",
        options=("higher", "lower", "same pitch", "no tone"),
        n_audio=1,
        difficulty="easy",
        kind="sound",
        make=_make_pitch_compare,
    ),
    "sweep_direction": _TaskSpec(
        question="how does the pitch of the sound change?",
        options=("rising", "falling", "steady", "warbling"),
        n_audio=1,
        difficulty="easy",
        kind="sound",
        make=_make_sweep_direction,
    ),
    "event_order": _TaskSpec(
        question="which sound comes first?",
        options=("the tone", "the noise", "both together", "neither"),
        n_audio=1,
        difficulty="medium",
        kind="sound",
        make=_make_event_order,
    ),
    "loudness": _TaskSpec(
        question="how loud is the sound?",
        options=("quiet", "medium", "loud", "silent"),
        n_audio=1,
        difficulty="easy",
        kind="sound",
        make=_make_loudness,
    ),
    "compare_count": _TaskSpec(
        question="which clip has more beeps?",
        options=("first clip", "second clip", "equal count", "neither clip"),
        n_audio=2,
        difficulty="hard",
        kind="sound",
        make=_make_compare_count,
    ),
    "compare_pitch": _TaskSpec(
        question="which clip has the higher tone?",
        options=("first clip", "second clip", "equal pitch", "neither clip"),
        n_audio=2,
        difficulty="hard",
        kind="sound",
        make=_make_compare_pitch,
    ),
    SPEECH_TASK: _TaskSpec(
        question="which word is spoken?",
        options=SPOKEN_WORDS,
        n_audio=1,
        difficulty="medium",
        kind="speech",
        make=_make_spoken_word,
    ),
}

TASKS: tuple[str, ...] = tuple(_SPECS)


# --------------------------------------------------------------------------- task selection


def _validate_names(tasks: Sequence[str]) -> list[str]:
    """Reject unknown names with a did-you-mean, drop duplicates keeping order."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for name in tasks:
        if name not in _SPECS:
            raise ValueError(with_choices(f"unknown synth task {name!r}", name, TASKS, "Valid tasks"))
        if name not in out:
            out.append(name)
    return out


def _resolve_tasks(tasks: Sequence[str] | None, speech: bool | None, espeak: str | None) -> list[str]:
    """Apply the speech rule: None = spoken_word iff espeak-ng is installed; True requires it.

    An explicit `tasks` list is taken as given (naming spoken_word requires espeak-ng);
    `speech=True` adds spoken_word to it, `speech=False` conflicts with it.
    """
    if tasks is None:
        chosen = [t for t in TASKS if t != SPEECH_TASK]
        if speech if speech is not None else espeak is not None:
            chosen.append(SPEECH_TASK)
    else:
        chosen = _validate_names(tasks)
        if speech is False and SPEECH_TASK in chosen:
            raise ValueError("tasks includes 'spoken_word' but speech=False")
        if speech is True and SPEECH_TASK not in chosen:
            chosen.append(SPEECH_TASK)
    if SPEECH_TASK in chosen and espeak is None:
        raise RuntimeError(
            "the spoken_word task needs the espeak-ng binary on PATH (e.g. `apt-get install espeak-ng`); "
            "pass speech=False or leave speech=None to skip spoken items"
        )
    if not chosen:
        raise ValueError(f"no tasks selected; valid tasks: {', '.join(TASKS)}")
    return chosen


# --------------------------------------------------------------------------- records


def _choices(rng: np.random.Generator, answer: str, options: Sequence[str]) -> list[str]:
    """The answer plus three distractors from the task's option set, in random order."""
    pool = [o for o in options if o != answer]
    picks = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
    opts = [answer, *picks]
    return [opts[i] for i in rng.permutation(4)]


def _mcq_prompt(question: str, choices: Sequence[str]) -> str:
    """Mellow's multiple-choice prompt: `question a) x b) y c) z d) w`, lower-case."""
    letters = "abcd"
    return " ".join([question] + [f"{letters[i]}) {c}" for i, c in enumerate(choices)]).lower()


def _write_item(
    split: str, index: int, task: str, seed: int, ctx: _Ctx, audio_dir: Path
) -> tuple[dict, list[str]]:
    """Generate one item, write its wav(s) and return (record fields, relative audio paths)."""
    spec = _SPECS[task]
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    item = spec.make(rng, ctx)
    choices = _choices(rng, item.answer, spec.options)
    rel: list[str] = []
    for k, clip in enumerate(item.clips):
        name = f"{split}_{index:06d}_{'ab'[k]}.wav"
        sf.write(str(audio_dir / name), clip, ctx.sample_rate, subtype="PCM_16")
        rel.append(f"audio/{name}")
    fields = {"question": spec.question, "choices": choices, "answer": item.answer}
    return fields, rel


def _train_record(index: int, task: str, fields: dict, rel: list[str]) -> dict:
    return {
        "id": f"train-{index:06d}",
        "audio": rel[0] if len(rel) == 1 else rel,
        "prompt": _mcq_prompt(fields["question"], fields["choices"]),
        "response": fields["answer"],
        "task": task,
        "choices": fields["choices"],
        "answer": fields["answer"],
    }


def _test_record(index: int, task: str, fields: dict, rel: list[str]) -> dict:
    spec = _SPECS[task]
    rec = {"id": f"test-{index:06d}", "audio_id": f"./{rel[0]}"}
    if len(rel) > 1:
        rec["audio_id_2"] = f"./{rel[1]}"
    rec.update(
        {
            "question": fields["question"],
            "choices": fields["choices"],
            "answer": fields["answer"],
            "dataset": DATASET_NAME,
            "task": spec.kind,
            "split": "test",
            "category": task,
            "sub-category": task,
            "difficulty": spec.difficulty,
        }
    )
    return rec


#: items per job sent to a worker process (enough that the cost of sending a job is small)
_CHUNK = 200


def _write_items(split: str, start: int, stop: int, chosen: Sequence[str], seed: int, ctx: _Ctx,
                 audio_dir: Path) -> list[tuple[str, dict, list[str]]]:
    """Items ``start .. stop - 1`` of a split: (task, record fields, audio paths) each. A worker's
    scratch files (espeak-ng's output) go to a folder of its own."""
    if ctx.tmp_dir is not None:
        own = ctx.tmp_dir / f"worker-{os.getpid()}"
        own.mkdir(exist_ok=True)
        ctx = replace(ctx, tmp_dir=own)
    out = []
    for i in range(start, stop):
        task = chosen[i % len(chosen)]
        out.append((task, *_write_item(split, i, task, seed, ctx, audio_dir)))
    return out


def default_workers() -> int:
    """Processes for `synthesize`: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# --------------------------------------------------------------------------- entry point


def _check_args(n_train: int, n_test: int, seed: int, sample_rate: int, clip_seconds: float) -> None:
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if sample_rate < 8000:
        raise ValueError("sample_rate must be >= 8000 Hz (tones go up to ~3.2 kHz)")
    if clip_seconds < MIN_CLIP_SECONDS:
        raise ValueError(f"clip_seconds must be >= {MIN_CLIP_SECONDS} (four beeps with gaps need ~2.8 s)")


def synthesize(
    out_dir: str | Path,
    *,
    n_train: int = 2000,
    n_test: int = 400,
    seed: int = 0,
    sample_rate: int = 16000,
    clip_seconds: float = 4.0,
    speech: bool | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> SynthReport:
    """Write a synthetic audio-QA dataset (wavs, train.jsonl, test.json, synth.json) to `out_dir`.

    Items are assigned to tasks round-robin by index; item `i` of a split depends only on
    `(seed, split, i)` and its task, so the set is the same for any number of `workers` (processes;
    default: the usable CPUs, at most 8). Existing files with the same names are overwritten.
    """
    from tqdm.auto import tqdm

    _check_args(n_train, n_test, seed, sample_rate, clip_seconds)
    espeak = shutil.which("espeak-ng")
    chosen = _resolve_tasks(tasks, speech, espeak)
    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {"train": {t: 0 for t in chosen}, "test": {t: 0 for t in chosen}}
    train_lines: list[str] = []
    test_records: list[dict] = []
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError("workers must be >= 1")
    jobs = [(split, start, min(start + _CHUNK, n)) for split, n in (("train", n_train), ("test", n_test))
            for start in range(0, n, _CHUNK)]
    with (
        tempfile.TemporaryDirectory(prefix="alm_synth_") as tmp,
        tqdm(total=n_train + n_test, desc="synth", unit="item", disable=not progress) as bar,
    ):
        ctx = _Ctx(sample_rate, int(round(clip_seconds * sample_rate)), espeak, Path(tmp))
        pool = None
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one (as torch's DataLoader does): no main-module guard needed, and the
            # workers use only numpy and soundfile, never the parent's torch thread pools
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context(method))
        try:
            make = partial(_write_items, chosen=chosen, seed=seed, ctx=ctx, audio_dir=audio_dir)
            columns = list(zip(*jobs)) or [(), (), ()]  # splits, starts, stops
            made = pool.map(make, *columns) if pool else map(make, *columns)  # both in job order
            for (split, start, _stop), done in zip(jobs, made):
                for i, (task, fields, rel) in enumerate(done, start):
                    counts[split][task] += 1
                    if split == "train":
                        train_lines.append(json.dumps(_train_record(i, task, fields, rel)))
                    else:
                        test_records.append(_test_record(i, task, fields, rel))
                bar.update(len(done))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    train_manifest = out / "train.jsonl"
    test_file = out / "test.json"
    train_manifest.write_text("".join(line + "\n" for line in train_lines), encoding="utf-8")
    test_file.write_text(json.dumps(test_records, indent=2) + "\n", encoding="utf-8")
    meta = {
        "version": VERSION,
        "dataset": DATASET_NAME,
        "seed": seed,
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "tasks": chosen,
        "speech": SPEECH_TASK in chosen,
        "n_train": n_train,
        "n_test": n_test,
        "counts": counts,
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return SynthReport(out, train_manifest, test_file, n_train, n_test, chosen, SPEECH_TASK in chosen)


def synth_tasks(tasks: Sequence[str] | None = None, speech: bool | None = None) -> list[str]:
    """The tasks `synthesize` makes with these arguments on this machine (speech=None: iff espeak-ng is installed)."""
    return _resolve_tasks(tasks, speech, shutil.which("espeak-ng"))


def ensure_synth(out_dir: str | Path, *, n_train: int = 2000, n_test: int = 400, seed: int = 0,
                 speech: bool | None = None, tasks: Sequence[str] | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """The metadata (synth.json) of a data set made with these arguments, making it when it is missing
    or was made with other ones (other tasks, seed or sizes), so that a recipe always trains and scores
    on the set it names, whichever machine made the folder first."""
    out = Path(out_dir)
    wanted = {"seed": seed, "n_train": n_train, "n_test": n_test, "tasks": synth_tasks(tasks, speech)}
    meta_path = out / "synth.json"
    if (out / "train.jsonl").exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = [f"{key} {meta.get(key)} -> {value}" for key, value in wanted.items() if meta.get(key) != value]
        if not changed:
            return meta
        log(f"{meta_path}: made with other settings ({'; '.join(changed)}): making it again")
    synthesize(out, n_train=n_train, n_test=n_test, seed=seed, speech=speech, tasks=tasks, progress=progress)
    return json.loads(meta_path.read_text(encoding="utf-8"))
