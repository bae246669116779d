"""Fusion modules (ALARM's adapters, cross-attention, Perceiver compression) and learned audio boundaries."""

from __future__ import annotations

import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.fusion.cross_attention import CrossAttentionFusion
from alm_kit.fusion.downsample import DownsampleFusion
from alm_kit.fusion.perceiver import PerceiverFusion
from alm_kit.interfaces import AudioFeatures, AudioTokens, StreamInfo
from alm_kit.model import build_model
from tests.conftest import TINY_HTSAT, assert_differs, tiny_recipe_dict
from tests.test_model import make_batch


def stream(dim: int, frames: int, lengths, seed: int = 0, rate: float | None = None, pooled: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), frames, dim, generator=gen)
    info = StreamInfo(dim, pooled, rate, frames)
    return info, AudioFeatures(x, mask, None if pooled is None else torch.randn(len(lengths), pooled, generator=gen))


def scramble_padding(f: AudioFeatures, seed: int = 9) -> AudioFeatures:
    noise = torch.randn(f.frames.shape, generator=torch.Generator().manual_seed(seed)) * 100
    return AudioFeatures(torch.where(f.mask[..., None], f.frames, noise), f.mask, f.pooled)


def make(cls, streams, **params):
    torch.manual_seed(0)
    return cls(cls.Config(**params), streams).eval()


# --------------------------------------------------------------------------- concat
def test_concat_pools_every_stream_to_length_and_can_keep_clip_level_streams_pooled_only():
    from alm_kit.fusion.concat import ConcatFusion

    w_info, w = stream(6, 150, (150, 75), rate=50.0, pooled=6)  # Whisper-like, second clip half real
    h_info, h = stream(4, 40, (40, 40), seed=1, rate=102.4, pooled=3)
    c_info, c = stream(5, 1, (1, 1), seed=2, pooled=5)  # CLAP: one frame, no frame rate
    every = make(ConcatFusion, [w_info, h_info, c_info], length=30)
    assert every.info == StreamInfo(frame_dim=15, pooled_dim=14, num_frames=30)
    tg = make(ConcatFusion, [w_info, h_info, c_info], length=30, temporal_only=True)  # TinyGiantALM
    assert tg.info == StreamInfo(frame_dim=10, pooled_dim=14, num_frames=30)
    with torch.no_grad():
        out, joined = every([w, h, c]), tg([w, h, c])
    assert out.frames.shape == (2, 30, 15) and joined.frames.shape == (2, 30, 10)
    torch.testing.assert_close(out.frames[..., 10:], c.frames.expand(-1, 30, -1))  # the one frame, spread
    torch.testing.assert_close(joined.frames, out.frames[..., :10])
    torch.testing.assert_close(joined.pooled, torch.cat([w.pooled, h.pooled, c.pooled], -1))
    torch.testing.assert_close(joined.frames[0, :, :6], w.frames[0].view(30, 5, 6).mean(1))  # 5 frames per token
    assert joined.mask.all()  # the HTS-AT stream is real everywhere
    with pytest.raises(ValueError, match="temporal_only"):
        make(ConcatFusion, [c_info, c_info], temporal_only=True)


# --------------------------------------------------------------------------- downsample
def test_downsample_brings_every_stream_to_the_target_rate():
    a_info, a = stream(6, 150, (150, 61), rate=50.0, pooled=3)  # 3 s at 50/s
    b_info, b = stream(5, 300, (300, 122), seed=1, rate=100.0, pooled=4)  # 3 s at 100/s
    fusion = make(DownsampleFusion, [a_info, b_info], target_rate=25.0, width=8, output_dim=4)
    assert fusion.strides == [2, 4]
    assert fusion.info == StreamInfo(frame_dim=8, pooled_dim=7, frame_rate=25.0, num_frames=75)
    with torch.no_grad():
        out = fusion([a, b])
        again = fusion([scramble_padding(a), scramble_padding(b, 3)])
    assert out.frames.shape == (2, 75, 8) and out.pooled.shape == (2, 7)
    # 61 frames at stride 2 and 122 frames at stride 4 -> 31 valid tokens each
    assert out.mask[0].all() and out.mask[1].tolist() == [True] * 31 + [False] * 44
    torch.testing.assert_close(again.frames, out.frames)  # padding never leaks
    assert (out.frames[1, 31:] == 0).all()
    summed = make(DownsampleFusion, [a_info, b_info], target_rate=25.0, width=8, combine="sum")
    assert summed.info.frame_dim == 8 and summed([a, b]).frames.shape == (2, 75, 8)


def test_downsample_aligns_to_the_shortest_stream_and_checks_strides():
    a_info, a = stream(6, 150, (150, 150), rate=50.0)
    b_info, b = stream(5, 20, (20, 20), seed=1, rate=5.0)  # slower than the target: stride 1
    fusion = make(DownsampleFusion, [a_info, b_info], target_rate=25.0, width=8)
    assert fusion.strides == [2, 1] and fusion.info.num_frames == 20
    assert fusion([a, b]).frames.shape == (2, 20, 16)
    with pytest.raises(ValueError, match="strides"):
        make(DownsampleFusion, [a_info, b_info], strides=[2])
    with pytest.raises(ValueError, match="frame_rate"):
        make(DownsampleFusion, [a_info, StreamInfo(5)])


# --------------------------------------------------------------------------- cross-attention
def test_cross_attention_keeps_the_query_stream_and_reads_the_others():
    q_info, q = stream(8, 10, (10, 6), rate=25.0, pooled=3)
    k_info, k = stream(6, 7, (7, 4), seed=1, rate=10.0)
    fusion = make(CrossAttentionFusion, [q_info, k_info], num_heads=2, dropout=0.0)
    assert fusion.info == StreamInfo(frame_dim=8, pooled_dim=3, frame_rate=25.0, num_frames=10)
    with torch.no_grad():
        out = fusion([q, k])
        same = fusion([scramble_padding(q), scramble_padding(k)])
        other = fusion([q, stream(6, 7, (7, 4), seed=5)[1]])
    assert out.frames.shape == (2, 10, 8) and torch.equal(out.mask, q.mask)
    torch.testing.assert_close(same.frames, out.frames)
    assert_differs(other.frames[0], out.frames[0])
    # query stream chosen by index, widths projected
    three = make(CrossAttentionFusion, [k_info, q_info, k_info], query_stream=1, hidden_dim=4, num_heads=2,
                 layers_per_stream=2)
    assert three.info.frame_dim == 4 and three.info.num_frames == 10
    assert [len(layers) for layers in three.layers] == [2, 2]
    assert three([k, q, k]).frames.shape == (2, 10, 4)


def test_cross_attention_layers_are_pre_norm_decoder_layers():
    """ALARM uses nn.TransformerDecoderLayer(norm_first=True): self-attention over the queries (padding
    masked), cross-attention to the other stream, feed-forward. Same weights -> same output."""
    q_info, q = stream(8, 10, (10, 6), rate=25.0)
    k_info, k = stream(8, 7, (7, 4), seed=1)
    fusion = make(CrossAttentionFusion, [q_info, k_info], num_heads=2, dropout=0.0, ffn_ratio=2.0)
    layer = fusion.layers[0][0]
    ref = torch.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation=torch.nn.functional.gelu,
                                           norm_first=True, batch_first=True).eval()
    sa, ca = layer.self_attn, layer.cross_attn
    ref.self_attn.load_state_dict(sa.attn.attn.state_dict())
    ref.multihead_attn.load_state_dict(ca.attn.attn.state_dict())
    ref.norm1.load_state_dict(sa.norm.state_dict())
    ref.norm2.load_state_dict(ca.norm_q.state_dict())
    ref.norm3.load_state_dict(layer.ffn.norm.state_dict())
    ref.linear1.load_state_dict(layer.ffn.mlp.fc1.state_dict())
    ref.linear2.load_state_dict(layer.ffn.mlp.fc2.state_dict())
    with torch.no_grad():
        kv = fusion.kv_in[0](k.frames)
        ours = layer(q.frames, kv, k.mask, query_mask=q.mask)
        # alm-kit also normalises the keys/values (norm_kv); feed the reference the normalised memory
        theirs = ref(q.frames, ca.norm_kv(kv), tgt_key_padding_mask=~q.mask, memory_key_padding_mask=~k.mask)
    torch.testing.assert_close(ours[q.mask], theirs[q.mask], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- perceiver compression
def test_perceiver_fusion_frames_latents_before_the_main_stream():
    m_info, m = stream(8, 10, (10, 6), rate=25.0)
    a_info, a = stream(6, 7, (7, 4), seed=1, pooled=2)
    b_info, b = stream(5, 12, (12, 12), seed=2)
    params = dict(num_latents=3, hidden_dim=8, num_layers=1, num_heads=2, dropout=0.0)
    fusion = make(PerceiverFusion, [m_info, a_info, b_info], framing="per_stream", **params)
    assert fusion.info.frame_dim == 8 and fusion.info.num_frames == 2 * (3 + 2) + 10 and fusion.info.pooled_dim == 2
    with torch.no_grad():
        out = fusion([m, a, b])
        same = fusion([m, scramble_padding(a), b])
    assert out.frames.shape == (2, 20, 8)
    start, end = fusion.boundaries[:, 0], fusion.boundaries[:, 1]
    for row in range(2):
        for j, pos in enumerate((0, 5)):
            torch.testing.assert_close(out.frames[row, pos], start[j])
            torch.testing.assert_close(out.frames[row, pos + 4], end[j])
        torch.testing.assert_close(out.frames[row, 10:], m.frames[row])
    assert out.mask[:, :10].all() and torch.equal(out.mask[:, 10:], m.mask)
    torch.testing.assert_close(same.frames, out.frames)
    # ALARM's code (the default): one start/end pair around the latents of every extra stream
    together = make(PerceiverFusion, [m_info, a_info, b_info], **params)
    together.resamplers.load_state_dict(fusion.resamplers.state_dict())
    assert together.boundaries.shape == (1, 2, 8) and together.info.num_frames == 2 * 3 + 2 + 10
    with torch.no_grad():
        joined = together([m, a, b])
    assert joined.frames.shape == (2, 18, 8) and joined.mask[:, :8].all()
    for row in range(2):
        torch.testing.assert_close(joined.frames[row, 0], together.boundaries[0, 0])
        torch.testing.assert_close(joined.frames[row, 1:4], out.frames[row, 1:4])  # latents of stream a
        torch.testing.assert_close(joined.frames[row, 4:7], out.frames[row, 6:9])  # latents of stream b
        torch.testing.assert_close(joined.frames[row, 7], together.boundaries[0, 1])
        torch.testing.assert_close(joined.frames[row, 8:], m.frames[row])
    with pytest.raises(ValueError, match="divisible"):
        PerceiverFusion.Config(hidden_dim=10, num_heads=4)


# --------------------------------------------------------------------------- chain
def chain_of(streams, *steps):
    """A chain fusion from plain recipe data, resolved through the registry as a recipe would be."""
    from alm_kit.config.parse import parse_dataclass
    from alm_kit.fusion.chain import ChainFusion

    config = parse_dataclass(ChainFusion.Config, {"steps": [{"name": n, "params": p} for n, p in steps]},
                             path="model.fusion.params")
    torch.manual_seed(0)
    return ChainFusion(config, streams).eval()


ADAPTERS = ("downsample", {"target_rate": 25.0, "width": 8, "output_dim": 8})


def test_chain_adapters_then_cross_attention_runs_at_25_per_second():
    w_info, w = stream(6, 150, (150, 61), rate=50.0, pooled=3)  # 3 s at 50/s (Whisper-like)
    h_info, h = stream(5, 300, (300, 122), seed=1, rate=100.0, pooled=4)  # 3 s at 100/s
    fusion = chain_of([w_info, h_info], ADAPTERS, ("cross_attention", {"num_heads": 2, "dropout": 0.0}))
    adapters, cross = fusion.steps
    assert adapters.stream_infos == [StreamInfo(8, 3, 25.0, 75), StreamInfo(8, 4, 25.0, 75)]
    # the cross-attention was sized from the adapted streams, not from the encoders
    assert cross.streams == adapters.stream_infos and cross.kv_in[0].in_features == 8
    assert fusion.info == StreamInfo(frame_dim=8, pooled_dim=7, frame_rate=25.0, num_frames=75)
    with torch.no_grad():
        out = fusion([w, h])
        again = fusion([scramble_padding(w), scramble_padding(h, 3)])
        by_hand = cross(adapters.forward_streams([w, h]))
    assert out.frames.shape == (2, 75, 8)  # 3 s at 25 tokens/s
    assert out.mask[0].all() and out.mask[1].sum() == 31  # ceil(61 / 2): the Whisper stream's real tokens
    torch.testing.assert_close(out.frames, by_hand.frames)
    torch.testing.assert_close(again.frames, out.frames)  # padding never leaks through the chain
    torch.testing.assert_close(out.pooled, torch.cat([w.pooled, h.pooled], -1))


def test_chain_adapters_then_perceiver():
    w_info, w = stream(6, 150, (150, 61), rate=50.0)
    h_info, h = stream(5, 300, (300, 122), seed=1, rate=100.0)
    fusion = chain_of([w_info, h_info], ADAPTERS, ("perceiver", {"num_latents": 4, "hidden_dim": 8, "num_heads": 2,
                                                                 "num_layers": 1, "dropout": 0.0}))
    assert fusion.info.num_frames == 1 + 4 + 1 + 75 and fusion.info.frame_dim == 8
    with torch.no_grad():
        out = fusion([w, h])
    assert out.frames.shape == (2, 81, 8) and out.mask[1, 6:].sum() == 31


def test_alarm_p_adapts_only_the_main_stream():
    """ALARM-P: Whisper gets the conv adapter, the other streams reach their Perceivers as they are."""
    w_info, w = stream(6, 150, (150, 61), rate=50.0)
    h_info, h = stream(5, 300, (300, 122), seed=1, rate=100.0)
    fusion = chain_of([w_info, h_info], ("downsample", {"width": 8, "adapt": [True, False]}),
                      ("perceiver", {"num_latents": 4, "hidden_dim": 8, "num_heads": 2, "num_layers": 1}))
    adapters = fusion.steps[0]
    assert adapters.strides == [2, None] and list(adapters.adapters) == ["0"]
    assert adapters.stream_infos[1] is h_info and adapters.stream_infos[0].frame_dim == 8
    assert fusion.steps[1].resamplers[0].layers[0].cross_attn.norm_kv.normalized_shape == (5,)  # reads raw h
    with torch.no_grad():
        handed = adapters.forward_streams([w, h])
        out = fusion([w, h])
    assert handed[1] is h and out.frames.shape == (2, 1 + 4 + 1 + 75, 8)
    with pytest.raises(ValueError, match="one width"):
        make(DownsampleFusion, [w_info, h_info], width=8, adapt=[True, False], combine="sum")
    with pytest.raises(ValueError, match="adapt has 1 entries"):
        make(DownsampleFusion, [w_info, h_info], adapt=[True])


def test_adapter_layers_follow_alarm():
    """ALARM's DownsamplerConformer (use_conformer false): no input Linear when widths match, k=3 conv to
    2x width, k=4 stride-2 conv back; then its llm_proj."""
    from alm_kit.fusion.downsample import ConvAdapter

    same = ConvAdapter(16, 16, 32, stride=2)
    assert isinstance(same.inp, torch.nn.Identity)
    assert same.conv.weight.shape == (32, 16, 3) and same.down.weight.shape == (16, 32, 4)
    assert same.out.weight.shape == (32, 16)
    assert ConvAdapter(12, 16, 32, stride=2, expansion=1).conv.weight.shape == (16, 16, 3)


def test_chain_errors_name_the_step():
    from alm_kit.config.parse import ConfigError

    info = [StreamInfo(6, None, 50.0, 150), StreamInfo(5, None, 100.0, 300)]
    with pytest.raises(ConfigError, match=r"model\.fusion\.params\.steps\.1\.name: unknown fusion 'cross_atention'; "
                                          "did you mean 'cross_attention'"):
        chain_of(info, ADAPTERS, ("cross_atention", {}))
    with pytest.raises(ConfigError, match=r"steps\.0\.params\.widht: unknown key"):
        chain_of(info, ("downsample", {"widht": 8}), ("concat", {}))
    with pytest.raises(ConfigError, match="at least two"):
        chain_of(info, ADAPTERS)
    with pytest.raises(ValueError, match=r"steps\.0 \(concat\) only joins streams"):
        chain_of(info, ("concat", {}), ("cross_attention", {}))


def test_a_plugin_fusion_can_end_a_chain(monkeypatch):
    """Steps are resolved through the public registry: a third-party fusion (which knows nothing of
    chains) joins the adapted streams."""
    import types

    from alm_kit import hookimpl
    from alm_kit.interfaces import Fusion
    from alm_kit.registry import build_registry, manager

    class MeanFusion(Fusion):
        def __init__(self, config, streams):
            super().__init__(config, streams)
            self.info = StreamInfo(streams[0].frame_dim, None, streams[0].frame_rate, streams[0].num_frames)

        def forward(self, features):
            return AudioFeatures(torch.stack([f.frames for f in features]).mean(0), features[0].mask)

    plugin = types.SimpleNamespace(register_fusions=hookimpl(lambda register: register("mean", MeanFusion)))
    monkeypatch.setattr(manager, "_REGISTRY", build_registry(plugins=[plugin], entry_points=False))
    w_info, w = stream(6, 150, (150, 61), rate=50.0)
    h_info, h = stream(5, 300, (300, 300), seed=1, rate=100.0)
    fusion = chain_of([w_info, h_info], ADAPTERS, ("mean", {}))
    assert isinstance(fusion.steps[1], MeanFusion) and fusion.info.num_frames == 75
    with torch.no_grad():
        adapted = fusion.steps[0].forward_streams([w, h])
        out = fusion([w, h])
    torch.testing.assert_close(out.frames, (adapted[0].frames + adapted[1].frames) / 2)


# --------------------------------------------------------------------------- audio boundaries
@pytest.mark.parametrize("layout", ["prefix", "placeholder"])
def test_audio_boundaries_frame_every_clip_and_train(layout):
    params = {"num_audios": 2, "separator_token_id": 0} if layout == "prefix" else {}
    data = tiny_recipe_dict()
    data["model"]["layout"] = {"name": layout, "params": {**params, "audio_boundaries": True}}
    model = build_model(recipe_from_dict(data).model).train()
    bounds = model.layout.boundaries
    assert bounds.start.shape == (model.decoder.hidden_size,)
    assert {"layout.boundaries.start", "layout.boundaries.end"} <= {n for n, _ in model.named_parameters()}
    text = model.layout.tokenize(["what is it?", "compare <audio> and <audio>" if layout == "placeholder" else "x"],
                                 ["a", "b"])
    tokens = AudioTokens(torch.randn(3, 4, model.decoder.hidden_size), torch.ones(3, 4, dtype=torch.bool))
    with torch.no_grad():
        inputs = model.layout.assemble(text, tokens, [1, 2], for_generation=False)
    for clip, row in ((0, 0), (1, 1), (2, 1)):
        embeds = inputs.inputs_embeds[row]
        first = int((embeds == tokens.embeds[clip, 0]).all(-1).nonzero()[0])
        torch.testing.assert_close(embeds[first - 1], bounds.start.detach())
        torch.testing.assert_close(embeds[first: first + 4], tokens.embeds[clip])
        torch.testing.assert_close(embeds[first + 4], bounds.end.detach())
        assert inputs.labels[row, first - 1: first + 5].eq(-100).all()
    out = model(make_batch(model))
    out.loss.backward()
    assert bounds.start.grad.abs().sum() > 0 and bounds.end.grad.abs().sum() > 0


def test_audio_boundaries_are_off_by_default(tiny_recipe):
    model = build_model(tiny_recipe.model)
    assert model.layout.boundaries is None and not list(model.layout.parameters())


# --------------------------------------------------------------------------- tiny recipes
FUSIONS = {
    # tiny HTS-AT: 256 frames/s with repeated frames, 8 frames/s without -> strides 128 and 4
    "downsample": {"target_rate": 2.0, "width": 16},
    "cross_attention": {"num_heads": 2, "dropout": 0.0},
    "perceiver": {"num_latents": 3, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_tiny_recipe_trains_the_fusion(name, tone_dataset, tmp_path):
    from alm_kit.training.engine import Trainer

    data = tiny_recipe_dict(**{"training.max_steps": 3})
    data["model"]["encoders"] = [
        {"name": "htsat", "id": "fine", "train": "frozen", "params": dict(TINY_HTSAT)},
        {"name": "htsat", "id": "coarse", "train": "frozen", "params": dict(TINY_HTSAT, repeat_frames=False)},
    ]
    data["model"]["fusion"] = {"name": name, "params": dict(FUSIONS[name])}
    data["model"]["projector"] = {"name": "mlp", "params": {"style": "gelu", "dropout": 0.0}}
    data["model"]["layout"]["params"]["audio_boundaries"] = name == "perceiver"
    data["data"] = {"train": str(tone_dataset)}
    trainer = Trainer(recipe_from_dict(data), progress=False, run_dir=tmp_path / "run")
    fusion = trainer.model.fusion
    assert type(fusion).__name__.lower().startswith(name.replace("_", ""))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert len(result.losses) >= 1 and all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("fusion.") for n in changed)
    assert not any(n.startswith("encoders.") for n in changed)


def test_tiny_alarm_recipe_adapters_then_cross_attention_trains(tone_dataset, tmp_path):
    """ALARM's chain at toy size: Whisper (50/s) and HTS-AT (256/s) -> adapters -> 25 tokens/s ->
    cross-attention with Whisper as the queries. The fusion trains, the frozen encoders do not change."""
    from alm_kit.data.batch import AudioTextDataset, collate
    from alm_kit.data.manifest import read_manifest
    from alm_kit.training.engine import Trainer
    from tests.components.test_encoders import TINY_WHISPER

    data = tiny_recipe_dict(**{"training.max_steps": 3})
    data["model"]["encoders"] = [
        {"name": "whisper", "train": "frozen", "params": dict(TINY_WHISPER, clip_seconds=2.0)},
        {"name": "htsat", "train": "frozen", "params": dict(TINY_HTSAT, output="fine_grained")},
    ]
    data["model"]["fusion"] = {"name": "chain", "params": {"steps": [
        {"name": "downsample", "params": {"target_rate": 25, "width": 16}},
        {"name": "cross_attention", "params": {"num_heads": 2, "dropout": 0.0}},
    ]}}
    data["model"]["projector"] = {"name": "mlp", "params": {"style": "gelu", "dropout": 0.0}}
    data["model"]["layout"]["params"]["audio_boundaries"] = True
    data["data"] = {"train": str(tone_dataset)}
    trainer = Trainer(recipe_from_dict(data), progress=False, run_dir=tmp_path / "run")
    model = trainer.model
    assert [type(s).__name__ for s in model.fusion.steps] == ["DownsampleFusion", "CrossAttentionFusion"]
    assert model.fusion.steps[0].strides == [2, 10]  # 50/s and 256/s -> 25/s and 25.6/s
    assert model.fusion.info.frame_rate == 25.0 and model.fusion.info.num_frames == 50  # 2 s

    examples = read_manifest(tone_dataset)[:4]  # 1.5 s tones
    batch = collate([AudioTextDataset(examples, model.audio_specs)[i] for i in range(4)])
    with torch.no_grad():
        fused = model.eval().fusion([model.batch_features(batch)[k] for k in model.encoders])
    assert fused.frames.shape == (4, 50, 16)  # 2 s windows at 25 tokens/s
    assert fused.mask.sum(1).tolist() == [38] * 4  # 1.5 s: 75 Whisper frames -> ceil(75 / 2) tokens

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit()
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("fusion.steps.0.") for k in changed)  # the adapters
    assert any(k.startswith("fusion.steps.1.") for k in changed)  # the cross-attention
    assert not any(k.startswith("encoders.") for k in changed)  # frozen, BatchNorm statistics included
