"""A random Mellow checkpoint in the reference code's key layout, at toy size.

The layout is the one documented for the released ``v0.ckpt`` (github soham97/mellow, module
names of ``Mellow`` / ``HTSATWrapper`` / ``Projection`` / ``DecoderModel``)::

    audio_encoder.base.htsat.*                    HTS-AT (Ke Chen's code; the same modules laion-clap ships)
    audio_encoder.base.c2l.{weight,bias}          Linear(527 -> 768): class posteriors -> latent width
    audio_encoder.projection.linear1.weight       Linear(768 -> 576, bias=False)
    audio_encoder.projection.linear2.weight       Linear(576 -> 576, bias=False)
    audio_encoder.projection.layer_norm.{weight,bias}
    caption_decoder.lm.*                          the transformers causal LM (SmolLM2: model.*, lm_head.weight)

Key names come from building the same modules (laion's HTS-AT, a transformers Llama); every
learned value is drawn from a seeded ``torch.Generator`` (stable across library versions), and the
values that are fixed functions of the configuration (STFT and mel kernels, Swin position
indices and shift masks) are kept as built. ``tests/fixtures/make_mellow_golden.py`` runs the
reference code on exactly this state dict to produce the golden values of the parity test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from tests.conftest import TINY_HTSAT

#: toy HTS-AT (as tests/conftest.py): 16 kHz, 2 s clips, 12 classes, latent width 32 -> 4 x 32 = 128 frames
MELLOW_TINY_HTSAT = dict(TINY_HTSAT)
#: toy decoder with SmolLM2's structure (Llama, grouped-query attention, tied embeddings)
MELLOW_TINY_LM = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
}

#: keys whose values are fixed functions of the configuration, kept as built
_DETERMINISTIC = ("spectrogram_extractor.", "logmel_extractor.", "relative_position_index", "attn_mask",
                  "num_batches_tracked")


def tiny_overrides() -> list[str]:
    """recipes/mellow.yaml overrides that shrink HTS-AT and the LM to the toy sizes above."""
    out = [f"model.encoders.0.params.{k}={v}" for k, v in MELLOW_TINY_HTSAT.items()
           if not isinstance(v, list)]
    out += [f"model.encoders.0.params.{k}=[{', '.join(map(str, v))}]" for k, v in MELLOW_TINY_HTSAT.items()
            if isinstance(v, list)]
    lm = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in MELLOW_TINY_LM.items())
    out.append(f"model.decoder.params={{tokenizer: 'builtin:tiny', config: {{{lm}}}}}")
    return out


def _tiny_tokenizer():
    from alm_kit.decoders.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def lm_config(vocab_size: int):
    from transformers import AutoConfig

    options = {k: v for k, v in MELLOW_TINY_LM.items() if k != "model_type"}
    tok = _tiny_tokenizer()
    return AutoConfig.for_model(MELLOW_TINY_LM["model_type"], vocab_size=vocab_size, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **options)


def htsat_module():
    """laion-clap's HTS-AT at the toy size (alm-kit's encoder wraps the same class)."""
    from alm_kit.encoders._laion import clap_module

    h = MELLOW_TINY_HTSAT
    cfg = SimpleNamespace(sample_rate=h["sample_rate"], window_size=h["window_size"], hop_size=h["hop_size"],
                          mel_bins=h["mel_bins"], fmin=50, fmax=h["fmax"])
    return clap_module("htsat").HTSAT_Swin_Transformer(
        spec_size=h["spec_size"], patch_size=4, patch_stride=(4, 4), num_classes=h["num_classes"],
        embed_dim=h["embed_dim"], depths=h["depths"], num_heads=h["num_heads"], window_size=h["swin_window"],
        drop_path_rate=0.0, config=cfg)


def _random_like(name: str, tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if any(part in name for part in _DETERMINISTIC) or not tensor.is_floating_point():
        return tensor.clone()
    shape = tensor.shape
    if name.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=gen) * 0.1
    if tensor.dim() == 1:
        norm = any(p in name for p in ("norm", "bn0")) and name.endswith("weight")
        return 1.0 + 0.1 * torch.randn(shape, generator=gen) if norm else 0.05 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


#: seed of the parity test's weights (picked so that the toy model's greedy answers are varied text)
PARITY_SEED = 1


def reference_state_dict(seed: int = PARITY_SEED, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A toy Mellow state dict with the reference's key names (``prefix='module.'``: as saved under DDP)."""
    from transformers import AutoModelForCausalLM

    vocab = len(_tiny_tokenizer())
    latent = MELLOW_TINY_HTSAT["embed_dim"] * 2 ** (len(MELLOW_TINY_HTSAT["depths"]) - 1)
    classes, width = MELLOW_TINY_HTSAT["num_classes"], MELLOW_TINY_LM["hidden_size"]
    shapes: dict[str, torch.Tensor] = {}
    shapes.update({f"audio_encoder.base.htsat.{k}": v for k, v in htsat_module().state_dict().items()})
    shapes.update({
        "audio_encoder.base.c2l.weight": torch.empty(latent, classes), "audio_encoder.base.c2l.bias": torch.empty(latent),
        "audio_encoder.projection.linear1.weight": torch.empty(width, latent),
        "audio_encoder.projection.linear2.weight": torch.empty(width, width),
        "audio_encoder.projection.layer_norm.weight": torch.empty(width),
        "audio_encoder.projection.layer_norm.bias": torch.empty(width),
    })
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config(vocab))
    shapes.update({f"caption_decoder.lm.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in lm.state_dict().items()})
    gen = torch.Generator().manual_seed(seed)
    state = {name: _random_like(name, shapes[name], gen) for name in sorted(shapes)}
    if MELLOW_TINY_LM["tie_word_embeddings"]:
        state["caption_decoder.lm.lm_head.weight"] = state["caption_decoder.lm.model.embed_tokens.weight"]
    return {prefix + k: v for k, v in state.items()}


def toy_clips(seconds: tuple[float, ...] = (2.0, 2.0, 1.3)) -> list[torch.Tensor]:
    """Deterministic test clips at the toy rate: tones plus a little noise (the last one is short)."""
    rate = MELLOW_TINY_HTSAT["sample_rate"]
    gen = torch.Generator().manual_seed(1234)
    out = []
    for i, s in enumerate(seconds):
        t = torch.arange(int(s * rate)) / rate
        wave = 0.4 * torch.sin(2 * math.pi * (300 + 450 * i) * t) + 0.05 * torch.randn(len(t), generator=gen)
        out.append(wave.float())
    return out




# ---------------------------------------------------------------- the parity test's inputs
PROMPTS = ["What is the primary sound event? a) dog barking b) chirping birds c) car engine d) clapping",
           "Which clip is LOUDER, the first or the second one? a) first b) second"]
ANSWERS = ["b) chirping birds", "the second clip is louder!"]
#: greedy tokens compared with the reference
GEN_TOKENS = 12
#: prefix positions whose logits are pinned (first clip, its separator, second clip, prompt, last)
PROBE_POSITIONS = [0, 40, 65, 100, 131, 140, 200, 260]


def clip_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(audio1, audio2) as the reference takes them: example 0 = clips 0 and 1; example 1 = the short
    clip 2 in both slots (alm-kit repeats a single clip); zero-padded to the clip length."""
    n = int(MELLOW_TINY_HTSAT["sample_rate"] * MELLOW_TINY_HTSAT["clip_seconds"])
    padded = [torch.nn.functional.pad(c, (0, n - len(c))) for c in toy_clips()]
    return torch.stack([padded[0], padded[2]]), torch.stack([padded[1], padded[2]])
