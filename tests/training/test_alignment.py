"""The alignment objective (BLIP-2 stage 1 with open_clip's ClipLoss) and warm starts from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from alm_kit.checkpoint import init_from_checkpoint
from alm_kit.config.loader import load_recipe, recipe_from_dict
from alm_kit.errors import CheckpointError
from alm_kit.model import build_model
from alm_kit.training.engine import Trainer, train
from alm_kit.training.objectives import ContrastiveAlignment, LanguageModeling, build_objective
from tests.conftest import tiny_recipe_dict, write_tone
from tests.test_model import make_batch

CAPTIONS = ["a high tone", "a low tone", "two short beeps", "rain and wind", "a dog and a bird", "music"]


def align_dict(manifest=None, **changes) -> dict:
    data = tiny_recipe_dict(**{"model.decoder.train": "frozen", "training.objective": "align",
                               "training.lr": 1e-2, "training.batch_size": 6, "training.max_steps": 30,
                               "training.schedule": "constant", **changes})
    if manifest is not None:
        data["data"] = {"train": str(manifest)}
    return data


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Six clips of different content, each with its own caption (the response)."""
    root = tmp_path_factory.mktemp("captions")
    rows = []
    for i, caption in enumerate(CAPTIONS):
        write_tone(root / f"c{i}.wav", 200.0 * (i + 1) ** 1.5, 0.5 + 0.25 * i)
        rows.append({"audio": f"c{i}.wav", "prompt": "describe the audio", "response": caption})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_align_loss_decreases(captions, tmp_path):
    result = train(recipe_from_dict(align_dict(captions)), progress=False, run_dir=tmp_path / "run")
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, result.losses
    assert first == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=0.5)  # ~chance at the start


def test_align_gradients_reach_only_the_audio_path_and_the_objective():
    data = align_dict()
    data["model"]["encoders"][0]["train"] = "full"
    recipe = recipe_from_dict(data)
    model = build_model(recipe.model).train()
    objective = build_objective(model, recipe)
    assert isinstance(objective, ContrastiveAlignment)
    batch = make_batch(model, clips_per_example=(1, 2))
    out = objective(model, batch)
    assert torch.isfinite(out.loss) and out.num_tokens == 2
    out.loss.backward()

    def grads(module):
        return [p.grad for p in module.parameters()]

    for part in (model.projector, model.encoders["htsat"]):
        assert any(g is not None and g.abs().sum() > 0 for g in grads(part))
    assert all(g is None for g in grads(model.decoder))  # the decoder only supplies embeddings
    assert objective.logit_scale.grad is not None and objective.text_head.weight.grad is not None
    groups = objective.param_groups(recipe)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in objective.parameters()}
    assert isinstance(build_objective(model, recipe_from_dict(tiny_recipe_dict())), LanguageModeling)


def test_align_starts_from_identity_head_and_clip_temperature():
    recipe = recipe_from_dict(align_dict())
    model = build_model(recipe.model)
    objective = build_objective(model, recipe)
    torch.testing.assert_close(objective.text_head.weight, torch.eye(model.decoder.hidden_size))
    assert objective.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    # the audio embedding of a two-clip example is the mean over both clips' valid tokens
    batch = make_batch(model, clips_per_example=(1, 2))
    with torch.no_grad():
        audio = objective.audio_embedding(model.eval(), batch)
        text = model.layout.tokenize(batch.prompts)
        tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
    valid = tokens.embeds[1:][tokens.mask[1:]]
    torch.testing.assert_close(audio[1], valid.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"model.decoder.train": "full"}, "model.decoder.train: frozen"),
    ({"training.batch_size": 1}, "batch_size must be >= 2"),
])
def test_align_refuses_settings_it_cannot_honour(changes, message):
    recipe = recipe_from_dict(align_dict(**changes))
    with pytest.raises(ValueError, match=message):
        build_objective(build_model(recipe.model), recipe)


def test_pre_aligned_projector_is_fine_tuned_by_a_recipe_that_extends_the_alignment_one(captions, tmp_path):
    (tmp_path / "align.yaml").write_text(yaml.safe_dump(align_dict(captions, **{"training.max_steps": 4})))
    (tmp_path / "finetune.yaml").write_text(
        "extends: align.yaml\n"
        "name: finetune\n"
        "model: {decoder: {train: full}}\n"
        "training: {objective: lm, max_steps: 3, lr: 1.0e-3, init_components: [projector]}\n")
    aligned = train(load_recipe(tmp_path / "align.yaml"), progress=False, run_dir=tmp_path / "align")
    # init_from takes the run folder (its latest checkpoint) or a checkpoint directory
    recipe = load_recipe(tmp_path / "finetune.yaml", [f"training.init_from={tmp_path / 'align'}"])
    assert recipe.model.decoder.train == "full" and recipe.training.objective == "lm"
    assert recipe.model.projector.name == "mlp" and recipe.data.train == str(captions)  # inherited
    trainer = Trainer(recipe, progress=False, run_dir=tmp_path / "finetune")
    from safetensors.torch import load_file

    saved = load_file(str(aligned.checkpoint / "model.safetensors"))
    own = trainer.model.state_dict()
    projector = [k for k in own if k.startswith("projector.")]
    assert projector and all(torch.equal(own[k], saved[k]) for k in projector)
    fresh = build_model(recipe.model, seed=recipe.training.seed).state_dict()
    assert all(torch.equal(own[k], fresh[k]) for k in own if k.startswith("decoder."))  # not taken over
    assert not all(torch.equal(fresh[k], saved[k]) for k in projector)  # alignment did change the projector
    result = trainer.fit()
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(trainer.model.state_dict()[k], saved[k]) for k in projector)


def test_init_from_errors_name_the_problem(captions, tmp_path):
    model = build_model(recipe_from_dict(tiny_recipe_dict()).model)
    with pytest.raises(CheckpointError, match="not an alm-kit checkpoint"):
        init_from_checkpoint(model, tmp_path)
    from safetensors.torch import save_file

    save_file({"projector.mapper.linear1.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown component.*projektor.*this model has: encoders.htsat"):
        init_from_checkpoint(model, tmp_path, ["projektor"])
    with pytest.raises(CheckpointError, match="holds no weights of decoder"):
        init_from_checkpoint(model, tmp_path, ["decoder"])
    with pytest.raises(CheckpointError, match=r"other shapes for projector.mapper.linear1.weight \(3, 3\)"):
        init_from_checkpoint(model, tmp_path, ["projector"])
