"""The Python API: ``ALM.from_pretrained(...)`` and ``alm.generate(audio=[...], prompt=...)``.

    from alm_kit import ALM

    alm = ALM.from_pretrained("runs/mellow/checkpoints/latest")      # or a recipe .yaml
    out = alm.generate(audio=["a.wav", "b.wav"], prompt="which clip is louder?")
    print(out.answer)
    outs = alm.generate_batch([{"audio": ["a.wav"], "prompt": "..."}, (["c.flac"], "...")],
                              max_new_tokens=128, do_sample=True, top_p=0.9)

Audio may be a path, an :class:`~alm_kit.audio.io.AudioBlob` (encoded bytes), a
``(waveform, sample_rate)`` pair with a numpy array or a torch tensor, or a dict
``{"array": ..., "sampling_rate": ...}`` (the shape Hugging Face datasets use).

What the model thinks, beside what it says (:mod:`alm_kit.inference.likelihood`)::

    logits = alm.logits(["a.wav"], "how many beeps?")              # (prefix positions, vocab)
    scores = alm.score(["a.wav"], "how many beeps?", ["two", "three"])
    best = max(scores, key=lambda s: s.logprob).text
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alm_kit.config.schema import Recipe
from alm_kit.inference.engine import Generation, GenerationError, InferenceEngine, Request
from alm_kit.inference.likelihood import CandidateScore, prefix_logits, score_candidates
from alm_kit.model import AudioLanguageModel


def _audio_item(item: Any, where: str):
    if isinstance(item, Mapping):
        if "array" not in item or "sampling_rate" not in item:
            raise GenerationError(f"{where}: an audio dict needs 'array' and 'sampling_rate', got {sorted(item)}")
        return item["array"], item["sampling_rate"]
    if hasattr(item, "shape") and not isinstance(item, tuple):
        raise GenerationError(f"{where}: a bare waveform has no sample rate; pass (waveform, sample_rate)")
    return item


def as_request(example: Any, index: int = 0) -> Request:
    """A Request from a dict ``{"audio", "prompt", "id"?}``, an ``(audio, prompt)`` pair or a Request."""
    if isinstance(example, Request):
        return example
    if isinstance(example, Mapping):
        missing = [k for k in ("audio", "prompt") if k not in example]
        if missing:
            raise GenerationError(f"example {index}: missing {', '.join(missing)}")
        audio, prompt, rid = example["audio"], example["prompt"], str(example.get("id", index))
    elif isinstance(example, Sequence) and len(example) == 2:
        (audio, prompt), rid = example, str(index)
    else:
        raise GenerationError(f"example {index}: expected a dict with 'audio' and 'prompt', an (audio, prompt) "
                              f"pair or a Request, got {type(example).__name__}")
    if isinstance(audio, (str, Path, Mapping)) or (isinstance(audio, tuple) and len(audio) == 2
                                                     and isinstance(audio[1], int)):
        audio = [audio]  # one clip given without a list
    return Request(audio=[_audio_item(a, f"example {rid}") for a in audio], prompt=prompt, id=rid)


class ALM:
    """A loaded audio-language model with its generation defaults (the recipe's ``generation``)."""

    def __init__(self, model: AudioLanguageModel, recipe: Recipe) -> None:
        self.model = model
        self.recipe = recipe
        self.engine = InferenceEngine(model, recipe.generation)

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str = "auto", dtype: str | None = None,
                        overrides: Sequence[str] = ()) -> ALM:
        """Load an alm-kit checkpoint directory, or build a recipe (.yaml) with its pretrained parts
        (hub ids / local paths) and randomly initialised rest. ``dtype`` (auto | fp32 | bf16 | fp16;
        default: the recipe's ``generation.dtype``) is the weights' dtype: auto means bf16 on CUDA.
        ``overrides`` are ``key.path=value`` recipe overrides (recipes only)."""
        return cls(*load_model(source, device=device, dtype=dtype, overrides=overrides))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, audio: Any, prompt: str, **params: Any) -> Generation:
        """Answer one prompt about one clip or a list of clips; raises GenerationError on bad input."""
        result = self.engine.run([as_request({"audio": audio, "prompt": prompt})], self.engine.params(**params))[0]
        if result.error:
            raise GenerationError(result.error)
        return result

    def logits(self, audio: Any, prompt: str, **params: Any) -> torch.Tensor:
        """The decoder's logits over the prefix generation would start from: the audio tokens and
        the prompt as the recipe's layout places them, (positions, vocab) float32. The last row is
        the distribution of the first answer token; ``params`` are generation keys (``thinking``)."""
        return prefix_logits(self.model, as_request({"audio": audio, "prompt": prompt}), self.engine.params(**params))

    def score(self, audio: Any, prompt: str, candidates: Sequence[str], **params: Any) -> list[CandidateScore]:
        """The log-likelihood of each candidate answer (lm-eval-harness' multiple-choice scoring):
        one :class:`~alm_kit.inference.likelihood.CandidateScore` per candidate, in order, with
        ``logprob`` (summed over the answer's tokens as the layout trains them, end token included),
        ``greedy``, ``token_ids`` and ``token_logprobs``. The highest ``logprob`` is the model's choice."""
        if isinstance(candidates, str):
            raise GenerationError("candidates must be a list of answers, not one string")
        request = as_request({"audio": audio, "prompt": prompt})
        return score_candidates(self.model, [request], [list(candidates)], self.engine.params(**params))[0]

    def generate_batch(self, examples: Sequence[Any], *, progress: bool = False, **params: Any) -> list[Generation]:
        """Answer many examples in batches; a bad example gets ``error`` set, the rest complete."""
        settings = self.engine.params(**params)
        requests, early = [], {}
        for i, example in enumerate(examples):
            try:
                requests.append(as_request(example, i))
            except GenerationError as exc:
                early[i] = Generation(id=str(i), error=str(exc))
        results = iter(self.engine.run(requests, settings, progress=progress))
        return [early[i] if i in early else next(results) for i in range(len(examples))]


def load_model(source: str | Path, *, device: str = "auto", dtype: str | None = None,
               overrides: Sequence[str] = ()) -> tuple[AudioLanguageModel, Recipe]:
    """A model for inference and its recipe, from a checkpoint (or run) folder or a recipe .yaml, on
    ``device`` with weights in ``dtype`` (default: the recipe's ``generation.dtype``; see
    :mod:`alm_kit.runtime`)."""
    from alm_kit.runtime import cast_weights, resolve_device, weights_dtype

    source = Path(source)
    target = resolve_device(device)
    if source.is_dir():
        from alm_kit.checkpoint import load_checkpoint

        if overrides:
            raise GenerationError("overrides apply to recipes; a checkpoint's recipe is fixed")
        model, recipe = load_checkpoint(source, device=target)
    elif source.suffix in (".yaml", ".yml") and source.exists():
        from alm_kit.config import load_recipe
        from alm_kit.model import build_model

        recipe = load_recipe(source, list(overrides))
        # the seed training uses, so random-init parts are the ones a run starts from
        model = build_model(recipe.model, seed=recipe.training.seed).to(target).eval()
    else:
        raise FileNotFoundError(f"{source}: not an alm-kit checkpoint directory or a recipe .yaml file")
    try:
        wanted = weights_dtype(dtype or recipe.generation.dtype, target)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    return cast_weights(model.eval(), wanted), recipe
