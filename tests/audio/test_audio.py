"""Audio loading: formats, mono mix, resampling, pad/crop, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from alm_kit.audio.io import AudioError, fit_length, load_audio, prepare_for_specs, resample
from alm_kit.interfaces import AudioSpec
from tests.conftest import write_tone


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_decodes_formats_and_mixes_to_mono(tmp_path, ext, subtype):
    path = write_tone(tmp_path / f"tone.{ext}", 440.0, 0.5, 22050, channels=2, subtype=subtype)
    wave, rate = load_audio(path)
    assert rate == 22050 and wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - 11025) < 1200  # ogg may pad a little
    assert abs(peak_hz(wave, rate) - 440.0) < 5


@pytest.mark.parametrize("target", [16000, 32000, 48000])
def test_a_1khz_tone_stays_1khz_after_resampling(tmp_path, target):
    wave, rate = load_audio(write_tone(tmp_path / "t.wav", 1000.0, 1.0, 44100))
    out = resample(wave, rate, target)
    assert abs(len(out) - target) <= 2
    assert abs(peak_hz(out, target) - 1000.0) < 2.0


def test_prepare_resamples_once_per_rate_and_fits_each_spec():
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    specs = {"a": AudioSpec(32000, 2.0, "zero"), "b": AudioSpec(32000, 0.5, "zero"), "c": AudioSpec(16000, None)}
    out = prepare_for_specs(wave, 16000, specs)
    assert out["a"][0].shape == (64000,) and out["a"][1] == 32000  # zero-padded, real length kept
    assert out["b"][0].shape == (16000,) and out["b"][1] == 16000
    np.testing.assert_array_equal(out["a"][0][:16000], out["b"][0])  # same resampled signal
    assert out["c"][0] is wave


def test_pad_and_crop_policies():
    wave = np.arange(1, 11, dtype=np.float32)
    clip, n = fit_length(wave, AudioSpec(10, 2.5, "repeat"))
    assert list(clip) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5] and n == 25
    clip, n = fit_length(wave, AudioSpec(10, 2.5, "repeatpad"))
    assert list(clip) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0, 0] and n == 20
    clip, n = fit_length(wave, AudioSpec(10, 1.2, "zero"))
    assert list(clip[10:]) == [0, 0] and n == 10
    assert list(fit_length(wave, AudioSpec(10, 0.4, crop="center"))[0]) == [4, 5, 6, 7]
    # random crop: random in training, deterministic (start) at evaluation
    spec = AudioSpec(10, 0.4, crop="random")
    assert list(fit_length(wave, spec, train=False)[0]) == [1, 2, 3, 4]
    starts = {fit_length(wave, spec, train=True, rng=np.random.default_rng(s))[0][0] for s in range(20)}
    assert len(starts) > 1


def offset_of(clip: np.ndarray, source: np.ndarray) -> int:
    """Where ``clip`` (an exact slice) starts in ``source``."""
    (found,) = [i for i in range(len(source) - len(clip) + 1) if np.array_equal(source[i:i + len(clip)], clip)]
    return found


def test_random_crops_of_all_encoders_cover_the_same_time():
    """One random position per clip, shared by every encoder: the same stretch of audio at 16 and 32 kHz."""
    wave = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1  # 2 s at 16 kHz
    specs = {"a": AudioSpec(16000, 0.5, crop="random"), "b": AudioSpec(32000, 0.5, crop="random")}
    upsampled = resample(wave, 16000, 32000)
    starts = set()
    for seed in range(5):
        out = prepare_for_specs(wave, 16000, specs, train=True, rng=np.random.default_rng(seed))
        start_a, start_b = offset_of(out["a"][0], wave), offset_of(out["b"][0], upsampled)
        assert abs(start_a / 16000 - start_b / 32000) <= 1 / 16000
        starts.add(start_a)
    assert len(starts) == 5  # still random
    # evaluation: deterministic, from the start, whatever the rng
    for seed in range(2):
        out = prepare_for_specs(wave, 16000, specs, train=False, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(out["a"][0], wave[:8000])


def laion_get_audio_features():
    """laion-clap's own ``get_audio_features`` (training/data.py), compiled from its installed source.

    Importing the module would run ``laion_clap/__init__`` (hub tokenizers) and need its training
    dependencies; the padding branch only uses torch, so the function alone is taken from the file.
    """
    import ast
    import contextlib
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.find_spec("laion_clap")
    if spec is None:
        pytest.skip("laion-clap is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "training" / "data.py"
    tree = ast.parse(path.read_text())
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_audio_features"]
    namespace = {"torch": torch, "F": torch.nn.functional, "np": np, "suppress": contextlib.suppress}
    exec(compile(ast.Module([func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["get_audio_features"]


@pytest.mark.parametrize("length", [1, 7, 999, 1000, 1001, 3333, 4999, 5000, 5001, 9999, 10000])
def test_short_clip_filling_matches_laion_clap(length):
    """``repeatpad`` (CLAP's default) is laion's repeatpad; ``repeat`` is laion's repeat (tiling, as
    Mellow's inference); ``zero`` is laion's pad. Real lengths: the zeros are padding."""
    import torch

    get_audio_features = laion_get_audio_features()
    wave = np.random.default_rng(length).uniform(-1, 1, length).astype(np.float32)
    target = 10000
    for ours, theirs in (("repeatpad", "repeatpad"), ("repeat", "repeat"), ("zero", "pad")):
        expected = get_audio_features({}, torch.from_numpy(wave.copy()), target, "rand_trunc", theirs, {})["waveform"]
        clip, real = fit_length(wave, AudioSpec(1000, 10.0, ours))
        np.testing.assert_array_equal(clip, expected.numpy(), err_msg=f"pad={ours}, {length} samples")
        nonzero_end = target if ours == "repeat" else (target // length if ours == "repeatpad" else 1) * length
        assert real == min(nonzero_end, target)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.*empty.wav"):
        load_audio(empty)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    with pytest.raises(AudioError, match="cannot decode.*junk.wav"):
        load_audio(junk)


def test_nan_samples_are_rejected():
    from alm_kit.audio.io import check_waveform

    with pytest.raises(AudioError, match="NaN"):
        check_waveform(np.array([0.0, np.nan], dtype=np.float32), "clip 3")


def _flac(seconds: int, rate: int = 1000, known_length: bool = True) -> bytes:
    """Silent FLAC, written a minute at a time; ``known_length=False`` clears the header's sample count
    (as a streamed FLAC has it), so only decoding finds out how long it is."""
    import io

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC") as f:
        for start in range(0, seconds, 60):
            f.write(np.zeros(min(60, seconds - start) * rate, np.float32))
    data = bytearray(buf.getvalue())
    if not known_length:  # STREAMINFO: the low 4 bits of byte 21 and bytes 22-25 hold the 36-bit count
        data[21] &= 0xF0
        data[22:26] = bytes(4)
    return bytes(data)


@pytest.fixture
def frames_read(monkeypatch):
    """Counts the frames libsndfile decodes."""
    count = [0]
    original = sf.SoundFile.read

    def read(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count[0] += len(out)
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return count


def test_a_clip_over_max_seconds_is_refused_from_its_header_before_decoding(frames_read):
    from alm_kit.audio.io import AudioBlob

    blob = AudioBlob("hour.flac", _flac(3600))
    assert len(blob.data) < 20_000  # an hour in a small upload
    with pytest.raises(AudioError, match=r"hour.flac: audio is 3600.0 s long; at most 3 s"):
        load_audio(blob, max_seconds=3)
    assert frames_read[0] == 0
    wave, rate = load_audio(blob)  # without a limit it decodes as ever
    assert len(wave) == 3600 * rate


def test_decoding_stops_at_max_seconds_when_the_header_does_not_say(frames_read):
    from alm_kit.audio.io import AudioBlob

    blob = AudioBlob("stream.flac", _flac(10, known_length=False))
    with pytest.raises(AudioError, match="longer than 3 s"):
        load_audio(blob, max_seconds=3)
    assert frames_read[0] <= 3 * 1000 + 1


def test_undecodable_bytes_say_why_without_object_reprs():
    from alm_kit.audio.io import AudioBlob

    with pytest.raises(AudioError) as failed:
        load_audio(AudioBlob("upload.wav", b"hello, not a wav file"))
    assert "upload.wav" in str(failed.value) and "Format not recognised" in str(failed.value)
    assert " at 0x" not in str(failed.value)


def test_many_channels_are_mixed_down_block_by_block(tmp_path):
    path = tmp_path / "many.wav"
    data = np.random.default_rng(0).uniform(-0.5, 0.5, (300_000, 8)).astype(np.float32)
    sf.write(str(path), data, 16000, subtype="FLOAT")
    wave, _ = load_audio(path)
    np.testing.assert_allclose(wave, data.mean(axis=1), atol=1e-6)


def test_a_folder_or_an_empty_file_is_named_as_such(tmp_path):
    """libsndfile calls both "Format not recognised"."""
    (tmp_path / "clips.wav").mkdir()
    with pytest.raises(AudioError, match=f"^{tmp_path / 'clips.wav'} is a folder, not an audio file$"):
        load_audio(tmp_path / "clips.wav")
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"^audio file is empty \(0 bytes\): .*zero.wav$"):
        load_audio(tmp_path / "zero.wav")


def test_a_wav_cut_short_decodes_with_a_warning(tmp_path):
    import warnings

    from alm_kit.audio.io import AudioBlob
    from alm_kit.errors import AlmKitWarning

    whole = tmp_path / "whole.wav"
    write_tone(whole, seconds=1.0)
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + 16000])  # the header and half of the 32000 bytes of samples
    with pytest.warns(AlmKitWarning, match=r"cut.wav: WAV data cut short: the header declares 32000 bytes of "
                                           r"samples, the file holds 16000 \(50%\)"):
        wave, _ = load_audio(cut)
    assert len(wave) == 8000
    with pytest.warns(AlmKitWarning, match="blob.wav: WAV data cut short"):
        load_audio(AudioBlob("blob.wav", data[: 44 + 100]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole files, and other formats, are quiet
        load_audio(whole)
        write_tone(tmp_path / "t.flac")
        load_audio(tmp_path / "t.flac")
