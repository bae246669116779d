"""WebDataset shards: manifest -> shards -> the same examples, brace patterns, rank split,
exact positions, and training from shards (with resume)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from alm_kit.audio.io import load_audio
from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.manifest import read_manifest
from alm_kit.data.shards import (
    ShardError,
    count_samples,
    expand_braces,
    read_shard,
    shard_paths,
    write_shards,
)
from alm_kit.interfaces import AudioSpec
from alm_kit.training.data import ShardData, ShuffleBuffer
from tests.conftest import tiny_recipe_dict, write_tone
from tests.training.test_training_run import interrupt_at

SPECS = {"enc": AudioSpec(16000, 1.0)}


@pytest.fixture
def many(tmp_path):
    """20 examples with distinct audio (flac and wav, one or two clips) and metadata."""
    rows = []
    (tmp_path / "audio").mkdir()
    for i in range(20):
        ext = "flac" if i % 3 else "wav"
        write_tone(tmp_path / "audio" / f"c{i}.{ext}", 200.0 + 37 * i, 0.3 + 0.01 * i)
        audio = f"audio/c{i}.{ext}" if i % 4 else [f"audio/c{i}.{ext}", f"audio/c{(i + 1) % 20}.{'flac' if (i + 1) % 3 else 'wav'}"]
        rows.append({"id": f"ex{i}", "audio": audio, "prompt": f"question {i}?", "response": f"answer {i}",
                     "task": "pitch" if i % 2 else "loudness"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def shard(manifest, out, **kw):
    return write_shards(manifest, out, progress=False, **kw)


def ids_of(batches):
    return [i for b in batches for i in b.ids]


def take(data, n):
    it = iter(data)
    return [next(it) for _ in range(n)]


def test_manifest_to_shards_and_back_gives_the_same_examples(many, tmp_path):
    report = shard(many, tmp_path / "shards", max_per_shard=6)
    assert [p.name for p in report.shards] == [f"train-00000{i}.tar" for i in range(4)]
    assert report.pattern == str(tmp_path / "shards" / "train-{000000..000003}.tar")
    assert [count_samples(str(p)) for p in report.shards] == [6, 6, 6, 2]
    original = read_manifest(many)
    streamed = [e for p in shard_paths(report.pattern) for e in read_shard(p)]
    assert [e.id for e in streamed] == [e.id for e in original]
    for a, b in zip(original, streamed):
        assert (a.prompt, a.response, a.meta) == (b.prompt, b.response, b.meta)
        assert [p.read_bytes() for p in a.audio] == [blob.data for blob in b.audio]  # bytes copied, not re-encoded
        for path, blob in zip(a.audio, b.audio):
            wave_a, rate_a = load_audio(path)
            wave_b, rate_b = load_audio(blob)
            assert rate_a == rate_b and np.array_equal(wave_a, wave_b)
    with tarfile.open(report.shards[0]) as tar:
        names = tar.getnames()[:5]
    assert names == ["000000.json", "000000.0.wav", "000000.1.flac", "000001.json", "000001.0.flac"]
    # the same manifest gives byte-identical shards
    again = shard(many, tmp_path / "again", max_per_shard=6)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(report.shards, again.shards))


def test_shards_close_at_the_byte_limit(many, tmp_path):
    report = shard(many, tmp_path / "s", max_per_shard=1000, max_shard_bytes=30_000)
    assert len(report.shards) > 2 and sum(count_samples(str(p)) for p in report.shards) == 20


def test_brace_patterns_and_shard_lists(tmp_path):
    assert expand_braces("s/train-{000008..000011}.tar") == [f"s/train-0000{i:02d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ShardError, match="backwards"):
        expand_braces("x-{3..1}.tar")
    assert shard_paths("train.jsonl") is None and shard_paths(None) is None
    for name in ("a-0.tar", "a-1.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    assert shard_paths([str(tmp_path / "a-{0..1}.tar"), str(tmp_path / "b.tar")]) == [
        str(tmp_path / n) for n in ("a-0.tar", "a-1.tar", "b.tar")]
    with pytest.raises(ShardError, match=r"shard not found: .*a-2.tar"):
        shard_paths(str(tmp_path / "a-{0..2}.tar"))
    with pytest.raises(ShardError, match="not a tar shard"):
        shard_paths([str(tmp_path / "b.tar"), "train.jsonl"])


def test_each_rank_reads_its_own_shards(many, tmp_path):
    paths = [str(p) for p in shard(many, tmp_path / "s", max_per_shard=5).shards]  # 4 shards of 5
    by_shard = [[e.id for e in read_shard(p)] for p in paths]
    ranks = [ShardData(paths, SPECS, 5, rank=r, world=2, seed=3) for r in range(2)]
    seen = [set(ids_of(take(d, d.batches_per_epoch))) for d in ranks]
    assert seen[0] == set(by_shard[0] + by_shard[2]) and seen[1] == set(by_shard[1] + by_shard[3])
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 2
    with pytest.raises(ShardError, match="4 shard\\(s\\) for 5 ranks"):
        ShardData(paths, SPECS, 5, rank=0, world=5)


def test_unequal_ranks_take_the_same_number_of_samples(many, tmp_path):
    paths = [str(p) for p in shard(many, tmp_path / "s", max_per_shard=6).shards]  # 6, 6, 6, 2
    a, b = (ShardData(paths, SPECS, 4, rank=r, world=2) for r in range(2))
    assert a.samples_per_epoch == b.samples_per_epoch == 8  # rank 1 holds 6 + 2
    assert len(ids_of(take(a, a.batches_per_epoch))) == 8


def test_epochs_visit_every_sample_once_in_a_new_order(many, tmp_path):
    paths = [str(p) for p in shard(many, tmp_path / "s", max_per_shard=6).shards]
    data = ShardData(paths, SPECS, 4, seed=1, shuffle_buffer=5)
    epochs = take(data, 2 * data.batches_per_epoch)
    first, second = ids_of(epochs[:5]), ids_of(epochs[5:])
    assert sorted(first) == sorted(second) == sorted(f"ex{i}" for i in range(20))
    assert first != second
    assert first == ids_of(take(ShardData(paths, SPECS, 4, seed=1, shuffle_buffer=5), 5))  # deterministic
    assert first != ids_of(take(ShardData(paths, SPECS, 4, seed=2, shuffle_buffer=5), 5))


def test_shuffle_buffer_over_positions_gives_the_order_over_items():
    def run(items):
        buffer = ShuffleBuffer(4, np.random.default_rng(0))
        out = [x for item in items if (x := buffer.push(item)) is not None]
        return out + buffer.drain()

    assert [s for s, _ in run([(i, f"sample {i}") for i in range(11)])] == run(list(range(11)))


# 20 samples, batches of 3 (7 per epoch), a buffer of 3: the live phase emits 17, the final drain 3.
# Resume mid-epoch, in the drain (sample 18), at the epoch boundary, and in the next epoch.
@pytest.mark.parametrize("done", [1, 4, 6, 7, 9])
def test_a_resumed_stream_continues_exactly(many, tmp_path, done):
    paths = [str(p) for p in shard(many, tmp_path / "s", max_per_shard=6).shards]
    make = lambda: ShardData(paths, SPECS, 3, seed=5, shuffle_buffer=3)  # noqa: E731
    reference = take(make(), 12)
    interrupted = make()
    take(interrupted, done)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain values (stored in checkpoints)
    assert (state["epoch"], state["index"]) == (done // 7, done % 7)
    assert state["shard"] in paths and 0 <= state["shard_sample"] < 6
    resumed = make()
    resumed.load_state_dict(state)
    rest = take(resumed, 12 - done)
    assert ids_of(rest) == ids_of(reference[done:])
    for a, b in zip(rest, reference[done:]):  # the audio too
        for enc in a.waveforms:
            assert np.array_equal(a.waveforms[enc].numpy(), b.waveforms[enc].numpy())


def test_position_from_other_shards_or_ranks_is_refused(many, tmp_path):
    paths = [str(p) for p in shard(many, tmp_path / "s", max_per_shard=5).shards]
    state = ShardData(paths, SPECS, 4).state_dict()
    with pytest.raises(ShardError, match="same shards and ranks"):
        ShardData(paths, SPECS, 4, world=2, rank=0).load_state_dict(state)


def test_a_malformed_sample_names_shard_and_key(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("000001.json", json.dumps({"prompt": "p", "response": "r"}).encode()),
                           ("000002.0.wav", b"RIFF")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"bad.tar:000001: sample has no audio member"):
        list(read_shard(str(path)))


def shard_recipe(pattern, run_dir, **changes):
    data = tiny_recipe_dict(**{"training.max_steps": 6, "training.batch_size": 2, "training.lr": 1e-2,
                               **changes})
    data["data"] = {"train": pattern, "shuffle_buffer": 3}
    data["training"]["output_dir"] = str(run_dir)
    data["model"]["projector"]["params"]["dropout"] = 0.1
    return recipe_from_dict(data)


def test_a_tiny_recipe_trains_from_shards_and_resumes_exactly(tone_dataset, tmp_path, monkeypatch):
    from alm_kit.training.engine import train

    pattern = shard(tone_dataset, tmp_path / "shards", max_per_shard=3).pattern  # 3 shards: 3, 3, 2
    whole = train(shard_recipe(pattern, tmp_path / "whole"), progress=False)
    assert whole.steps == 6 and all(np.isfinite(whole.losses))
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        first = train(shard_recipe(pattern, tmp_path / "split"), progress=False)
    assert first.interrupted and first.steps == 3
    second = train(shard_recipe(pattern, tmp_path / "split"), progress=False, resume=True)
    assert first.losses + second.losses == pytest.approx(whole.losses, abs=1e-6, rel=0)


def test_training_from_shards_with_and_without_the_feature_cache(tone_dataset, tmp_path):
    from alm_kit.training.engine import train

    pattern = shard(tone_dataset, tmp_path / "shards", max_per_shard=3).pattern
    short = {"training.max_steps": 3}
    cached = train(shard_recipe(pattern, tmp_path / "cached", **short), progress=False)  # auto: disk
    plain = train(shard_recipe(pattern, tmp_path / "plain", **short, **{"training.cache_features": "off"}),
                  progress=False)
    assert plain.losses == pytest.approx(cached.losses, rel=1e-4)


def test_data_shard_cli(many, tmp_path, capsys):
    from alm_kit.cli import main

    assert main(["data", "shard", str(many), str(tmp_path / "out"), "--max-per-shard", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 20 examples" in out and "3 shard(s)" in out
    assert f"data.train: {tmp_path / 'out'}/train-{{000000..000002}}.tar" in out


def test_cache_cli_reads_shards(tone_dataset, tmp_path, capsys):
    import yaml

    from alm_kit.cli import main

    pattern = shard(tone_dataset, tmp_path / "shards", max_per_shard=3).pattern
    data = tiny_recipe_dict()
    data["data"] = {"train": pattern}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["cache", str(recipe), f"training.cache_dir={tmp_path / 'cache'}", "--quiet"]) == 0
    # 8 examples with 12 clip references, two distinct sounds (high and low tones)
    assert "train: 2 clips: 0 hits, 2 misses" in capsys.readouterr().out


@pytest.mark.slow
def test_two_ranks_under_torchrun_read_their_own_shards(tone_dataset, tmp_path):
    """2 gloo processes, 2 shards: each rank fills the shared disk cache from its own shard and the
    ranks end with the same weights; with 1 shard for 2 ranks the run stops with a clear message."""
    import torch
    import yaml

    from tests.training.test_distributed import WORKER, recipe_dict, torchrun

    (tmp_path / "worker.py").write_text(WORKER)
    for shards, name in ((2, "ok"), (1, "short")):
        pattern = shard(tone_dataset, tmp_path / name, max_per_shard=8 // shards).pattern
        data = recipe_dict(pattern, tmp_path / f"run-{name}", **{"training.cache_dir": str(tmp_path / "cache")})
        data["data"]["train"] = pattern
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(data))
        out = torchrun(str(tmp_path / "worker.py"), str(recipe), str(tmp_path), cwd=tmp_path)
        if shards == 1:
            assert out.returncode != 0 and "1 shard(s) for 2 ranks" in out.stderr
            continue
        assert out.returncode == 0, out.stderr[-3000:]
        ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for key, tensor in ranks[0].items():
            torch.testing.assert_close(ranks[1][key], tensor, rtol=0, atol=0, msg=key)
        assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2  # the two sounds, once
