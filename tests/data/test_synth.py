"""Tests for alm_kit.data.synth: formats, determinism, and that every answer is really in the audio.

The signal checks re-derive each answer from the wav with simple detectors (energy envelope,
FFT peak tracking, RMS levels), so they fail if the generator ever writes a wrong answer.
"""

from __future__ import annotations

import itertools
import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from alm_kit.data import synth
from alm_kit.data.synth import SPOKEN_WORDS, TASKS, SynthReport, synthesize

SR = 16000
CLIP_S = 4.0
SOUND_TASKS = [t for t in TASKS if t != "spoken_word"]
TWO_AUDIO = {"compare_count", "compare_pitch"}
TRAIN_KEYS = ["id", "audio", "prompt", "response", "task", "choices", "answer"]
TEST_KEYS = {
    "id",
    "audio_id",
    "question",
    "choices",
    "answer",
    "dataset",
    "task",
    "split",
    "category",
    "sub-category",
    "difficulty",
}


# --------------------------------------------------------------------------- helpers


def mmau_string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's evaluation.py scorer (alm-kit's implementation, pinned against the official cases in
    tests/evaluation/test_evaluation_scoring.py)."""
    from alm_kit.evaluation.scoring import string_match

    return string_match(answer, prediction, choices)


def read(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float64")
    assert sr == SR
    return x


def envelope_db(x: np.ndarray, win_s: float) -> np.ndarray:
    n = int(win_s * SR)
    frames = x[: len(x) // n * n].reshape(-1, n)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


def count_beeps(x: np.ndarray) -> int:
    """Runs of 10 ms frames within 20 dB of the loudest one, merging dips shorter than 50 ms."""
    env = envelope_db(x, 0.01)
    active = env > env.max() - 20
    runs, gap = 0, 99
    for on in active:
        if on:
            if gap >= 5:
                runs += 1
            gap = 0
        else:
            gap += 1
    return runs


def active_runs(x: np.ndarray) -> list[tuple[int, int]]:
    """Sample ranges of the loud events (10 ms frames within 20 dB of the max)."""
    env = envelope_db(x, 0.01)
    active = np.concatenate([[False], env > env.max() - 20, [False]])
    edges = np.flatnonzero(np.diff(active.astype(int)))
    return [(int(a) * 160, int(b) * 160) for a, b in zip(edges[::2], edges[1::2])]


def freq_track(x: np.ndarray, win: int = 512, hop: int = 128) -> np.ndarray:
    """Dominant frequency (Hz) of each frame within 20 dB of the loudest frame."""
    w = np.hanning(win)
    frames = np.stack([x[i : i + win] * w for i in range(0, len(x) - win, hop)])
    energy = np.sum(frames**2, axis=1)
    frames = frames[energy > energy.max() / 100]
    spec = np.abs(np.fft.rfft(frames, n=8192, axis=1))
    freqs = np.fft.rfftfreq(8192, 1 / SR)
    band = (freqs > 80) & (freqs < 6000)
    return freqs[band][np.argmax(spec[:, band], axis=1)]


def dominant_freq(x: np.ndarray) -> float:
    return float(np.median(freq_track(x)))


def classify_sweep(x: np.ndarray) -> str:
    track = freq_track(x)[3:-3]  # drop fade-in/out frames
    assert len(track) >= 10
    ratio = np.median(track[-3:]) / np.median(track[:3])
    diffs = np.diff(np.convolve(track, np.ones(3) / 3, mode="valid"))
    significant = diffs[np.abs(diffs) > 0.004 * np.median(track)]
    turns = int(np.sum(np.diff(np.sign(significant)) != 0))
    spread = track.max() / track.min()
    if ratio > 1.8 and np.mean(diffs >= 0) > 0.9:
        return "rising"
    if ratio < 1 / 1.8 and np.mean(diffs <= 0) > 0.9:
        return "falling"
    if spread < 1.03:
        return "steady"
    if spread > 1.15 and turns >= 4 and 1 / 1.8 < ratio < 1.8:
        return "warbling"
    return "unclear"


def relation(f1: float, f2: float) -> str:
    r = f2 / f1
    if r > 1.45:
        return "higher"
    if r < 1 / 1.45:
        return "lower"
    if 0.98 < r < 1.02:
        return "same"
    return "unclear"


def onsets(x: np.ndarray) -> tuple[float, float]:
    """Onset times (s) of the tone (narrow spectral peak) and the noise burst (5-8 kHz energy)."""
    win, hop = 1024, 256
    w = np.hanning(win)
    frames = np.stack([x[i : i + win] * w for i in range(0, len(x) - win, hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(win, 1 / SR)
    high = power[:, (freqs > 5000) & (freqs < 8000)].sum(axis=1)
    noise_on = high > 100 * np.median(high)
    mid = power[:, (freqs > 200) & (freqs < 4000)]
    tone_band = power[:, (freqs > 250) & (freqs < 1600)]
    tone_on = tone_band.max(axis=1) > 40 * np.median(mid, axis=1)
    tone_on &= tone_band.max(axis=1) > 1e-3 * tone_band.max()
    assert noise_on.any() and tone_on.any()
    return np.argmax(tone_on) * hop / SR, np.argmax(noise_on) * hop / SR


def records(report: SynthReport) -> list[tuple[str, list[Path], str]]:
    """(task, wav paths, answer) for every train and test item."""
    out = []
    root = report.out_dir
    for line in report.train_manifest.read_text().splitlines():
        rec = json.loads(line)
        audio = rec["audio"] if isinstance(rec["audio"], list) else [rec["audio"]]
        out.append((rec["task"], [root / a for a in audio], rec["answer"]))
    for rec in json.loads(report.test_file.read_text()):
        audio = [rec["audio_id"]] + ([rec["audio_id_2"]] if "audio_id_2" in rec else [])
        out.append((rec["category"], [root / a for a in audio], rec["answer"]))
    return out


def by_task(report: SynthReport, task: str) -> list[tuple[list[Path], str]]:
    items = [(paths, answer) for t, paths, answer in records(report) if t == task]
    assert items, task
    return items


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    """10 train + 4 test items per sound task."""
    out = tmp_path_factory.mktemp("synth")
    return synthesize(out, n_train=70, n_test=28, seed=3, speech=False, progress=False)


# --------------------------------------------------------------------------- formats


def test_report_and_metadata(data: SynthReport) -> None:
    assert data.train_manifest == data.out_dir / "train.jsonl"
    assert data.test_file == data.out_dir / "test.json"
    assert (data.n_train, data.n_test, data.speech) == (70, 28, False)
    assert data.tasks == SOUND_TASKS
    meta = json.loads((data.out_dir / "synth.json").read_text())
    assert meta["version"] == 1
    assert (meta["seed"], meta["sample_rate"], meta["clip_seconds"]) == (3, SR, CLIP_S)
    assert meta["tasks"] == SOUND_TASKS
    assert meta["counts"]["train"] == {t: 10 for t in SOUND_TASKS}
    assert meta["counts"]["test"] == {t: 4 for t in SOUND_TASKS}


def test_train_manifest_format(data: SynthReport) -> None:
    lines = data.train_manifest.read_text().splitlines()
    assert len(lines) == 70
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert list(rec) == TRAIN_KEYS
        assert rec["id"] == f"train-{i:06d}"
        assert rec["task"] == SOUND_TASKS[i % len(SOUND_TASKS)]
        if rec["task"] in TWO_AUDIO:
            assert rec["audio"] == [f"audio/train_{i:06d}_a.wav", f"audio/train_{i:06d}_b.wav"]
        else:
            assert rec["audio"] == f"audio/train_{i:06d}_a.wav"
        choices = rec["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert rec["answer"] in choices and rec["response"] == rec["answer"]
        question = synth._SPECS[rec["task"]].question
        expected = f"{question} a) {choices[0]} b) {choices[1]} c) {choices[2]} d) {choices[3]}"
        assert rec["prompt"] == expected and rec["prompt"] == rec["prompt"].lower()
        assert set(choices) <= set(synth._SPECS[rec["task"]].options)


def test_test_file_format(data: SynthReport) -> None:
    recs = json.loads(data.test_file.read_text())
    assert isinstance(recs, list) and len(recs) == 28
    for i, rec in enumerate(recs):
        task = SOUND_TASKS[i % len(SOUND_TASKS)]
        two = task in TWO_AUDIO
        assert set(rec) == TEST_KEYS | ({"audio_id_2"} if two else set())
        assert rec["id"] == f"test-{i:06d}"
        assert rec["audio_id"] == f"./audio/test_{i:06d}_a.wav"
        if two:
            assert rec["audio_id_2"] == f"./audio/test_{i:06d}_b.wav"
        assert rec["question"] == synth._SPECS[task].question
        assert len(rec["choices"]) == 4 and len(set(rec["choices"])) == 4
        assert rec["answer"] in rec["choices"]
        assert (rec["dataset"], rec["task"], rec["split"]) == ("alm-kit-synth", "sound", "test")
        assert rec["category"] == rec["sub-category"] == task
        assert rec["difficulty"] in {"easy", "medium", "hard"}


def test_audio_files(data: SynthReport) -> None:
    for _, paths, _ in records(data):
        for path in paths:
            info = sf.info(str(path))
            assert (info.channels, info.samplerate, info.frames) == (1, SR, int(CLIP_S * SR))
            assert info.subtype == "PCM_16"
            x = read(path)
            assert 0 < np.max(np.abs(x)) < 0.99  # never clipped, never digital silence


def test_answer_letters_vary(data: SynthReport) -> None:
    positions = [
        rec["choices"].index(rec["answer"])
        for rec in map(json.loads, data.train_manifest.read_text().splitlines())
    ]
    assert len(set(positions)) == 4


# --------------------------------------------------------------------------- determinism


def test_deterministic(tmp_path: Path) -> None:
    kwargs = {"n_train": 14, "n_test": 7, "progress": False, "speech": False}
    a = synthesize(tmp_path / "a", seed=5, **kwargs)
    b = synthesize(tmp_path / "b", seed=5, **kwargs)
    c = synthesize(tmp_path / "c", seed=6, **kwargs)
    assert a.train_manifest.read_text() == b.train_manifest.read_text()
    assert a.test_file.read_text() == b.test_file.read_text()
    wavs = sorted(p.name for p in (a.out_dir / "audio").iterdir())
    assert wavs == sorted(p.name for p in (b.out_dir / "audio").iterdir())
    assert len(wavs) == 14 + 7 + 2 * 2 + 2  # two-audio tasks have a second clip
    for name in wavs:
        assert (a.out_dir / "audio" / name).read_bytes() == (b.out_dir / "audio" / name).read_bytes()
    differ = [(a.out_dir / "audio" / n).read_bytes() != (c.out_dir / "audio" / n).read_bytes() for n in wavs]
    assert all(differ)
    assert a.train_manifest.read_text() != c.train_manifest.read_text()


def test_worker_processes_make_the_same_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Items are made in jobs of _CHUNK by worker processes: byte for byte the set one process makes."""
    import concurrent.futures

    import alm_kit.data.synth as synth

    pools = []

    class Counting(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args[0] if args else kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Counting)
    monkeypatch.setattr(synth, "_CHUNK", 4)
    kwargs = {"n_train": 14, "n_test": 7, "progress": False, "speech": False, "seed": 3}
    one = synthesize(tmp_path / "one", workers=1, **kwargs)
    assert pools == []
    many = synthesize(tmp_path / "many", workers=3, **kwargs)
    assert pools == [3]
    assert one.train_manifest.read_text() == many.train_manifest.read_text()
    assert one.test_file.read_text() == many.test_file.read_text()
    # records of later jobs keep their item index: ids and wav names run on across jobs
    records = [json.loads(line) for line in many.train_manifest.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"train-{i:06d}" for i in range(14)]
    assert all(f"train_{i:06d}_a.wav" in str(r["audio"]) for i, r in enumerate(records))
    assert (one.out_dir / "synth.json").read_text() == (many.out_dir / "synth.json").read_text()
    wavs = sorted(p.name for p in (one.out_dir / "audio").iterdir())
    assert wavs == sorted(p.name for p in (many.out_dir / "audio").iterdir()) and len(wavs) == 14 + 7 + 6
    for name in wavs:
        assert (one.out_dir / "audio" / name).read_bytes() == (many.out_dir / "audio" / name).read_bytes()


def test_item_independent_of_split_sizes(tmp_path: Path) -> None:
    small = synthesize(tmp_path / "s", n_train=7, n_test=0, seed=1, speech=False, progress=False)
    big = synthesize(tmp_path / "b", n_train=21, n_test=3, seed=1, speech=False, progress=False)
    assert big.train_manifest.read_text().startswith(small.train_manifest.read_text())
    name = "audio/train_000004_a.wav"
    assert (small.out_dir / name).read_bytes() == (big.out_dir / name).read_bytes()
    # train and test item 0 share a task but not their audio
    assert (big.out_dir / "audio/train_000000_a.wav").read_bytes() != (
        big.out_dir / "audio/test_000000_a.wav"
    ).read_bytes()


# --------------------------------------------------------------------------- answers are in the audio


def test_count_beeps_answer(data: SynthReport) -> None:
    words = ["one", "two", "three", "four"]
    for (path,), answer in by_task(data, "count_beeps"):
        assert words[count_beeps(read(path)) - 1] == answer, path


def test_compare_count_answer(data: SynthReport) -> None:
    for (p1, p2), answer in by_task(data, "compare_count"):
        n1, n2 = count_beeps(read(p1)), count_beeps(read(p2))
        expected = "first clip" if n1 > n2 else "second clip" if n2 > n1 else "equal count"
        assert expected == answer, (p1, n1, n2)


def test_pitch_compare_answer(data: SynthReport) -> None:
    for (path,), answer in by_task(data, "pitch_compare"):
        x = read(path)
        runs = active_runs(x)
        assert len(runs) == 2, path
        f1, f2 = (dominant_freq(x[a:b]) for a, b in runs)
        assert {"higher": "higher", "lower": "lower", "same": "same pitch"}[relation(f1, f2)] == answer


def test_compare_pitch_answer(data: SynthReport) -> None:
    for (p1, p2), answer in by_task(data, "compare_pitch"):
        rel = relation(dominant_freq(read(p1)), dominant_freq(read(p2)))
        assert {"lower": "first clip", "higher": "second clip", "same": "equal pitch"}[rel] == answer


def test_sweep_direction_answer(data: SynthReport) -> None:
    for (path,), answer in by_task(data, "sweep_direction"):
        assert classify_sweep(read(path)) == answer, path


def test_event_order_answer(data: SynthReport) -> None:
    for (path,), answer in by_task(data, "event_order"):
        tone, noise = onsets(read(path))
        if abs(tone - noise) <= 0.05:
            got = "both together"
        elif tone < noise - 0.3:
            got = "the tone"
        elif noise < tone - 0.3:
            got = "the noise"
        else:
            got = "unclear"
        assert got == answer, (path, tone, noise)


def test_loudness_answer(data: SynthReport) -> None:
    ranges = {"silent": (-200, -44), "quiet": (-38, -30), "medium": (-24, -16), "loud": (-12, -6)}
    levels: dict[str, list[float]] = {k: [] for k in ranges}
    for (path,), answer in by_task(data, "loudness"):
        level = float(envelope_db(read(path), 0.05).max())
        lo, hi = ranges[answer]
        assert lo < level < hi, (path, answer, level)
        levels[answer].append(level)
    # RMS ordering holds across classes: every quiet item is below every medium item, etc.
    order = [lv for lv in ("silent", "quiet", "medium", "loud") if levels[lv]]
    for lower, upper in itertools.pairwise(order):
        assert max(levels[lower]) < min(levels[upper])


def test_answer_distribution_covers_labels(tmp_path: Path) -> None:
    report = synthesize(tmp_path, n_train=28 * 7, n_test=0, tasks=SOUND_TASKS, speech=False, progress=False)
    seen: dict[str, set[str]] = {}
    for task, _, answer in records(report):
        seen.setdefault(task, set()).add(answer)
    never = {"no tone", "neither", "neither clip"}
    for task in SOUND_TASKS:
        assert seen[task] == set(synth._SPECS[task].options) - never, task


# --------------------------------------------------------------------------- MMAU scoring self-check


def test_mmau_string_match_on_all_option_sets() -> None:
    for task in TASKS:
        options = synth._SPECS[task].options
        for choices in itertools.combinations(options, 4):
            for answer in choices:
                assert mmau_string_match(answer, answer, list(choices)), (task, answer)
                for wrong in choices:
                    if wrong != answer:
                        assert not mmau_string_match(answer, wrong, list(choices)), (task, answer, wrong)


def test_mmau_string_match_on_written_test_set(data: SynthReport) -> None:
    for rec in json.loads(data.test_file.read_text()):
        assert mmau_string_match(rec["answer"], rec["answer"], rec["choices"])
        assert sum(mmau_string_match(rec["answer"], c, rec["choices"]) for c in rec["choices"]) == 1


# --------------------------------------------------------------------------- task selection and errors


def test_unknown_task_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        synthesize(tmp_path, n_train=1, n_test=0, tasks=["count_beep"], progress=False)
    message = str(err.value)
    assert "count_beep" in message and "did you mean 'count_beeps'" in message
    for task in TASKS:
        assert task in message


def test_task_subset(tmp_path: Path) -> None:
    report = synthesize(
        tmp_path, n_train=5, n_test=2, tasks=["loudness", "count_beeps"], speech=False, progress=False
    )
    assert report.tasks == ["loudness", "count_beeps"]
    tasks = [json.loads(line)["task"] for line in report.train_manifest.read_text().splitlines()]
    assert tasks == ["loudness", "count_beeps"] * 2 + ["loudness"]


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": -1}, {"clip_seconds": 1.0}, {"sample_rate": 4000}, {"seed": -2}, {"tasks": []}, {"workers": 0}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, **{"n_train": 1, "n_test": 0, "progress": False, "speech": False, **kwargs})


def test_speech_true_without_espeak_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match="espeak-ng"):
        synthesize(tmp_path / "out", n_train=1, n_test=0, speech=True, progress=False)
    with pytest.raises(RuntimeError, match="espeak-ng"):
        synthesize(tmp_path / "out", n_train=1, n_test=0, tasks=["spoken_word"], progress=False)
    report = synthesize(tmp_path / "out", n_train=8, n_test=0, progress=False)
    assert report.speech is False and "spoken_word" not in report.tasks
    with pytest.raises(ValueError):
        synthesize(tmp_path / "out", n_train=1, n_test=0, tasks=["spoken_word"], speech=False, progress=False)


FAKE_ESPEAK = """#!{python}
# Stand-in for espeak-ng: writes a 22.05 kHz tone whose pitch encodes the word.
import sys
import numpy as np
import soundfile as sf
args = sys.argv[1:]
out = args[args.index("-w") + 1]
word = args[-1]
freq = 300.0 + 150.0 * {words!r}.index(word)
t = np.arange(int(0.5 * 22050)) / 22050
x = np.concatenate([np.zeros(2000), 0.5 * np.sin(2 * np.pi * freq * t), np.zeros(2000)])
sf.write(out, x, 22050)
"""


def test_spoken_word_with_fake_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks the speech path end to end (call, resample, placement, records) without espeak-ng."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "espeak-ng"
    fake.write_text(FAKE_ESPEAK.format(python=sys.executable, words=list(SPOKEN_WORDS)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir))
    report = synthesize(tmp_path / "out", n_train=9, n_test=9, seed=2, progress=False)
    assert report.speech is True and report.tasks == SOUND_TASKS + ["spoken_word"]
    recs = json.loads(report.test_file.read_text())
    assert recs[7]["task"] == "speech" and recs[7]["category"] == "spoken_word"
    assert recs[0]["task"] == "sound"
    items = by_task(report, "spoken_word")
    assert len(items) == 2
    for (path,), answer in items:
        x = read(path)
        assert len(x) == int(CLIP_S * SR)
        assert abs(dominant_freq(x) - (300.0 + 150.0 * SPOKEN_WORDS.index(answer))) < 10


def _with_fake_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "espeak-ng"
    fake.write_text(FAKE_ESPEAK.format(python=sys.executable, words=list(SPOKEN_WORDS)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir))


RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")
                                          if "common" not in p.parts))  # common/: parts, not recipes
def test_shipped_recipes_pin_the_task_set(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe that makes the synthetic set says whether it has spoken words, so that it trains on
    the same tasks whether or not espeak-ng is installed."""
    from alm_kit.config.loader import load_recipe

    synth_cfg = load_recipe(RECIPES / recipe).data.synth
    if synth_cfg is None:
        return
    assert synth_cfg.speech is not None, f"{recipe}: set data.synth.speech (true or false)"
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng
    without = synth.synth_tasks(synth_cfg.tasks, synth_cfg.speech) if not synth_cfg.speech else None
    _with_fake_espeak(tmp_path, monkeypatch)
    assert without is None or synth.synth_tasks(synth_cfg.tasks, synth_cfg.speech) == without


def test_ensure_synth_remakes_a_set_made_with_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_fake_espeak(tmp_path, monkeypatch)
    out, logs = tmp_path / "data", []
    meta = synth.ensure_synth(out, n_train=3, n_test=2, progress=False, log=logs.append)  # speech=None: espeak found
    assert meta["tasks"] == SOUND_TASKS + ["spoken_word"] and logs == []
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    assert synth.ensure_synth(out, n_train=3, n_test=2, progress=False, log=logs.append) == meta
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp and logs == []  # the same settings: kept
    meta = synth.ensure_synth(out, n_train=3, n_test=2, speech=False, progress=False, log=logs.append)
    assert meta["tasks"] == SOUND_TASKS and "spoken_word" not in (out / "train.jsonl").read_text()
    assert len(logs) == 1 and "tasks" in logs[0] and "making it again" in logs[0]
    meta = synth.ensure_synth(out, n_train=5, n_test=2, speech=False, progress=False, log=logs.append)
    assert meta["n_train"] == 5 and len((out / "train.jsonl").read_text().splitlines()) == 5
    assert "n_train 3 -> 5" in logs[-1]


def test_training_data_reports_its_task_set(tmp_path: Path) -> None:
    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.data.loading import ensure_training_data
    from tests.conftest import tiny_recipe_dict

    out = tmp_path / "data"
    raw = tiny_recipe_dict()
    raw["data"] = {"train": str(out / "train.jsonl"), "synth": {
        "out_dir": str(out), "n_train": 4, "n_test": 1, "speech": False, "tasks": ["loudness", "count_beeps"]}}
    meta = ensure_training_data(recipe_from_dict(raw), progress=False)
    assert meta["tasks"] == ["loudness", "count_beeps"] and meta["n_train"] == 4
    del raw["data"]["synth"]
    assert ensure_training_data(recipe_from_dict(raw), progress=False) is None  # no data.synth: nothing to report
