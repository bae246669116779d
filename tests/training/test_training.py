"""The training engine at tiny size: loss goes down, frozen stays frozen, checkpoints reload exactly."""

from __future__ import annotations

import json

import pytest
import torch

from alm_kit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.batch import AudioTextDataset, collate
from alm_kit.data.manifest import read_manifest
from alm_kit.training.engine import Trainer, train
from tests.conftest import tiny_recipe_dict


def recipe_for(manifest, **changes):
    data = tiny_recipe_dict(**changes)
    data["data"] = {"train": str(manifest)}
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests below (the tone task: 'high' or 'low')."""
    import json as _json

    from tests.conftest import write_tone

    root = tmp_path_factory.mktemp("tones")
    rows = []
    for i in range(8):
        high = i % 2 == 0
        write_tone(root / f"t{i}.wav", 1500.0 if high else 300.0, 1.5)
        rows.append({"id": f"ex{i}", "audio": f"t{i}.wav", "prompt": "is the tone high or low?",
                     "response": "high" if high else "low"})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(manifest, **{"training.max_steps": 24, "training.lr": 1e-2, "training.warmup_steps": 2})
    trainer = Trainer(recipe, progress=False, run_dir=root / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    return recipe, trainer, before, result, manifest


def test_loss_goes_down(trained):
    _, _, _, result, _ = trained
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.5 * first, result.losses


def test_frozen_encoder_is_unchanged_and_the_rest_trained(trained):
    _, trainer, before, _, _ = trained
    after = trainer.model.state_dict()
    encoder_keys = [k for k in after if k.startswith("encoders.")]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys)  # BN stats too
    assert not torch.equal(before["projector.mapper.linear1.weight"], after["projector.mapper.linear1.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("decoder."))


def test_metrics_and_checkpoint_files(trained):
    _, _, _, result, _ = trained
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.steps == 24
    assert {"step", "loss", "lr", "samples_per_s"} <= set(json.loads(lines[-1]))
    for name in ("model.safetensors", "recipe.yaml", "meta.json", "tokenizer"):
        assert (result.checkpoint / name).exists()
    assert result.checkpoint == result.run_dir / "checkpoints" / "step-24"
    assert (result.run_dir / "checkpoints" / "latest").read_text().strip() == "step-24"
    assert not list(result.checkpoint.parent.glob("*.tmp"))


def test_checkpoint_reload_gives_identical_logits(trained):
    recipe, trainer, _, result, manifest = trained
    model = trainer.model.eval()
    loaded, loaded_recipe = load_checkpoint(result.checkpoint)
    assert loaded_recipe == recipe
    examples = read_manifest(manifest)[:3]
    ds = AudioTextDataset(examples, model.audio_specs)
    batch = collate([ds[i] for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), model.logits(batch), rtol=0, atol=0)


def test_checkpoint_holds_trainable_weights_and_random_init_components_only(trained, tmp_path):
    from safetensors.torch import load_file

    data = tiny_recipe_dict()
    data["model"]["decoder"]["train"] = "frozen"
    recipe = recipe_from_dict(data)
    from alm_kit.model import build_model

    model = build_model(recipe.model)
    saved = load_file(str(save_checkpoint(model, recipe, tmp_path / "ck") / "model.safetensors"))
    # everything here is randomly initialised, so everything is stored (self-contained checkpoint)
    assert set(saved) == set(model.state_dict())
    # a component with pretrained weights stores only what trains
    model.decoder.config.pretrained = "some/hub-id"
    saved = load_file(str(save_checkpoint(model, recipe, tmp_path / "ck2") / "model.safetensors"))
    assert not any(k.startswith("decoder.") for k in saved)


def test_checkpoint_that_does_not_match_its_recipe_is_rejected(trained, tmp_path):
    import shutil

    import yaml

    _, _, _, result, _ = trained
    broken = tmp_path / "ck"
    shutil.copytree(result.checkpoint, broken)
    recipe = yaml.safe_load((broken / "recipe.yaml").read_text())
    recipe["model"]["decoder"]["params"]["config"]["hidden_size"] = 48
    (broken / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not an alm-kit checkpoint"):
        load_checkpoint(tmp_path)


def test_feature_cache_gives_the_same_training_as_encoding_every_step(tone_dataset, tmp_path):
    cached = train(recipe_for(tone_dataset, **{"training.max_steps": 3}), progress=False, run_dir=tmp_path / "a")
    plain = train(recipe_for(tone_dataset, **{"training.max_steps": 3, "training.cache_features": "off"}),
                  progress=False, run_dir=tmp_path / "b")
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)


def test_lora_trains_only_adapters(tone_dataset, tmp_path):
    data = tiny_recipe_dict(**{"training.max_steps": 2})
    data["model"]["decoder"]["train"] = "lora"
    data["model"]["decoder"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    data["data"] = {"train": str(tone_dataset)}
    trainer = Trainer(recipe_from_dict(data), progress=False, run_dir=tmp_path / "run")
    names = [n for n, p in trainer.model.decoder.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    before = {n: p.clone() for n, p in trainer.model.decoder.named_parameters()}
    trainer.fit()
    changed = [n for n, p in trainer.model.decoder.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


def test_skip_bad_audio_counts_skipped_examples(tone_dataset, tmp_path):
    lines = tone_dataset.read_text().splitlines()
    lines.append(json.dumps({"audio": "audio/nope.wav", "prompt": "p", "response": "r"}))
    tone_dataset.write_text("\n".join(lines) + "\n")
    from alm_kit.data.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"train.jsonl:9: audio file not found"):
        train(recipe_for(tone_dataset), progress=False, run_dir=tmp_path / "a")
    data = tiny_recipe_dict(**{"training.max_steps": 1})
    data["data"] = {"train": str(tone_dataset), "skip_bad_audio": True}
    result = train(recipe_from_dict(data), progress=False, run_dir=tmp_path / "b")
    assert result.skipped_examples == 1


def test_generate_cli_answers_from_a_checkpoint(trained, capsys):
    from alm_kit.cli import main

    _, _, _, result, manifest = trained
    audio = str(manifest.parent / "t0.wav")
    assert main(["generate", "--checkpoint", str(result.checkpoint), "--audio", audio,
                 "--prompt", "is the tone high or low?", "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer in {"high", "low"}  # the tiny model has learned the answer format
