"""Write tests/data/mellow_golden.json: the reference Mellow code's outputs for the toy state dict.

Usage (needs a checkout of the reference, github soham97/mellow, branch main; nothing of it is
kept in alm-kit)::

    git clone https://github.com/soham97/mellow /tmp/mellow_ref
    python tests/data/make_mellow_golden.py /tmp/mellow_ref

What runs is the reference's own code: ``mellow.model.mellow.Mellow`` (HTS-AT wrapper, Projection,
DecoderModel with its prefix builder and forward) and ``MellowWrapper._generate_batch`` (the greedy
loop without KV cache). Three substitutions make it run offline at toy size:

* ``AutoModelForCausalLM.from_pretrained`` returns a random Llama of MELLOW_TINY_LM's shape instead of
  downloading SmolLM2 (the name passed stays "HuggingFaceTB/SmolLM2-135M", so the SmolLM2 code paths run);
* the full-size HTS-AT, ``c2l`` and ``Projection`` modules are replaced by the same classes at the toy
  sizes of MELLOW_TINY_HTSAT;
* ``torchaudio`` / ``importlib_resources`` (imported by the wrapper module, unused here) are stubbed.

Then every weight is overwritten by ``reference_state_dict()`` with ``load_state_dict(strict=True)``,
which also checks that the documented key layout is the reference's. Text is tokenized as the
reference's training and evaluation data code does (lower-cased, ``" <|endoftext|>"`` appended,
truncated / padded with '!' to 129 prompt and 250 answer tokens).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.mellow_reference_format import ANSWERS, GEN_TOKENS, PROBE_POSITIONS, PROMPTS, clip_batch  # noqa: E402


def main(reference: str) -> None:
    import torch
    import transformers
    import transformers.models.llama  # noqa: F401  (before the torchaudio stub below)
    from torch import nn

    from tests import mellow_reference_format as fmt

    sys.path.insert(0, reference)
    for name in ("importlib_resources", "torchaudio", "torchaudio.transforms"):
        stub = types.ModuleType(name)
        stub.files = lambda *a, **k: None
        sys.modules[name] = stub
    sys.modules["torchaudio"].transforms = sys.modules["torchaudio.transforms"]

    tokenizer = fmt._tiny_tokenizer()
    vocab = len(tokenizer)
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(
        lambda cls, name, *a, **k: transformers.AutoModelForCausalLM.from_config(fmt.lm_config(vocab)))

    import mellow.model.config as refcfg
    from mellow.model.htsat import HTSAT_Swin_Transformer
    from mellow.model.mellow import Mellow, Projection
    from mellow.wrapper import MellowWrapper

    h = fmt.MELLOW_TINY_HTSAT
    latent = h["embed_dim"] * 2 ** (len(h["depths"]) - 1)
    width = fmt.MELLOW_TINY_LM["hidden_size"]
    model = Mellow(audioenc_name="HTSAT", d_in=latent, text_decoder="HuggingFaceTB/SmolLM2-135M",
                   prefix_length=389, d_out=width)
    cfg = SimpleNamespace(**{k: getattr(refcfg, k) for k in dir(refcfg) if not k.startswith("_")})
    cfg.sample_rate, cfg.window_size, cfg.hop_size = h["sample_rate"], h["window_size"], h["hop_size"]
    cfg.mel_bins, cfg.fmin, cfg.fmax = h["mel_bins"], 50, h["fmax"]
    model.audio_encoder.base.htsat = HTSAT_Swin_Transformer(
        spec_size=h["spec_size"], patch_size=4, patch_stride=(4, 4), num_classes=h["num_classes"],
        embed_dim=h["embed_dim"], depths=h["depths"], num_heads=h["num_heads"], window_size=h["swin_window"],
        drop_path_rate=0.0, config=cfg)
    model.audio_encoder.base.c2l = nn.Linear(h["num_classes"], latent)
    model.audio_encoder.projection = Projection(latent, width)
    model.load_state_dict(fmt.reference_state_dict(), strict=True)
    model.eval()

    tokenizer.add_special_tokens({"pad_token": "!"})  # as the reference does

    def tokenize(texts, length):
        out = tokenizer([t.lower() + " <|endoftext|>" for t in texts], add_special_tokens=True, truncation=True,
                        max_length=length, padding="max_length", return_tensors="pt")
        return {k: v for k, v in out.items()}

    audio1, audio2 = clip_batch()
    prompt, answer = tokenize(PROMPTS, 129), tokenize(ANSWERS, 250)
    wrapper = MellowWrapper.__new__(MellowWrapper)
    wrapper.model, wrapper.tokenizer = model, tokenizer
    with torch.no_grad():
        prefix, _, _ = model.generate_prefix_inference({"audio1": audio1, "audio2": audio2, "input": prompt})
        logits = model.caption_decoder.lm(inputs_embeds=prefix).logits
        train = model({"audio1": audio1, "audio2": audio2, "input": prompt, "answer": answer}).logits
        texts = wrapper._generate_batch(embed=prefix, entry_length=GEN_TOKENS)
    n = prefix.shape[1]
    answer_lengths = [len(tokenizer(a.lower() + " <|endoftext|>").input_ids) for a in ANSWERS]
    golden = {
        "made_by": "tests/data/make_mellow_golden.py (reference: github soham97/mellow, branch main)",
        "prefix_length": n,
        "probe_positions": PROBE_POSITIONS,
        "prefix_logits_probe": logits[:, PROBE_POSITIONS, :16].tolist(),
        "prefix_logits_abs_sum": logits.abs().sum().item(),
        "last_top10": logits[:, -1].topk(10, -1).indices.tolist(),
        "last_top10_values": logits[:, -1].topk(10, -1).values.tolist(),
        # training layout: the logits that predict each answer token (before the reference's '!' padding)
        "answer_logits_abs_sum": [train[i, n - 1 : n - 1 + answer_lengths[i]].abs().sum().item() for i in range(2)],
        "answer_argmax": [train[i, n - 1 : n - 1 + answer_lengths[i]].argmax(-1).tolist() for i in range(2)],
        "answer_ids": [answer["input_ids"][i, : answer_lengths[i]].tolist() for i in range(2)],
        "greedy_texts": [t.strip() for t in texts],
    }
    out = Path(__file__).with_name("mellow_golden.json")
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mellow_ref")
