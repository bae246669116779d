"""Decoders: presets by name, Qwen3- and SmolLM2-style tiny models, chat templates, thinking mode, CoTA answers."""

from __future__ import annotations

import json

import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.config.parse import ConfigError
from alm_kit.decoders.causal_lm import CausalLMDecoder, presets
from alm_kit.decoders.tiny_tokenizer import build_tiny_tokenizer
from alm_kit.interfaces import IGNORE
from alm_kit.layouts.placeholder import PlaceholderLayout
from alm_kit.model import build_model, model_entries
from alm_kit.registry.build import resolve_component
from alm_kit.text.thinking import format_cota, split_thinking
from tests.conftest import TINY_LLAMA, TINY_QWEN3, tiny_recipe_dict, write_tone

FAMILIES = {"qwen3": (TINY_QWEN3, "builtin:tiny-qwen3"), "llama": (TINY_LLAMA, "builtin:tiny")}


def decoder(family: str) -> CausalLMDecoder:
    config, tokenizer = FAMILIES[family]
    return CausalLMDecoder(CausalLMDecoder.Config(config=dict(config), tokenizer=tokenizer)).eval()


# --------------------------------------------------------------------------- presets
def test_presets_cover_qwen3_and_smollm2_sizes_and_stand_for_hub_ids():
    table = presets()
    for name in ("qwen3-0.6b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b", "smollm2-135m-instruct"):
        assert name in table
    for name, entry in table.items():
        assert set(entry) == {"hub", "family", "hidden_size", "layers", "chat", "thinking"}, name
        assert entry["family"] in FAMILIES and "/" in entry["hub"]
        assert entry["thinking"] <= entry["chat"]  # a thinking switch lives in a chat template
        assert name.split("-")[0] == {"qwen3": "qwen3", "llama": "smollm2"}[entry["family"]]
    assert table["qwen3-0.6b"]["hub"] == "Qwen/Qwen3-0.6B" and table["qwen3-0.6b"]["hidden_size"] == 1024
    config = CausalLMDecoder.Config(preset="smollm2-135m")
    assert config.source == "HuggingFaceTB/SmolLM2-135M"
    assert CausalLMDecoder.Config(pretrained="Qwen/Qwen3-0.6B").source == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("params, message", [
    ({"preset": "qwen3-0.6"}, "unknown decoder preset 'qwen3-0.6'; did you mean 'qwen3-0.6b'"),
    ({"preset": "qwen3-0.6b", "pretrained": "Qwen/Qwen3-0.6B"}, "exactly one of"),
    ({"preset": "smollm2-135m", "config": dict(TINY_LLAMA)}, "exactly one of"),
])
def test_preset_errors_name_the_recipe_key(params, message):
    recipe = recipe_from_dict(tiny_recipe_dict(**{"model.decoder.params": params}))
    [(kind, spec, key)] = [e for e in model_entries(recipe.model) if e[0] == "decoder"]
    with pytest.raises(ConfigError, match=message) as info:
        resolve_component(kind, spec, key)
    assert "model.decoder.params" in str(info.value)


# --------------------------------------------------------------------------- tiny models of both families
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_decoder_embeds_path_matches_the_language_model(family):
    dec = decoder(family)
    assert dec.lm.config.model_type == family and dec.hidden_size == 32
    assert len(dec.tokenizer) == dec.lm.get_input_embeddings().num_embeddings
    ids = torch.tensor([dec.tokenizer.encode("the tone is high", add_special_tokens=False)])
    with torch.no_grad():
        hidden, _ = dec(dec.embed(ids))
        torch.testing.assert_close(dec.logits(hidden), dec.lm(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decoding_uses_the_current_cache_api_without_warnings(family):
    """Prefill then two cached steps: no deprecation warning from transformers (it warned on every call
    that passed ``past_key_values``), and the cached steps give the full-sequence hidden states."""
    import warnings

    dec = decoder(family)
    embeds = dec.embed(torch.tensor([dec.tokenizer.encode("the tone is high and short", add_special_tokens=False)]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        full, _ = dec(embeds)
        hidden, cache = dec(embeds[:, :-2], use_cache=True)
        assert cache is not None
        for k in (-2, -1):
            positions = torch.tensor([[embeds.shape[1] + k]])
            step, cache = dec(embeds[:, k:k + 1 or None], position_ids=positions, past_key_values=cache,
                              use_cache=True)
            hidden = torch.cat([hidden, step], 1)
    torch.testing.assert_close(hidden, full, atol=1e-5, rtol=1e-5)


def test_tiny_tokenizer_flavours():
    smol, qwen = build_tiny_tokenizer(), build_tiny_tokenizer(flavour="tiny-qwen3")
    assert smol.get_vocab() == qwen.get_vocab()  # one vocabulary, two conventions
    assert smol.eos_token == "<|endoftext|>" and smol.eos_token_id == 0 and smol.bos_token_id == 0
    assert qwen.eos_token == "<|im_end|>" and qwen.bos_token is None and qwen.pad_token == "<|endoftext|>"
    text = "<think>\nx\n</think>\n\nhigh"
    ids = qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids, skip_special_tokens=True) == text  # <think> is an ordinary token, as in Qwen3
    assert "<think>" not in smol.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="builtin:tiny-qwen3"):
        build_tiny_tokenizer(flavour="tiny-qwen2")


# --------------------------------------------------------------------------- chat template and thinking mode
def layout(family: str, **params) -> PlaceholderLayout:
    return PlaceholderLayout(PlaceholderLayout.Config(**params), decoder(family))


def test_qwen3_style_template_honours_enable_thinking():
    user = "<|im_start|>user\n<audio>\nhow many beeps?<|im_end|>\n<|im_start|>assistant\n"
    assert layout("qwen3").render("<audio>\nhow many beeps?") == user
    assert layout("qwen3", enable_thinking=True).render("<audio>\nhow many beeps?") == user
    assert layout("qwen3", enable_thinking=False).render("<audio>\nhow many beeps?") == user + "<think>\n\n</think>\n\n"
    with_system = layout("qwen3", enable_thinking=False, system_prompt="be brief").render("hi")
    assert with_system.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")


def test_enable_thinking_with_a_template_that_ignores_it_is_an_error():
    with pytest.raises(ValueError, match="enable_thinking"):
        layout("llama", enable_thinking=False)
    assert layout("llama").render("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    layout("llama", enable_thinking=True, chat_template=False)  # no template rendered: nothing to check


def test_cota_response_is_the_supervised_part_and_ends_with_im_end():
    lay = layout("qwen3")
    tok = lay.decoder.tokenizer
    answer = format_cota("count", "two beeps", "two", "two beeps", "two")
    text = lay.tokenize(["how many beeps?"], [answer])
    [response] = text.response_ids
    assert response[0] == tok.convert_tokens_to_ids("<think>") and response[-1] == tok.eos_token_id
    assert tok.decode(response, skip_special_tokens=True) == answer
    off = layout("qwen3", enable_thinking=False).tokenize(["how many beeps?"])
    assert tok.decode(off.prompt_ids[0][-6:]).endswith("<think>\n\n</think>\n\n")


# --------------------------------------------------------------------------- train and generate (both families)
@pytest.fixture(scope="module")
def cota_manifest(tmp_path_factory):
    """One CoTA answer for every clip: these tests check the text path of the format, not listening."""
    root = tmp_path_factory.mktemp("cota")
    rows = []
    for i in range(4):
        write_tone(root / f"t{i}.wav", 300.0 * (i + 1), 1.0)
        rows.append({"audio": f"t{i}.wav", "prompt": "is the tone high or low?", "plan": "listen",
                     "analysis": "the tone is high", "logic": "it is high", "summary": "high", "answer": "high"})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_learns_a_cota_answer_and_generation_keeps_its_format(family, cota_manifest, tmp_path):
    from alm_kit.inference.engine import Request, generate
    from alm_kit.training.engine import train

    manifest, rows = cota_manifest
    config, tokenizer = FAMILIES[family]
    data = tiny_recipe_dict(**{
        "model.decoder.params": {"tokenizer": tokenizer, "config": dict(config)},
        "model.layout": {"name": "placeholder"},
        "training.max_steps": 40, "training.lr": 1e-2, "training.schedule": "constant",
        "generation.max_new_tokens": 60,
    })
    data["data"] = {"train": str(manifest), "response_template": "cota"}
    result = train(recipe_from_dict(data), progress=False, run_dir=tmp_path / "run")
    assert result.losses[-1] < 0.1 * result.losses[0]
    from alm_kit.checkpoint import load_checkpoint

    model, recipe = load_checkpoint(result.checkpoint)
    requests = [Request(audio=[manifest.parent / r["audio"]], prompt=r["prompt"]) for r in rows]
    outputs = generate(model, requests, recipe.generation)
    expected = format_cota(*(rows[0][k] for k in ("plan", "analysis", "logic", "summary", "answer")))
    if family == "qwen3":  # the thinking block survives decoding and splits off
        assert outputs == [expected] * len(rows)
        assert [split_thinking(o) for o in outputs] == [split_thinking(expected)] * len(rows)
        assert split_thinking(outputs[0])[1] == "high"
    else:  # SmolLM2-style tokenizer: <think> is special and dropped by decoding, the sections remain
        assert outputs == [expected.replace("<think>\n", "").replace("</think>", "")] * len(rows)


def test_model_labels_cover_only_the_response():
    data = tiny_recipe_dict(**{"model.decoder.params": {"tokenizer": "builtin:tiny-qwen3", "config": dict(TINY_QWEN3)},
                               "model.layout": {"name": "placeholder", "params": {"enable_thinking": False}}})
    model = build_model(recipe_from_dict(data).model)
    from tests.test_model import make_batch

    batch = make_batch(model)
    inputs = model.decoder_inputs(batch, for_generation=False)
    tok = model.decoder.tokenizer
    for row, response in enumerate(batch.responses):
        labels = inputs.labels[row][inputs.labels[row] != IGNORE].tolist()
        assert labels == tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
