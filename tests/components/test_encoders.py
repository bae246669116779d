"""Whisper, CLAP and HTS-AT encoders at toy size: shapes, masks, frame rates, layer taps, checkpoints,
resampling and cropping per encoder, a fused recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import numpy as np
import pytest
import torch

from alm_kit.audio.io import prepare_for_specs
from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.batch import Batch, collate_waveforms
from alm_kit.encoders.clap import CLAPAudioEncoder, load_model_config
from alm_kit.encoders.htsat import HTSATEncoder
from alm_kit.encoders.whisper import WhisperEncoder, frames_for, whisper_dims
from alm_kit.interfaces import AudioFeatures, AudioSpec, StreamInfo
from alm_kit.model import build_model
from tests.conftest import TINY_HTSAT, TINY_LLAMA, assert_differs

TINY_WHISPER = {"size": "tiny", "n_state": 64, "n_head": 2, "n_layer": 3}
#: a very small CLAP HTS-AT at CLAP's 48 kHz / hop 480: 2.4 s = 241 mel frames (<= 64 x 4)
TINY_CLAP = {
    "clip_seconds": 2.4, "mel_bins": 16, "spec_size": 64, "embed_dim": 8, "depths": [1, 1, 1],
    "num_heads": [1, 1, 2], "swin_window": 4, "num_classes": 12, "joint_dim": 16,
}


#: tiny HTS-AT at Mellow's rate and hop (32 kHz, 320) and at CLAP's (48 kHz, 480): 2 s = 201 mel frames
TINY_HTSATS = {
    "htsat32k": dict(TINY_HTSAT, sample_rate=32000, window_size=1024, hop_size=320, fmax=14000),
    "htsat48k": dict(TINY_HTSAT, sample_rate=48000, window_size=1024, hop_size=480, fmax=14000, pad="repeatpad"),
}


def noise(seconds: float, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    return torch.randn(int(seconds * rate), generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture(scope="module")
def whisper_enc():
    return WhisperEncoder(WhisperEncoder.Config(pad="none", **TINY_WHISPER)).eval()


@pytest.fixture(scope="module")
def clap_enc():
    return CLAPAudioEncoder(CLAPAudioEncoder.Config(frames=True, **TINY_CLAP)).eval()


# --------------------------------------------------------------------------- whisper
def test_whisper_short_clips_are_not_padded_to_30s(whisper_enc):
    assert whisper_enc.spec.sample_rate == 16000 and whisper_enc.spec.pad == "none"
    assert whisper_enc.info.frame_rate == 50.0 and whisper_enc.info.num_frames is None
    waves = torch.zeros(2, 48000)
    waves[0] = noise(3.0)
    waves[1, :16000] = noise(1.0, seed=1)
    with torch.no_grad():
        out = whisper_enc(waves, torch.tensor([48000, 16000]))
    assert out.frames.shape == (2, 150, 64)  # 3 s at 50 frames/s, not 1500
    assert out.pooled.shape == (2, 64)
    assert out.mask[0].all()
    assert out.mask[1, :50].all() and not out.mask[1, 50:].any()
    # pooled is the mean of the real frames only
    torch.testing.assert_close(out.pooled[1], out.frames[1, :50].mean(0))


def test_whisper_batch_padding_does_not_change_real_frames(whisper_enc):
    short, long = noise(1.0, seed=1), noise(3.0)
    batch = torch.zeros(2, 48000)
    batch[0], batch[1, :16000] = long, short
    with torch.no_grad():
        together = whisper_enc(batch, torch.tensor([48000, 16000]))
        alone = whisper_enc(short[None], torch.tensor([16000]))
    assert alone.frames.shape == (1, 50, 64)
    torch.testing.assert_close(together.frames[1, :50], alone.frames[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-5)
    # Whisper's own windowing (pad: zero) attends to the padding: there, real frames do change
    plain = WhisperEncoder(WhisperEncoder.Config(pad="zero", clip_seconds=3.0, **TINY_WHISPER)).eval()
    plain.load_state_dict(whisper_enc.state_dict())
    with torch.no_grad():
        windowed = plain(batch, torch.tensor([48000, 16000]))
    assert_differs(windowed.frames[1, :50], alone.frames[0], atol=1e-3)
    assert windowed.mask[1].sum() == 50


def test_whisper_full_window_matches_openai_whisper():
    from whisper.audio import log_mel_spectrogram

    enc = WhisperEncoder(WhisperEncoder.Config(**TINY_WHISPER)).eval()  # pad zero, 30 s
    assert enc.spec.clip_samples == 480000 and enc.info.num_frames == 1500
    wave = torch.zeros(1, 480000)
    wave[0, :64000] = noise(4.0)
    with torch.no_grad():
        out = enc(wave, torch.tensor([64000]))
        expected = enc.encoder(log_mel_spectrogram(wave[0])[None])  # whisper's own forward (asserts 3000 mel frames)
    assert out.frames.shape == (1, 1500, 64)
    torch.testing.assert_close(out.frames, expected, atol=1e-5, rtol=1e-5)
    assert out.mask[0].sum() == 200  # 4 s


def test_whisper_layer_taps_mix_hidden_states(whisper_enc):
    from whisper.audio import log_mel_spectrogram

    taps = WhisperEncoder(WhisperEncoder.Config(pad="none", layers=[1, 2, -1], **TINY_WHISPER))
    taps.encoder.load_state_dict(whisper_enc.encoder.state_dict())
    weights = taps.mixing_weights()
    assert weights.shape == (3,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert taps.taps == [1, 2, 3] and taps.layer_weights.requires_grad
    wave = noise(2.0)[None]
    with torch.no_grad():
        last = whisper_enc(wave, torch.tensor([32000])).frames
        mixed = taps(wave, torch.tensor([32000])).frames
    assert mixed.shape == last.shape
    assert_differs(mixed, last, atol=1e-3)
    # independent check of the indexing: hidden state 2 = after two of whisper's own blocks
    one = WhisperEncoder(WhisperEncoder.Config(pad="none", layers=[2], **TINY_WHISPER)).eval()
    one.encoder.load_state_dict(whisper_enc.encoder.state_dict())
    e = whisper_enc.encoder
    with torch.no_grad():
        x = torch.nn.functional.gelu(e.conv1(log_mel_spectrogram(wave[0])[None]))
        x = torch.nn.functional.gelu(e.conv2(x)).permute(0, 2, 1) + e.positional_embedding[:100]
        expected = e.blocks[1](e.blocks[0](x))
        torch.testing.assert_close(one(wave, torch.tensor([32000])).frames, expected, atol=1e-5, rtol=1e-5)
    # the mixing weights learn when the encoder trains
    taps(wave, torch.tensor([32000])).frames.square().mean().backward()
    assert taps.layer_weights.grad is not None and taps.layer_weights.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        WhisperEncoder(WhisperEncoder.Config(layers=[4], **TINY_WHISPER))


def test_whisper_sizes_table_without_building():
    from whisper.model import AudioEncoder

    turbo = whisper_dims("large-v3-turbo")
    assert (turbo.n_mels, turbo.n_audio_state, turbo.n_audio_head, turbo.n_audio_layer) == (128, 1280, 20, 32)
    assert turbo.n_audio_ctx == 1500 and turbo.n_text_layer == 4
    assert (whisper_dims("tiny").n_mels, whisper_dims("tiny").n_audio_state) == (80, 384)
    assert whisper_dims("large-v2").n_mels == 80 and whisper_dims("large-v3").n_mels == 128
    with torch.device("meta"):  # shapes only, no memory
        enc = AudioEncoder(turbo.n_mels, turbo.n_audio_ctx, turbo.n_audio_state, turbo.n_audio_head,
                           turbo.n_audio_layer)
    assert sum(p.numel() for p in enc.parameters()) == 635_048_960
    with pytest.raises(ValueError, match="unknown Whisper size"):
        whisper_dims("huge")


def test_whisper_checkpoint_round_trip(tmp_path):
    from whisper.audio import log_mel_spectrogram
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
                           n_vocab=100, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=1)
    torch.manual_seed(5)
    source = Whisper(dims).eval()
    path = tmp_path / "tiny-whisper.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": source.state_dict()}, path)
    enc = WhisperEncoder(WhisperEncoder.Config(checkpoint=str(path))).eval()  # shapes from the file
    assert enc.has_pretrained_weights and enc.info.frame_dim == 32
    wave = torch.zeros(1, 480000)
    wave[0, :32000] = noise(2.0, seed=3)
    with torch.no_grad():
        out = enc(wave, torch.tensor([32000])).frames
        expected = source.embed_audio(log_mel_spectrogram(wave[0])[None])
        fresh = WhisperEncoder(WhisperEncoder.Config(size="tiny", n_state=32, n_head=2, n_layer=2))
        assert not fresh.has_pretrained_weights
        assert_differs(fresh(wave, torch.tensor([32000])).frames, expected, atol=1e-3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="size 'base'"):
        WhisperEncoder(WhisperEncoder.Config(checkpoint=str(path), size="base"))


# --------------------------------------------------------------------------- clap
def test_clap_tiny_shapes_and_normalised_embedding(clap_enc):
    spec, info = clap_enc.spec, clap_enc.info
    assert spec.sample_rate == 48000 and spec.clip_samples == 115200
    assert info.frame_dim == 32 and info.pooled_dim == 16 and info.num_frames == 4 * 4 * 32
    waves = torch.stack([noise(2.4, 48000), noise(2.4, 48000, seed=1)])
    waves[1, 57600:] = 0
    with torch.no_grad():
        out = clap_enc(waves, torch.tensor([115200, 57600]))
        raw = clap_enc.audio_projection(clap_enc.audio_branch({"waveform": waves})["embedding"])
    assert out.frames.shape == (2, 512, 32) and out.pooled.shape == (2, 16)
    assert out.mask[0].all() and out.mask[1].sum() == 256
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))
    assert_differs(raw.norm(dim=-1), torch.ones(2), atol=1e-2)  # normalising is a real step
    torch.testing.assert_close(out.pooled, raw / raw.norm(dim=-1, keepdim=True))
    # without frames: one frame, the embedding itself
    single = CLAPAudioEncoder(CLAPAudioEncoder.Config(**TINY_CLAP)).eval()
    single.load_state_dict(clap_enc.state_dict())
    with torch.no_grad():
        one = single(waves, torch.tensor([115200, 57600]))
    assert single.info.num_frames == 1 and single.info.frame_dim == 16 and single.info.frame_rate is None
    assert one.frames.shape == (2, 1, 16) and one.mask.all()
    torch.testing.assert_close(one.frames[:, 0], out.pooled)


def test_clap_repeat_pads_and_reads_laion_configs(clap_enc):
    assert clap_enc.spec.pad == "repeatpad"
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)  # 1 s
    wave, real = prepare_for_specs(tone, 48000, {"clap": clap_enc.spec})["clap"]
    # laion-clap's repeatpad: two whole repeats of the 1 s clip, then zeros (padding) up to 2.4 s
    assert len(wave) == 115200 and real == 96000
    np.testing.assert_array_equal(wave[48000:96000], tone)
    assert not wave[96000:].any()
    cfg = load_model_config("HTSAT-tiny")["audio_cfg"]
    assert (cfg["sample_rate"], cfg["clip_samples"], cfg["hop_size"], cfg["mel_bins"]) == (48000, 480000, 480, 64)
    with pytest.raises(ValueError, match="unknown CLAP model config"):
        load_model_config("HTSAT-enormous")


def test_clap_paper_size_htsat_tiny():
    enc = CLAPAudioEncoder(CLAPAudioEncoder.Config())  # laion-clap's HTSAT-tiny.json
    assert enc.spec.sample_rate == 48000 and enc.spec.clip_samples == 480000 and enc.spec.pad == "repeatpad"
    assert enc.audio_cfg.hop_size == 480
    assert enc.info.frame_dim == 512 and enc.info.pooled_dim == 512
    # laion's count includes the fixed STFT/mel weights (1,083,456), which are buffers here: they never train
    fixed = sum(b.numel() for n, b in enc.audio_branch.named_buffers() if n.startswith(("spectrogram", "logmel")))
    assert fixed == 1_083_456
    assert sum(p.numel() for p in enc.audio_branch.parameters()) + fixed == 31_325_143
    assert sum(p.numel() for p in enc.audio_projection.parameters()) == 768 * 512 + 512 + 512 * 512 + 512


def test_clap_checkpoint_round_trip(tmp_path, clap_enc):
    source = CLAPAudioEncoder(CLAPAudioEncoder.Config(frames=True, init_seed=7, **TINY_CLAP)).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.text_branch.embeddings.weight"] = torch.zeros(3, 2)  # a full CLAP also has a text branch
    path = tmp_path / "clap.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = CLAPAudioEncoder(CLAPAudioEncoder.Config(frames=True, checkpoint=str(path), **TINY_CLAP)).eval()
    assert loaded.has_pretrained_weights and not clap_enc.has_pretrained_weights
    wave = noise(2.4, 48000, seed=2)[None]
    with torch.no_grad():
        a = source(wave, torch.tensor([115200]))
        b = loaded(wave, torch.tensor([115200]))
        c = clap_enc(wave, torch.tensor([115200]))
    torch.testing.assert_close(b.pooled, a.pooled)
    torch.testing.assert_close(b.frames, a.frames)
    assert_differs(c.pooled, a.pooled, atol=1e-3)  # different random init really differs
    torch.save({"state_dict": {"text_branch.x": torch.zeros(1)}}, tmp_path / "text_only.pt")
    with pytest.raises(ValueError, match="no CLAP audio weights"):
        CLAPAudioEncoder(CLAPAudioEncoder.Config(checkpoint=str(tmp_path / "text_only.pt"), **TINY_CLAP))


def test_clap_pann_branch_and_training_checkpoint_with_numpy_scalars(tmp_path):
    small = {"model": "PANN-6", "frames": True, "sample_rate": 16000, "clip_seconds": 1.0, "hop_size": 160,
             "window_size": 512, "fmax": 8000}
    source = CLAPAudioEncoder(CLAPAudioEncoder.Config(init_seed=1, **small)).eval()
    # 101 mel frames -> 6 steps after Cnn6's four 2x poolings, each repeated 16x; 512-d latent
    assert source.info.num_frames == 96 and source.info.frame_dim == 512 and source.info.pooled_dim == 512
    # laion's training checkpoints hold numpy scalars next to the state dict
    path = tmp_path / "pann.pt"
    torch.save({"epoch": np.int64(10), "loss": np.float64(0.25),
                "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = CLAPAudioEncoder(CLAPAudioEncoder.Config(checkpoint=str(path), **small)).eval()
    wave = noise(1.0, seed=4)[None]
    with torch.no_grad():
        a, b = source(wave, torch.tensor([16000])), loaded(wave, torch.tensor([16000]))
    assert a.frames.shape == (1, 96, 512)
    torch.testing.assert_close(b.pooled, a.pooled)
    torch.testing.assert_close(a.pooled.norm(dim=-1), torch.ones(1))


# --------------------------------------------------------------------------- together
def test_recipe_with_clap_and_whisper_trains_through_concat_fusion():
    recipe = {
        "name": "triple-ish",
        "model": {
            "encoders": [
                {"name": "clap", "train": "frozen", "params": dict(TINY_CLAP, frames=True, repeat_frames=False)},
                {"name": "whisper", "train": "full", "params": dict(TINY_WHISPER, pad="none", clip_seconds=2.0,
                                                                     layers=[1, 3])},
            ],
            "fusion": {"name": "concat", "params": {"length": 8}},
            "projector": {"name": "mlp", "params": {"style": "gelu", "dropout": 0.0}},
            "decoder": {"name": "causal_lm", "params": {"tokenizer": "builtin:tiny", "config": dict(TINY_LLAMA)}},
            "layout": {"name": "placeholder"},
        },
    }
    model = build_model(recipe_from_dict(recipe).model)
    model.train()
    assert model.fusion.info.frame_dim == 32 + 64 and model.fusion.info.pooled_dim == 16 + 64
    clips = [prepare_for_specs(noise(s, 16000, seed=i).numpy(), 16000, model.audio_specs)
             for i, s in enumerate((1.5, 0.5, 3.0))]
    waveforms, lengths = collate_waveforms(clips, list(model.audio_specs))
    assert waveforms["whisper"].shape == (3, 32000) and lengths["whisper"].tolist() == [24000, 8000, 32000]
    assert waveforms["clap"].shape == (3, 115200)
    batch = Batch(ids=["a", "b"], prompts=["what is it?", "compare <audio> and <audio>"], responses=["noise", "same"],
                  clips_per_example=[1, 2], clip_keys=["x", "y", "z"], waveforms=waveforms, lengths=lengths)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()
    whisper = model.encoders["whisper"]
    assert whisper.layer_weights.grad is not None and whisper.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoders["clap"].parameters())  # frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


@pytest.fixture(scope="module")
def encoders(whisper_enc, clap_enc):
    """One tiny encoder of every built-in kind, HTS-AT at Mellow's and at CLAP's sample rate."""
    return {"whisper": whisper_enc, "clap": clap_enc,
            **{name: HTSATEncoder(HTSATEncoder.Config(**params)).eval() for name, params in TINY_HTSATS.items()}}


ENCODERS = ["whisper", "clap", *TINY_HTSATS]


@pytest.mark.parametrize("name", ENCODERS)
def test_resampling_keeps_a_1khz_tone(name, encoders):
    spec = encoders[name].spec
    assert spec.sample_rate == {"whisper": 16000, "clap": 48000, "htsat32k": 32000, "htsat48k": 48000}[name]
    rate_in = 44100
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(rate_in) / rate_in)).astype(np.float32)  # 1 s
    wave, real = prepare_for_specs(tone, rate_in, {name: spec})[name]
    n = spec.sample_rate  # the first second: the tone itself (then padding or repeats)
    assert len(wave) >= n
    assert real == {"none": n, "zero": n, "repeat": spec.clip_samples,
                    "repeatpad": n * (spec.clip_samples // n)}[spec.pad]
    spectrum = np.abs(np.fft.rfft(wave[:n] * np.hanning(n)))
    freqs = np.fft.rfftfreq(n, 1 / n)
    assert abs(freqs[np.argmax(spectrum)] - 1000.0) <= 1.0
    assert spectrum[np.abs(freqs - 1000.0) > 20].max() < 1e-3 * spectrum.max()  # no energy elsewhere


@pytest.mark.parametrize("name", ENCODERS)
def test_long_audio_is_cropped_per_the_recipe_and_deterministically_at_eval(name, encoders):
    enc = encoders[name]
    spec, rate, clip = enc.spec, enc.spec.sample_rate, enc.spec.clip_samples
    long = noise(spec.clip_seconds + 1.5, rate, seed=3).numpy()
    fit = lambda s, train, seed: prepare_for_specs(long, rate, {name: s}, train=train,  # noqa: E731
                                                   rng=np.random.default_rng(seed))[name]
    # evaluation (and the default crop: start): the first clip_seconds, whatever the rng
    for seed in (0, 1):
        wave, real = fit(spec, False, seed)
        assert real == clip
        np.testing.assert_array_equal(wave, long[:clip])
    # the recipe's crop reaches the data path through the encoder's spec
    for crop in ("center", "random"):
        assert type(enc)(dataclasses.replace(enc.config, crop=crop)).spec.crop == crop
    free = len(long) - clip
    np.testing.assert_array_equal(fit(dataclasses.replace(spec, crop="center"), False, 0)[0],
                                  long[free // 2: free // 2 + clip])
    rand = dataclasses.replace(spec, crop="random")
    np.testing.assert_array_equal(fit(rand, False, 5)[0], long[:clip])  # deterministic at evaluation
    starts = {int(np.flatnonzero(long == fit(rand, True, seed)[0][0])[0]) for seed in range(4)}
    assert len(starts) > 1  # random in training
    # the encoder takes the cropped clip at its full size
    with torch.no_grad():
        out = enc(torch.from_numpy(wave)[None], torch.tensor([real]))
    assert out.frames.shape[1] == (enc.info.num_frames or frames_for(clip)) and out.mask.all()


def test_whisper_refuses_more_than_30s():
    enc = WhisperEncoder(WhisperEncoder.Config(pad="none", **TINY_WHISPER))
    with pytest.raises(ValueError, match="at most 30 s"):
        enc(torch.zeros(1, 480_320), torch.tensor([480_320]))


@pytest.mark.parametrize("output", ["sed", "fine_grained", "embedding"])
def test_htsat_outputs_shapes_masks_and_frame_rates(output, encoders):
    base = encoders["htsat32k"]  # sed
    enc = HTSATEncoder(HTSATEncoder.Config(**dict(TINY_HTSATS["htsat32k"], output=output))).eval()
    assert enc.spec == AudioSpec(32000, 2.0, "zero", "start")
    # 16 time steps, each repeated 32x, over 2 s; widths: 12 classes, latent 8 * 2^2 = 32
    frames, dim = {"sed": (512, 12), "fine_grained": (512, 32), "embedding": (1, 32)}[output]
    assert enc.info == StreamInfo(dim, 32, None if output == "embedding" else frames / 2.0, frames)
    waves = torch.stack([noise(2.0, 32000), noise(2.0, 32000, seed=1)])
    waves[1, 16000:] = 0  # 0.5 s of real audio
    lengths = torch.tensor([64000, 16000])
    with torch.no_grad():
        out = enc(waves, lengths)
        sed = base(waves, lengths)
    assert out.frames.shape == (2, frames, dim) and out.pooled.shape == (2, 32)
    torch.testing.assert_close(out.pooled, sed.pooled)  # same weights: the clip latent does not depend on output
    assert out.mask[0].all()
    assert out.mask[1].sum() == (1 if output == "embedding" else frames // 4)
    if output == "embedding":
        torch.testing.assert_close(out.frames[:, 0], out.pooled)
    else:  # each time step repeated 32x, as HTS-AT does
        torch.testing.assert_close(out.frames, out.frames[:, ::32].repeat_interleave(32, 1))
    if output == "sed":
        assert torch.all((out.frames >= 0) & (out.frames <= 1))
    # one frame per time step
    single = HTSATEncoder(HTSATEncoder.Config(**dict(TINY_HTSATS["htsat32k"], output=output,
                                                     repeat_frames=False))).eval()
    if output != "embedding":
        assert single.info.num_frames == 16 and single.info.frame_rate == 8.0
        with torch.no_grad():
            torch.testing.assert_close(single(waves, lengths).frames, out.frames[:, ::32])


def test_htsat_at_clap_settings_and_clap_frame_rate(encoders, clap_enc):
    enc = encoders["htsat48k"]
    assert enc.spec == AudioSpec(48000, 2.0, "repeatpad", "start") and enc.info.frame_rate == 256.0
    with torch.no_grad():
        out = enc(noise(2.0, 48000)[None], torch.tensor([96000]))
    assert out.frames.shape == (1, 512, 12)
    # CLAP's framewise latent: frames per second of the 2.4 s window
    assert clap_enc.info.frame_rate == clap_enc.info.num_frames / 2.4


@pytest.mark.parametrize("name", ENCODERS)
def test_encoding_in_passes_equals_one_pass(name, encoders):
    """The engine may run an encoder over slices of a batch (generation.encoder_batch): every clip's
    features must not depend on which other clips share its pass."""
    enc = encoders[name]
    rate = enc.spec.sample_rate
    clips = [noise(seconds, rate, seed=i).numpy() for i, seconds in enumerate((2.0, 0.7, 1.3))]
    waves, lengths = collate_waveforms([{name: (c, len(c))} for c in clips], [name])
    with torch.no_grad():
        whole = enc(waves[name], lengths[name])
        passes = AudioFeatures.cat([enc(waves[name][s:s + 2], lengths[name][s:s + 2]) for s in (0, 2)])
    torch.testing.assert_close(passes.frames, whole.frames, rtol=1e-5, atol=1e-5)
    assert torch.equal(passes.mask, whole.mask)
    if whole.pooled is not None:
        torch.testing.assert_close(passes.pooled, whole.pooled, rtol=1e-5, atol=1e-5)


def test_htsat_keeps_no_attention_maps_and_its_output_is_unchanged():
    """laion's Swin stages average every block's attention map when not training (memory alm-kit never
    uses); ``BasicLayer.training`` only decides that, so the stages are marked as training while
    everything else (drop-path, dropout, SpecAugment) keeps the real mode."""
    enc = HTSATEncoder(HTSATEncoder.Config(**dict(TINY_HTSATS["htsat32k"], drop_path_rate=0.5))).eval()
    stages = [m for m in enc.modules() if type(m).__name__ == "BasicLayer"]
    assert len(stages) == 3 and all(s.training for s in stages)
    assert not any(m.training for m in enc.modules() if type(m).__name__ != "BasicLayer")
    waves, lengths = torch.stack([noise(2.0, 32000), noise(2.0, 32000, seed=1)]), torch.tensor([64000, 32000])
    with torch.no_grad():
        ours = enc(waves, lengths)
        for stage in stages:  # laion's own behaviour
            stage.training = False
        theirs = enc(waves, lengths)
    assert torch.equal(ours.frames, theirs.frames) and torch.equal(ours.pooled, theirs.pooled)
    enc.train()
    assert all(m.training for m in enc.modules())


@pytest.mark.parametrize("name", ENCODERS)
def test_bf16_weights_keep_the_mel_front_end_in_fp32(name, encoders):
    """``generation.dtype: bf16`` casts an encoder with ``cast_weights``: its log-mel front end stays fp32
    (and computes outside autocast); the features are the fp32 encoder's to bf16 round-off."""
    import copy

    from alm_kit.runtime import cast_weights

    enc = encoders[name]
    low = cast_weights(copy.deepcopy(enc), torch.bfloat16)
    fixed = [t for n, t in low.state_dict().items() if n.split(".")[-1] in ("melW", "weight")
             and ("logmel" in n or "spectrogram" in n)]
    assert all(t.dtype == torch.float32 for t in fixed) and (fixed or name == "whisper")
    rate = enc.spec.sample_rate
    waves, lengths = collate_waveforms([{name: (noise(1.5, rate, seed=i).numpy(), int(1.5 * rate))} for i in (0, 1)],
                                       [name])
    with torch.no_grad():
        want = enc(waves[name], lengths[name])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = low(waves[name], lengths[name])
    assert got.frames.dtype == torch.bfloat16
    scale = want.frames.abs().max()
    assert (got.frames.float() - want.frames).abs().max() < 0.08 * scale


def test_building_laion_encoders_shows_no_meshgrid_warning_but_other_calls_still_warn(monkeypatch):
    """laion's Swin code calls torch.meshgrid without ``indexing=``: the warning is silenced while
    HTS-AT (alone or as CLAP's branch) is built, and nowhere else. torch warns once per process (from
    C++), so a stand-in that warns on every call takes its place."""
    import warnings

    real = torch.meshgrid

    def meshgrid(*args, **kwargs):
        if "indexing" not in kwargs:
            warnings.warn("torch.meshgrid: in an upcoming release, it will be required to pass the indexing "
                          "argument.", UserWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "meshgrid", meshgrid)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HTSATEncoder(HTSATEncoder.Config(**TINY_HTSAT))
        CLAPAudioEncoder(CLAPAudioEncoder.Config(**TINY_CLAP))
        assert not [w for w in caught if "meshgrid" in str(w.message)]
        torch.meshgrid(torch.arange(2), torch.arange(2))  # a user's own call still warns
    assert len([w for w in caught if "meshgrid" in str(w.message)]) == 1


@pytest.mark.parametrize("patch_norm", [True, False])
def test_htsat_patch_norm_false_keeps_the_input_level_in_the_patch_tokens(patch_norm):
    """The same noise 10 and 20 dB louder: the log-mel moves by exactly 10 and 20 dB. Without the patch
    LayerNorm every patch token moves along a fixed direction in proportion (the level can be read off
    linearly); with it each token is rescaled to unit spread, whatever the level (the HTS-AT default)."""
    enc = HTSATEncoder(HTSATEncoder.Config(**dict(TINY_HTSAT, patch_norm=patch_norm))).eval()
    tokens = []
    enc.htsat.patch_embed.register_forward_hook(lambda module, args, out: tokens.append(out))
    clip = noise(2.0, 16000)
    with torch.no_grad():
        for gain_db in (0, 10, 20):
            enc(clip[None] * 10 ** (gain_db / 20), torch.tensor([clip.numel()]))
    quiet, louder, loudest = tokens
    if patch_norm:
        for t in tokens:  # LayerNorm (weight 1, bias 0 at initialisation): every token has unit spread
            torch.testing.assert_close(t.std(-1, unbiased=False), torch.ones_like(t[..., 0]), atol=1e-3, rtol=0)
        assert (loudest - quiet - 2 * (louder - quiet)).abs().max() > 0.1 * (louder - quiet).abs().max()
    else:
        step = louder - quiet
        assert step.abs().max() > 0.1
        torch.testing.assert_close(loudest - quiet, 2 * step, atol=1e-3, rtol=1e-3)


def test_htsat_config_that_cannot_fold_the_clip_fails_when_built_with_the_numbers():
    # 4 s at hop 320 = 201 mel frames; spec_size 64 with 32 mel bins folds at most 64 * 2 = 128
    fields = {**TINY_HTSAT, "sample_rate": 16000, "clip_seconds": 4.0, "hop_size": 320, "mel_bins": 32, "spec_size": 64}
    with pytest.raises(ValueError, match=r"201 mel frames.*at most 128"):
        HTSATEncoder.Config(**fields)
    # the same image holds the clip at hop 640 (101 frames): built and run without laion's bare assert
    encoder = HTSATEncoder(HTSATEncoder.Config(**{**fields, "hop_size": 640, "window_size": 1024}))
    out = encoder(torch.randn(1, 64000) * 0.1, torch.tensor([64000]))
    assert out.frames.shape[0] == 1
