"""The query-based projectors: Q-Former (global and window-level), Perceiver, TinyGiantALM's E-Branchformer."""

from __future__ import annotations

import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.config.parse import ConfigError
from alm_kit.interfaces import AudioFeatures, PromptContext, StreamInfo
from alm_kit.model import build_model
from alm_kit.projectors.ebranchformer import EBranchformerProjector
from alm_kit.projectors.perceiver import PerceiverProjector
from alm_kit.projectors.qformer import QFormerProjector
from tests.conftest import assert_differs, tiny_recipe_dict
from tests.test_model import make_batch

D_OUT = 16
STREAM = StreamInfo(frame_dim=12, pooled_dim=8, frame_rate=10.0, num_frames=20)
LENGTHS = (20, 7, 13)  # real frames per clip: clip 1 is mostly padding

QFORMER = {"num_queries": 2, "hidden_dim": 16, "num_layers": 2, "num_heads": 2, "dropout": 0.0}
PERCEIVER = {"num_latents": 3, "hidden_dim": 16, "num_layers": 2, "num_heads": 2, "dropout": 0.0}
EBF = {"num_blocks": 2, "num_heads": 2, "cgmlp_units": 24, "ffn_units": 32, "conv_kernel": 5, "dropout": 0.0}
CLASSES = {"qformer": QFormerProjector, "perceiver": PerceiverProjector, "ebranchformer": EBranchformerProjector}


def make(name: str, stream: StreamInfo = STREAM, seed: int = 0, **params):
    cls = CLASSES[name]
    defaults = {"qformer": QFORMER, "perceiver": PERCEIVER, "ebranchformer": EBF}[name]
    torch.manual_seed(seed)
    return cls(cls.Config(**{**defaults, **params}), stream, D_OUT).eval()


def features(seed: int = 0, lengths=LENGTHS, frames: int = 20) -> AudioFeatures:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), frames, STREAM.frame_dim, generator=gen)
    mask = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    return AudioFeatures(x, mask, torch.randn(len(lengths), STREAM.pooled_dim, generator=gen))


def prompt(seed: int = 1, clips: int = 3, length: int = 5) -> PromptContext:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(clips, length, dtype=torch.bool)
    mask[0, 3:] = False
    return PromptContext(torch.randn(clips, length, D_OUT, generator=gen) * 0.05, mask)


def run(proj, audio, ctx=None):
    with torch.no_grad():
        return proj(audio, ctx if ctx is not None else prompt())


# --------------------------------------------------------------------------- shared blocks
def test_attention_blocks_leave_rows_without_valid_keys_unchanged():
    from alm_kit.nn.attention import CrossAttentionBlock, SelfAttentionBlock

    torch.manual_seed(0)
    self_attn, cross = SelfAttentionBlock(8, 2).eval(), CrossAttentionBlock(8, 2, kv_dim=6).eval()
    x, kv = torch.randn(2, 4, 8), torch.randn(2, 5, 6)
    mask, kv_mask = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    mask[1], kv_mask[1] = False, False
    with torch.no_grad():  # eval + no_grad takes nn.MultiheadAttention's fast path for self-attention
        for out in (self_attn(x, mask), cross(x, kv, kv_mask)):
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[1], x[1])  # nothing to attend to: the residual alone
            assert_differs(out[0], x[0])


# --------------------------------------------------------------------------- shapes and masks
def test_qformer_global_mode_gives_num_queries_valid_tokens():
    out = run(make("qformer"), features())
    assert out.embeds.shape == (3, 2, D_OUT)
    assert out.mask.dtype == torch.bool and out.mask.all()


def test_qformer_window_mode_length_and_empty_windows():
    proj = make("qformer", window_frames=6)
    out = run(proj, features())
    # 20 frames -> 4 windows of 6 (the last padded with 4 frames); 2 queries per window
    assert out.embeds.shape == (3, 8, D_OUT) and proj.num_tokens(20) == 8
    # clip 1 has 7 real frames: windows 0 and 1 hold audio, windows 2 and 3 are all padding
    assert out.mask[1].tolist() == [True] * 4 + [False] * 4
    assert out.mask[0].all()
    # clip 2 has 13 real frames: frame 12 opens window 2, window 3 is empty
    assert out.mask[2].tolist() == [True] * 6 + [False] * 2
    assert torch.isfinite(out.embeds).all()
    # window_seconds: 0.6 s at 10 frames/s is the same 6-frame window
    assert make("qformer", window_seconds=0.6).window == 6


def test_qformer_windows_are_read_independently_by_the_same_queries():
    """Window k of a clip gives exactly what the global Q-Former gives for that window's frames."""
    windowed = make("qformer", window_frames=6)
    single = make("qformer", seed=5)
    single.load_state_dict(windowed.state_dict())
    audio = features()
    out = run(windowed, audio)
    for k in range(4):
        piece = audio.frames[:, 6 * k : 6 * k + 6]
        ref = run(single, AudioFeatures(piece, audio.mask[:, 6 * k : 6 * k + 6] | True))
        torch.testing.assert_close(out.embeds[0, 2 * k : 2 * k + 2], ref.embeds[0], atol=1e-5, rtol=1e-5)


def test_qformer_window_seconds_needs_a_frame_rate():
    with pytest.raises(ValueError, match="frame rate"):
        make("qformer", stream=StreamInfo(frame_dim=12), window_seconds=0.5)
    with pytest.raises(ValueError, match="not both"):
        QFormerProjector.Config(window_frames=4, window_seconds=0.5)


def test_perceiver_gives_num_latents_valid_tokens():
    out = run(make("perceiver"), features())
    assert out.embeds.shape == (3, 3, D_OUT) and out.mask.all()


def test_ebranchformer_keeps_frames_and_mask():
    audio = features()
    out = run(make("ebranchformer"), audio)
    assert out.embeds.shape == (3, 20, D_OUT)
    assert torch.equal(out.mask, audio.mask)
    assert (out.embeds[1, 7:] == 0).all()  # padded tokens are zeros
    assert (out.embeds[1, :7].abs().sum(-1) > 0).all()


SETUPS = {
    "qformer": lambda: make("qformer"),
    "qformer-window": lambda: make("qformer", window_frames=6),
    "perceiver": lambda: make("perceiver"),
    "ebranchformer": lambda: make("ebranchformer"),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_padded_frames_do_not_change_outputs(setup):
    proj = SETUPS[setup]()
    audio = features()
    base = run(proj, audio)
    noisy = audio.frames.clone()
    noisy[~audio.mask] = torch.randn(int((~audio.mask).sum()), STREAM.frame_dim) * 100
    changed = run(proj, AudioFeatures(noisy, audio.mask, audio.pooled))
    torch.testing.assert_close(changed.embeds, base.embeds, atol=1e-5, rtol=1e-5)
    assert torch.equal(changed.mask, base.mask)
    # the same kind of perturbation is seen when it hits a real frame (noise, which no per-frame
    # normalisation removes, unlike a constant shift of the whole frame)
    real = audio.frames.clone()
    real[1, 3] += torch.randn(STREAM.frame_dim, generator=torch.Generator().manual_seed(3)) * 10
    assert_differs(run(proj, AudioFeatures(real, audio.mask, audio.pooled)).embeds[1], base.embeds[1])


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_a_padded_clip_gives_the_tokens_it_gives_alone(setup):
    """Batching with longer clips must not change a short clip's valid tokens (masks, conv padding)."""
    proj = SETUPS[setup]()
    audio = features()
    batched = run(proj, audio)
    alone = run(proj, AudioFeatures(audio.frames[1:2, :7], audio.mask[1:2, :7], audio.pooled[1:2]),
                PromptContext(prompt().embeds[1:2], prompt().mask[1:2]))
    n = alone.embeds.shape[1]
    assert alone.mask.all()
    torch.testing.assert_close(batched.embeds[1, :n], alone.embeds[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Stage B: intent query
def test_intent_query_depends_on_the_prompt():
    proj = make("ebranchformer", semantic_gate=False)
    audio = features()
    a, b = run(proj, audio, prompt(seed=1)), run(proj, audio, prompt(seed=2))
    for row in range(3):
        assert_differs(a.embeds[row], b.embeds[row], atol=1e-4)
    # masked prompt positions do not count (masked mean)
    ctx = prompt(seed=1)
    ctx.embeds[0, 3:] = 7.0
    torch.testing.assert_close(run(proj, audio, ctx).embeds, a.embeds)
    off = make("ebranchformer", semantic_gate=False, intent_query=False)
    torch.testing.assert_close(run(off, audio, prompt(seed=1)).embeds, run(off, audio, prompt(seed=2)).embeds,
                               atol=0, rtol=0)


def test_intent_refinement_adds_one_vector_to_every_token():
    """Stage B adds the cross-attention output of the intent query, the same vector for every token."""
    on = make("ebranchformer", semantic_gate=False)
    off = make("ebranchformer", semantic_gate=False, intent_query=False)
    off.load_state_dict(on.state_dict(), strict=False)
    audio, ctx = features(), prompt()
    delta = run(on, audio, ctx).embeds - run(off, audio, ctx).embeds
    for row, n in enumerate(LENGTHS):
        torch.testing.assert_close(delta[row, :n], delta[row, :1].expand(n, -1), atol=1e-5, rtol=1e-5)
        assert delta[row, 0].abs().sum() > 0
    with torch.no_grad():
        x = off(audio, None).embeds  # Stage A only
        expected = on.intent_attn.attend(on.intent(ctx, x.dtype)[:, None], x, audio.mask)
    torch.testing.assert_close(delta[0, :1], expected[0], atol=1e-5, rtol=1e-5)


def test_intent_query_without_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="intent_query"):
        make("ebranchformer")(features(), None)
    # without the intent query the prompt may be missing
    assert make("ebranchformer", intent_query=False)(features(), None).embeds.shape == (3, 20, D_OUT)


def test_prompt_embeddings_of_another_width_are_projected():
    proj = make("ebranchformer", prompt_dim=24)
    assert isinstance(proj.intent_proj, torch.nn.Linear) and proj.intent_proj.in_features == 24
    ctx = PromptContext(torch.randn(3, 4, 24), torch.ones(3, 4, dtype=torch.bool))
    assert run(proj, features(), ctx).embeds.shape == (3, 20, D_OUT)
    with pytest.raises(ValueError, match="prompt_dim"):
        run(proj, features(), prompt())


# --------------------------------------------------------------------------- Stage C: CLAP gate
def test_semantic_gate_depends_on_the_pooled_vector():
    audio, ctx = features(), prompt()
    other = AudioFeatures(audio.frames, audio.mask, torch.randn(3, STREAM.pooled_dim))
    proj = make("ebranchformer")
    a, b = run(proj, audio, ctx), run(proj, other, ctx)
    for row in range(3):
        assert_differs(a.embeds[row], b.embeds[row], atol=1e-4)
    off = make("ebranchformer", semantic_gate=False)
    torch.testing.assert_close(run(off, audio, ctx).embeds, run(off, other, ctx).embeds, atol=0, rtol=0)
    # gated = ungated * (0.5 * sigmoid(W pooled + b) + 0.5), per channel
    off.load_state_dict(proj.state_dict(), strict=False)
    with torch.no_grad():
        factor = 0.5 * torch.sigmoid(audio.pooled @ proj.gate.weight.T + proj.gate.bias) + 0.5
    torch.testing.assert_close(a.embeds, run(off, audio, ctx).embeds * factor[:, None], atol=1e-5, rtol=1e-5)


def test_gate_factor_stays_between_half_and_one():
    proj = make("ebranchformer")
    with torch.no_grad():
        factor = proj.gate_factor(torch.randn(64, STREAM.pooled_dim) * 1e4)
    assert factor.min() >= 0.5 and factor.max() <= 1.0
    assert factor.min() < 0.51 and factor.max() > 0.99  # both ends are reached, nothing is shut off


def test_gate_slice_reads_only_its_columns():
    proj = make("ebranchformer", gate_slice=(2, 6))
    assert proj.gate.in_features == 4
    audio, ctx = features(), prompt()
    outside = audio.pooled.clone()
    outside[:, [0, 1, 6, 7]] += 5.0
    torch.testing.assert_close(run(proj, AudioFeatures(audio.frames, audio.mask, outside), ctx).embeds,
                               run(proj, audio, ctx).embeds, atol=0, rtol=0)
    inside = audio.pooled.clone()
    inside[:, 3] += 5.0
    assert_differs(run(proj, AudioFeatures(audio.frames, audio.mask, inside), ctx).embeds,
                              run(proj, audio, ctx).embeds)
    with pytest.raises(ValueError, match="outside the pooled vector"):
        make("ebranchformer", gate_slice=(4, 9))


def test_semantic_gate_needs_a_pooled_stream():
    with pytest.raises(ValueError, match="semantic_gate"):
        make("ebranchformer", stream=StreamInfo(frame_dim=12))
    assert make("ebranchformer", stream=StreamInfo(frame_dim=12), semantic_gate=False).gate is None


def test_ebranchformer_block_structure():
    proj = make("ebranchformer", cgmlp_units=24, conv_kernel=5, merge_kernel=3)
    block = proj.blocks[0]
    assert len(proj.blocks) == 2
    assert block.cgmlp.proj_in.out_features == 24 and block.cgmlp.proj_out.in_features == 12
    assert block.cgmlp.gate_conv.weight.shape == (12, 1, 5)  # depthwise over the gate half
    assert block.merge_conv.weight.shape == (2 * D_OUT, 1, 3) and block.merge_proj.in_features == 2 * D_OUT
    with pytest.raises(ValueError, match="odd"):
        EBranchformerProjector.Config(conv_kernel=16)


# --------------------------------------------------------------------------- in a model
RECIPES = {
    "qformer": ({**QFORMER, "window_seconds": 0.5}, None),  # tiny HTS-AT: 256 frames/s -> 128-frame windows
    "perceiver": (PERCEIVER, None),
    # TinyGiantALM's path: concat fusion pools the stream (which carries HTS-AT's pooled latent) to 16 tokens
    "ebranchformer": ({**EBF, "num_heads": 4}, {"name": "concat", "params": {"length": 16}}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tiny_recipe_builds_and_trains(name, monkeypatch):
    params, fusion = RECIPES[name]
    data = tiny_recipe_dict()
    data["model"]["projector"] = {"name": name, "params": dict(params)}
    if fusion is not None:
        data["model"]["fusion"] = fusion
    model = build_model(recipe_from_dict(data).model).train()
    assert isinstance(model.projector, CLASSES[name])
    calls = []
    original = model.prompt_context
    monkeypatch.setattr(model, "prompt_context", lambda *a: calls.append(1) or original(*a))
    batch = make_batch(model)
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert bool(calls) == model.projector.uses_prompt == (name == "ebranchformer")
    text = model.layout.tokenize(batch.prompts, batch.responses)
    with torch.no_grad():
        tokens = model.eval().audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
    if name == "qformer":  # 2 s of audio = 4 windows of 0.5 s; clip 1 is 1 s long -> 2 empty windows
        assert tokens.mask.shape == (3, 8) and tokens.mask[1].tolist() == [True] * 4 + [False] * 4
    if name == "ebranchformer":  # the intent query sees each clip's own example's prompt
        batch.prompts = [batch.prompts[0], "something else entirely"]
        text2 = model.layout.tokenize(batch.prompts, batch.responses)
        with torch.no_grad():
            again = model.audio_tokens(model.batch_features(batch), text2, batch.clips_per_example)
        torch.testing.assert_close(again.embeds[0], tokens.embeds[0])
        assert_differs(again.embeds[1], tokens.embeds[1])


def test_projectors_are_registered_and_validated():
    from alm_kit.registry import get_registry
    from alm_kit.registry.build import build_component

    assert {"qformer", "perceiver", "ebranchformer"} <= set(get_registry().names("projector"))
    with pytest.raises(ConfigError, match="conv_kernel"):
        spec = recipe_from_dict(tiny_recipe_dict(**{"model.projector": {
            "name": "ebranchformer", "params": {"conv_kernel": 4}}})).model.projector
        build_component("projector", spec, "model.projector", STREAM, D_OUT)
