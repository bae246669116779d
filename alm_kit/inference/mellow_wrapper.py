"""A drop-in for the reference Mellow wrapper (github soham97/mellow, ``mellow.MellowWrapper``).

Same constructor arguments and the same ``generate(examples=[[path1, path2, prompt], ...],
max_len=..., top_p=..., temperature=...)`` call, returning a list of strings, backed by
alm-kit's engine (KV cache, batched encoding). The released weights cannot be fetched
by this class: convert them once with ``alm-kit import mellow v0.ckpt DIR`` and pass
``checkpoint=DIR`` (or set ``ALM_KIT_MELLOW_CHECKPOINT``).

Like the reference, decoding is greedy whatever ``top_p`` and ``temperature`` say (the
reference builds a top-p mask, then takes the argmax); pass ``sample=True`` to really sample.
The answers are the reference's strings too: the generated tokens decoded as they are (special
tokens kept) and cut at ``stop_token``, without stripping: Mellow's answers usually begin with a
space, and end with the space the training suffix ``" <|endoftext|>"`` puts before the end token.

The wrapper takes the checkpoint's recipe as it is: to feed the model the reference wrapper's inputs
(no lower-casing, no prompt suffix, repeat-padded short clips), import with those overrides
(docs/inference.md, "Mellow users").
"""

from __future__ import annotations

import os
from pathlib import Path

from alm_kit.inference.api import ALM
from alm_kit.inference.engine import GenerationError, Request

VERSIONS = ("v0", "v0_s")


class MellowWrapper:
    def __init__(self, config: str = "v0", model: str = "v0", device: int | str = "cpu", use_cuda: bool = False,
                 *, checkpoint: str | Path | None = None, sample: bool = False) -> None:
        if model not in VERSIONS:
            raise ValueError(f"The model {model} is not supported. The supported versions are {list(VERSIONS)}")
        checkpoint = checkpoint or os.environ.get("ALM_KIT_MELLOW_CHECKPOINT")
        if checkpoint is None:
            raise FileNotFoundError(
                f"MellowWrapper needs the converted {model} checkpoint: run "
                f"'alm-kit import mellow {model}.ckpt DIR' and pass checkpoint=DIR "
                "(or set ALM_KIT_MELLOW_CHECKPOINT=DIR)")
        if isinstance(device, int):
            device = f"cuda:{device}"
        if not use_cuda and str(device).startswith("cuda"):
            device = "cpu"
        self.config, self.version, self.sample = config, model, sample
        self.alm = ALM.from_pretrained(checkpoint, device=str(device))
        self.model = self.alm.model

    def generate(self, examples, max_len, top_p, temperature, stop_token="<|endoftext|>",
                 audio_resample=True) -> list[str]:
        """examples: [[audio path 1, audio path 2, prompt], ...] -> one answer per example."""
        requests = []
        for i, example in enumerate(examples):
            if len(example) != 3:
                raise GenerationError(f"example {i}: expected [audio path 1, audio path 2, prompt], "
                                      f"got {len(example)} entries")
            path1, path2, prompt = example
            requests.append(Request(audio=[path1, path2], prompt=prompt, id=str(i)))
        tokenizer = self.model.decoder.tokenizer
        stop_ids = tokenizer.encode(stop_token, add_special_tokens=False)
        is_end = len(stop_ids) == 1 and stop_ids[0] in {tokenizer.eos_token_id, self.model.layout.end_token_id()}
        params = self.alm.engine.params(max_new_tokens=max_len, do_sample=self.sample, top_p=top_p,
                                        temperature=temperature, stop=[] if is_end else [stop_token],
                                        batch_size=max(1, len(requests)))
        results = self.alm.engine.run(requests, params)
        for result in results:
            if result.error:
                raise GenerationError(result.error)
        # the reference: tokenizer.decode(tokens).split(stop_token)[0]; the engine's text is stripped
        return [tokenizer.decode(r.tokens).split(stop_token)[0] for r in results]
