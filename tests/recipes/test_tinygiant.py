"""The shipped TinyGiantALM recipe, its ablations, and its toy-size variant (which trains and generates offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alm_kit.cli import main
from alm_kit.config.loader import load_recipe, recipe_to_dict
from alm_kit.decoders.causal_lm import presets
from alm_kit.encoders.whisper import whisper_dims
from alm_kit.interfaces import StreamInfo
from alm_kit.model import model_entries
from alm_kit.registry.build import resolve_component
from tests.conftest import assert_differs

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ABLATIONS = {"vanilla": {"intent_query": False, "semantic_gate": False},
             "no-intent": {"intent_query": False}, "no-gate": {"semantic_gate": False}}


def flat(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


@pytest.mark.parametrize("path", ["tinygiant.yaml"] + [f"tinygiant/{n}.yaml" for n in (*ABLATIONS, "tiny")])
def test_tinygiant_recipes_validate(path, capsys):
    assert main(["recipe", "validate", str(RECIPES / path)]) == 0
    assert ": ok (" in capsys.readouterr().out
    recipe = load_recipe(RECIPES / path)
    for kind, spec, key in model_entries(recipe.model):  # every component resolves without building
        resolve_component(kind, spec, key)


def test_tinygiant_has_the_papers_settings():
    recipe = load_recipe(RECIPES / "tinygiant.yaml")
    m, t = recipe.model, recipe.training
    assert [e.name for e in m.encoders] == ["whisper", "htsat", "clap"]
    assert all(e.train == "frozen" for e in m.encoders)
    assert m.encoders[0].params == {"size": "large-v3-turbo", "pretrained": True}
    assert m.encoders[1].params["sample_rate"] == 48000
    assert m.fusion.name == "concat" and m.fusion.params == {"length": 300, "temporal_only": True}
    assert m.projector.name == "ebranchformer" and m.projector.params["num_blocks"] == 2
    assert m.projector.params["intent_query"] and m.projector.params["semantic_gate"]
    assert m.decoder.params == {"preset": "qwen3-0.6b"} and m.layout.name == "placeholder"
    assert (m.projector.lr, m.decoder.lr, m.decoder.train) == (1e-4, 5e-5, "full")
    assert (t.epochs, t.batch_size * t.grad_accum_steps, t.precision, t.max_response_tokens) == (3, 32, "bf16", 2048)
    assert m.layout.params["max_prompt_tokens"] == 2048 and recipe.data.response_template == "cota"


def test_paper_widths_and_the_gate_columns_add_up():
    """Whisper-turbo 1280 + HTS-AT 768 frames = 2048; pooled adds CLAP's 512 at [2048, 2560); Qwen3 d = 1024."""
    from alm_kit.encoders.htsat import HTSATEncoder
    from alm_kit.projectors.ebranchformer import EBranchformerProjector

    recipe = load_recipe(RECIPES / "tinygiant.yaml")
    whisper = whisper_dims("large-v3-turbo").n_audio_state
    htsat_cfg = HTSATEncoder.Config(**recipe.model.encoders[1].params)
    htsat = htsat_cfg.embed_dim * 2 ** (len(htsat_cfg.depths) - 1)
    clap = 512
    assert (whisper, htsat) == (1280, 768)
    params = recipe.model.projector.params
    assert tuple(params["gate_slice"]) == (whisper + htsat, whisper + htsat + clap)
    d = presets()["qwen3-0.6b"]["hidden_size"]
    proj = EBranchformerProjector(EBranchformerProjector.Config(**params),
                                  StreamInfo(frame_dim=whisper + htsat, pooled_dim=whisper + htsat + clap), d)
    assert proj.gate.in_features == clap and proj.audio_in.in_features == 2048
    assert sum(p.numel() for p in proj.parameters()) == 48_914_432  # docs/projectors.md


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablations_change_only_what_they_ablate(name):
    base = flat(recipe_to_dict(load_recipe(RECIPES / "tinygiant.yaml")))
    ablation = flat(recipe_to_dict(load_recipe(RECIPES / "tinygiant" / f"{name}.yaml")))
    changed = {k for k in base.keys() | ablation.keys() if base.get(k) != ablation.get(k)}
    expected = {f"model.projector.params.{k}" for k in ABLATIONS[name]}
    assert changed == expected | {"name", "description"}
    for key, value in ABLATIONS[name].items():
        assert ablation[f"model.projector.params.{key}"] is value


@pytest.mark.slow
def test_tiny_tinygiant_trains_and_generates(tmp_path):
    from alm_kit.checkpoint import load_checkpoint
    from alm_kit.evaluation.formats import read_benchmark
    from alm_kit.inference.engine import Request, generate
    from alm_kit.training.engine import train

    data = tmp_path / "data"
    recipe = load_recipe(RECIPES / "tinygiant" / "tiny.yaml", [
        f"data.synth.out_dir={data}", f"data.train={data}/train.jsonl", "data.eval=null",
        "data.synth.n_train=12", "data.synth.n_test=4", "training.max_steps=3", "training.batch_size=4"])
    result = train(recipe, progress=False, run_dir=tmp_path / "run")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    model, saved = load_checkpoint(result.checkpoint)
    assert saved.model == recipe.model
    assert list(model.encoders) == ["whisper", "htsat", "clap"]
    assert model.fusion.info.frame_dim == 64 + 64 and model.fusion.info.pooled_dim == 64 + 64 + 16
    assert model.projector.gate.in_features == 16 and model.projector.gate_columns == (128, 144)
    assert model.decoder.lm.config.model_type == "qwen3"
    items = read_benchmark(data / "test.json").items
    outputs = generate(model, [Request(audio=i.audio, prompt=i.question) for i in items], saved.generation)
    assert len(outputs) == len(items) and all(isinstance(o, str) for o in outputs)
    # the prompt reaches the audio tokens (intent query) through the real model path
    from alm_kit.inference.engine import make_batch

    batch = make_batch(model, [Request(audio=items[0].audio, prompt=p) for p in ("how many beeps?", "which is louder?")])
    with torch.no_grad():
        text = model.layout.tokenize(batch.prompts)
        tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
    assert_differs(tokens.embeds[0], tokens.embeds[1])
