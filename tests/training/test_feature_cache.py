"""The frozen-encoder feature cache: exact hits, keys that change with every encoder setting,
content (not path) identity, atomic writes, and training from it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from alm_kit.audio.io import load_audio, prepare_for_specs
from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.batch import collate_waveforms
from alm_kit.model import build_model
from alm_kit.training.engine import train
from alm_kit.training.feature_cache import (
    ClipFeatures,
    DiskStore,
    FeatureCache,
    MemoryStore,
    cache_plan,
    from_tensors,
    open_cache,
    to_tensors,
)
from tests.components.test_encoders import TINY_WHISPER
from tests.conftest import TINY_HTSAT, tiny_recipe_dict, write_tone


def model_with(**htsat_changes):
    data = tiny_recipe_dict()
    data["model"]["encoders"][0]["params"] = {**TINY_HTSAT, **htsat_changes}
    return build_model(recipe_from_dict(data).model).eval()


def disk_cache(model, root, dtype="float32") -> FeatureCache:
    return FeatureCache.for_model(model, DiskStore(root, dtype))


@pytest.fixture
def tones(tmp_path):
    return [write_tone(tmp_path / f"t{i}.wav", 300.0 * (i + 1), 1.0 + 0.5 * i) for i in range(3)]


def encoded_alone(model, path):
    """What the model computes for one clip (evaluation crop), as the training path would."""
    clip = prepare_for_specs(*load_audio(path), model.audio_specs)
    waveforms, lengths = collate_waveforms([clip], list(model.audio_specs))
    with torch.no_grad():
        return model.encode(waveforms, lengths)


def test_disk_hit_returns_exactly_the_computed_features(tones, tmp_path):
    model = model_with()  # HTS-AT "sed" with 32x repeated frames: stored run-length encoded
    cache = disk_cache(model, tmp_path / "cache")
    # one clip per encoder call, so that the comparison below is bit for bit (batched BLAS may round differently)
    report = cache.fill(model, tones, progress=False, batch_size=1)
    assert (report.clips, report.hits, report.misses) == (3, 0, 3)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    fresh = disk_cache(model, tmp_path / "cache")  # a new process would start like this
    for path in tones:
        got = fresh.lookup(path)["htsat"]
        want = encoded_alone(model, path)["htsat"]
        assert torch.equal(got.frames, want.frames[0]) and torch.equal(got.mask, want.mask[0])
        assert torch.equal(got.pooled, want.pooled[0])
    again = fresh.fill(model, tones, progress=False)
    assert (again.hits, again.misses, again.written_bytes) == (3, 0, 0)


def test_repeated_frames_are_stored_once():
    frames = torch.randn(4, 5).repeat_interleave(8, 0)
    clip = ClipFeatures(frames, torch.ones(32, dtype=torch.bool), torch.randn(3))
    stored = to_tensors(clip, torch.float32)
    assert stored["frames"].shape == (4, 5) and stored["repeats"].tolist() == [8] * 4
    back = from_tensors(stored)
    assert torch.equal(back.frames, frames) and torch.equal(back.pooled, clip.pooled)
    varied = ClipFeatures(torch.randn(6, 5), torch.ones(6, dtype=torch.bool))
    assert "repeats" not in to_tensors(varied, torch.float32)
    assert torch.equal(from_tensors(to_tensors(varied, torch.float32)).frames, varied.frames)


@pytest.mark.parametrize("change", [{"output": "fine_grained"}, {"clip_seconds": 1.5}, {"pad": "repeat"},
                                    {"init_seed": 1}])
def test_changing_an_encoder_setting_is_a_miss(tones, tmp_path, change):
    root = tmp_path / "cache"
    disk_cache(model_with(), root).fill(model_with(), tones, progress=False)
    changed = model_with(**change)
    report = disk_cache(changed, root).fill(changed, tones, progress=False)
    assert (report.hits, report.misses) == (0, 3)
    assert len(list(root.glob("htsat-*/encoder.json"))) == 2  # two encoder folders side by side


def test_storage_dtype_is_part_of_the_key_and_float16_is_close(tones, tmp_path):
    model = model_with()
    full = disk_cache(model, tmp_path / "c")
    full.fill(model, tones, progress=False)
    half = disk_cache(model, tmp_path / "c", "float16")
    assert half.keys != full.keys
    assert half.fill(model, tones, progress=False).misses == 3
    a, b = full.lookup(tones[0])["htsat"], half.lookup(tones[0])["htsat"]
    assert b.frames.dtype == torch.float32
    torch.testing.assert_close(a.frames, b.frames, atol=1e-3, rtol=1e-3)


def test_same_content_under_another_path_is_a_hit(tones, tmp_path):
    model = model_with()
    disk_cache(model, tmp_path / "cache").fill(model, tones, progress=False)
    elsewhere = tmp_path / "copy" / "renamed.wav"
    elsewhere.parent.mkdir()
    shutil.copy(tones[1], elsewhere)
    cache = disk_cache(model, tmp_path / "cache")
    report = cache.fill(model, [elsewhere], progress=False)
    assert (report.hits, report.misses) == (1, 0)
    assert torch.equal(cache.lookup(elsewhere)["htsat"].frames, cache.lookup(tones[1])["htsat"].frames)


def test_digest_memo_notices_a_rewritten_file(tones, tmp_path):
    model = model_with()
    cache = disk_cache(model, tmp_path / "cache")
    cache.fill(model, tones, progress=False)
    write_tone(tones[0], 5000.0, 2.0)  # new content, new size, new mtime
    report = disk_cache(model, tmp_path / "cache").fill(model, tones, progress=False)
    assert (report.hits, report.misses) == (2, 1)


def test_a_crash_while_writing_leaves_no_entry(tones, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    model = model_with()
    cache = disk_cache(model, tmp_path / "cache")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(model, tones[:1], progress=False)
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.undo()
    assert cache.fill(model, tones[:1], progress=False).misses == 1


def test_variable_length_frames_are_cut_to_the_clip(tmp_path):
    """Whisper with pad: none: a cached clip holds its own frames only, equal to encoding it alone."""
    data = tiny_recipe_dict()
    data["model"]["encoders"] = [{"name": "whisper", "train": "frozen", "params": {**TINY_WHISPER, "pad": "none"}}]
    data["model"]["projector"] = {"name": "mlp", "params": {"dropout": 0.0}}
    model = build_model(recipe_from_dict(data).model).eval()
    clips = [write_tone(tmp_path / "long.wav", 400.0, 2.0), write_tone(tmp_path / "short.wav", 900.0, 0.5)]
    cache = FeatureCache.for_model(model, MemoryStore())
    cache.fill(model, clips, progress=False, batch_size=2)  # batched together: the short one is padded
    short = cache.lookup(clips[1])["whisper"]
    alone = encoded_alone(model, clips[1])["whisper"]
    assert short.frames.shape[0] == alone.frames.shape[1] == 25  # 0.5 s at 50 frames/s
    torch.testing.assert_close(short.frames, alone.frames[0], atol=1e-5, rtol=1e-5)


def test_cache_modes(tmp_path):
    frozen = build_model(recipe_from_dict(tiny_recipe_dict()).model)
    trains = build_model(recipe_from_dict(tiny_recipe_dict(**{"model.encoders": [
        {"name": "htsat", "train": "full", "params": dict(TINY_HTSAT)}]})).model)
    assert cache_plan("auto", frozen) == ("disk", ["htsat"]) and cache_plan("auto", trains) == ("off", [])
    assert cache_plan("memory", frozen) == ("memory", ["htsat"]) and cache_plan("off", frozen) == ("off", [])
    with pytest.raises(ValueError, match="needs at least one encoder frozen"):
        cache_plan("disk", trains)
    recipe = recipe_from_dict(tiny_recipe_dict(**{"training.cache_dir": str(tmp_path / "here")}))
    cache = open_cache(build_model(recipe.model), recipe.training)
    assert cache.store.root == tmp_path / "here" and (tmp_path / "here").is_dir()


def two_encoder_recipe(**changes) -> dict:
    """ALARM's situation at toy size: a frozen HTS-AT, and a frozen Whisper whose layer mix trains."""
    data = tiny_recipe_dict(**changes)
    data["model"]["encoders"] = [
        {"name": "htsat", "train": "frozen", "params": dict(TINY_HTSAT)},
        {"name": "whisper", "train": "frozen", "trainable": ["layer_weights"],
         "params": dict(TINY_WHISPER, pad="none", clip_seconds=2.0, layers=[1, 3])},
    ]
    data["model"]["fusion"] = {"name": "concat", "params": {"length": 8}}
    data["model"]["projector"] = {"name": "mlp", "params": {"style": "gelu", "dropout": 0.0}}
    data["model"]["layout"] = {"name": "placeholder"}
    return data


def test_a_cache_of_the_frozen_encoders_trains_as_without_one(tone_dataset, tmp_path):
    """The frozen HTS-AT is cached, Whisper (trainable layer mix) runs at every step on the clips:
    the same losses as without a cache, and the cache holds HTS-AT's features only."""
    model = build_model(recipe_from_dict(two_encoder_recipe()).model)
    assert model.cacheable_encoders == ["htsat"] and not model.encoders_frozen
    assert cache_plan("auto", model) == ("disk", ["htsat"])
    # a live encoder cropping at random would see other parts of a clip than the cached one: no cache
    crops = two_encoder_recipe()
    crops["model"]["encoders"][1]["params"]["crop"] = "random"
    assert cache_plan("auto", build_model(recipe_from_dict(crops).model)) == ("off", [])

    def run(mode, name):
        data = two_encoder_recipe(**{"training.max_steps": 3, "training.cache_features": mode,
                                     "training.cache_dir": str(tmp_path / "cache")})
        data["data"] = {"train": str(tone_dataset)}
        return train(recipe_from_dict(data), progress=False, run_dir=tmp_path / name)

    from alm_kit.encoders.htsat import HTSATEncoder

    encoded = []
    forward = HTSATEncoder.forward

    def counting(self, waveforms, lengths):
        encoded.append(waveforms.shape[0])
        return forward(self, waveforms, lengths)

    off = run("off", "a")
    HTSATEncoder.forward = counting
    try:
        memory = run("memory", "b")
    finally:
        HTSATEncoder.forward = forward
    # HTS-AT ran once per distinct sound while filling, never in the steps (the trainer reads the cache)
    assert sum(encoded) == 2, encoded
    disk = run("auto", "c")
    assert memory.losses == pytest.approx(off.losses, rel=1e-4)
    assert disk.losses == memory.losses
    # the layer mix trained beside the cache (it starts uniform: all zeros)
    from safetensors.torch import load_file

    mix = load_file(disk.checkpoint / "model.safetensors")["encoders.whisper.layer_weights"]
    assert mix.abs().max() > 1e-4
    stored = list((tmp_path / "cache").rglob("*.safetensors"))
    # 8 files but two distinct sounds (entries are keyed by content), one cached encoder
    assert len(stored) == 2 and all(p.parent.parent.name.startswith("htsat-") for p in stored)

    # the batches: cached HTS-AT features beside Whisper's waveforms
    cache = FeatureCache.for_model(model, MemoryStore(), ["htsat"])
    clip = tone_dataset.parent / "audio" / "t0.wav"
    cache.fill(model, [clip], progress=False)
    from alm_kit.data.batch import collate, example_item
    from alm_kit.data.manifest import Example

    item = example_item(Example(id="x", audio=[clip], prompt="p", response="r"), model.audio_specs, train=True,
                        rng=np.random.default_rng(0), cache=cache)
    batch = collate([item])
    assert list(batch.features) == ["htsat"] and list(batch.waveforms) == ["whisper"]
    with torch.no_grad():
        features = model.batch_features(batch)
        alone = encoded_alone(model, clip)
    assert list(features) == ["htsat", "whisper"]
    for name in features:
        torch.testing.assert_close(features[name].frames, alone[name].frames, atol=1e-5, rtol=1e-5)


def test_default_cache_dir_honours_alm_kit_cache(monkeypatch, tmp_path):
    from alm_kit.training.feature_cache import default_cache_dir, resolve_cache_dir

    monkeypatch.setenv("ALM_KIT_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "features"
    monkeypatch.delenv("ALM_KIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "alm-kit" / "features"
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"


def test_training_from_disk_memory_and_no_cache_gives_the_same_losses(tone_dataset, tmp_path):
    def run(mode, name):
        data = tiny_recipe_dict(**{"training.max_steps": 3, "training.cache_features": mode,
                                   "training.cache_dir": str(tmp_path / "cache")})
        data["data"] = {"train": str(tone_dataset)}
        return train(recipe_from_dict(data), progress=False, run_dir=tmp_path / name).losses

    off, memory, disk = run("off", "a"), run("memory", "b"), run("disk", "c")
    disk_again = run("disk", "d")  # every clip a hit now
    assert memory == pytest.approx(off, rel=1e-4)
    assert disk == memory and disk_again == disk
    # 8 files, but only two distinct sounds (a high and a low tone): content keys store each once
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


def test_cache_cli_reports_hits_and_misses(tone_dataset, tmp_path, capsys):
    import yaml

    from alm_kit.cli import main

    data = tiny_recipe_dict()
    data["data"] = {"train": str(tone_dataset)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    cache_dir = f"training.cache_dir={tmp_path / 'cache'}"
    assert main(["cache", str(recipe), cache_dir, "--quiet"]) == 0
    assert "2 clips: 0 hits, 2 misses" in capsys.readouterr().out  # 8 files, 2 distinct sounds
    assert main(["cache", str(recipe), cache_dir, "--quiet"]) == 0
    assert "2 clips: 2 hits, 0 misses" in capsys.readouterr().out


def test_cache_cli_refuses_a_recipe_whose_encoder_trains(tone_dataset, tmp_path, capsys):
    import yaml

    from alm_kit.cli import main

    data = tiny_recipe_dict()
    data["model"]["encoders"][0]["train"] = "full"
    data["data"] = {"train": str(tone_dataset)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["cache", str(recipe), "--quiet"]) == 2
    assert "every encoder trains" in capsys.readouterr().err


def test_a_resident_copy_gives_the_stored_features_or_none_when_over_budget(tones, tmp_path):
    """``training.cache_on_device``: the entries of the training clips copied into a device-memory store
    (the CPU stands in for the GPU here) look up exactly like the disk cache; over the budget: None."""
    model = model_with()
    cache = disk_cache(model, tmp_path / "cache")
    cache.fill(model, tones, progress=False)
    resident = cache.on_device(tones + tones[:1], torch.device("cpu"), budget_bytes=1 << 30)
    assert isinstance(resident.store, MemoryStore) and len(resident.store) == 3
    for path in tones:
        got, want = resident.lookup(path)["htsat"], cache.lookup(path)["htsat"]
        assert torch.equal(got.frames, want.frames) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.pooled, want.pooled)
    assert cache.on_device(tones, torch.device("cpu"), budget_bytes=100) is None


def test_cache_cli_names_the_live_encoder_whose_random_crop_turns_auto_off(tone_dataset, tmp_path, capsys):
    import yaml

    from alm_kit.cli import main

    data = two_encoder_recipe()
    data["model"]["encoders"][1]["params"]["crop"] = "random"
    data["data"] = {"train": str(tone_dataset)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["cache", str(recipe), "--quiet", f"training.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "encoder(s) whisper, which run at every step, crop at random" in capsys.readouterr().err
    # asked for explicitly, the frozen HTS-AT is cached anyway
    assert main(["cache", str(recipe), "--quiet", f"training.cache_dir={tmp_path / 'cache'}",
                 "training.cache_features=disk"]) == 0
    assert "2 clips: 0 hits, 2 misses" in capsys.readouterr().out
