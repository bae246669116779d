"""The audio-language model: encoders -> fusion -> projector -> layout -> decoder, built from a recipe.

There is one model class for every recipe; what differs between Mellow,
TinyGiantALM-style and ALARM-style models is which registered components the
recipe names and how each is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alm_kit.config.parse import ConfigError
from alm_kit.config.schema import ComponentConfig, ModelConfig
from alm_kit.data.batch import Batch
from alm_kit.interfaces import (
    IGNORE,
    AudioFeatures,
    AudioSpec,
    AudioTokens,
    DecoderInputs,
    PromptContext,
    TextInputs,
)
from alm_kit.registry import Registry
from alm_kit.registry.build import build_component


def model_entries(config: ModelConfig) -> list[tuple[str, ComponentConfig, str]]:
    """(kind, recipe entry, key path) of every component a model config names."""
    entries = [("encoder", spec, f"model.encoders.{i}") for i, spec in enumerate(config.encoders)]
    if config.fusion is not None:
        entries.append(("fusion", config.fusion, "model.fusion"))
    return entries + [("projector", config.projector, "model.projector"),
                      ("decoder", config.decoder, "model.decoder"), ("layout", config.layout, "model.layout")]


@dataclass
class LossOutput:
    loss: Tensor
    #: response tokens the loss averaged over (a device tensor: reading it waits for the device)
    num_tokens: int | Tensor
    #: responses cut to max_response_tokens in this batch
    truncated: int = 0


class AudioLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, *, registry: Registry | None = None, origin=None, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        build = lambda *a: build_component(*a, registry=registry, origin=origin, seed=seed)  # noqa: E731
        self.encoders = nn.ModuleDict()
        for i, spec in enumerate(config.encoders):
            self.encoders[spec.id or spec.name] = build("encoder", spec, f"model.encoders.{i}")
        streams = [enc.info for enc in self.encoders.values()]
        if config.fusion is None:
            if len(streams) > 1:
                raise ConfigError("several encoders need a fusion module ('model.fusion: {name: concat}')",
                                  key="model.fusion", source=origin("model") if origin else None)
            self.fusion = None
            stream = streams[0]
        else:
            self.fusion = build("fusion", config.fusion, "model.fusion", streams)
            stream = self.fusion.info
        self.decoder = build("decoder", config.decoder, "model.decoder")
        self.projector = build("projector", config.projector, "model.projector", stream, self.decoder.hidden_size)
        self.layout = build("layout", config.layout, "model.layout", self.decoder)

    # ------------------------------------------------------------------ structure
    def components(self) -> dict[str, tuple[nn.Module, ComponentConfig]]:
        """Every trainable unit with its recipe entry, keyed by its module path."""
        out = {f"encoders.{name}": (enc, spec) for (name, enc), spec in zip(self.encoders.items(), self.config.encoders)}
        if self.fusion is not None:
            out["fusion"] = (self.fusion, self.config.fusion)
        out["projector"] = (self.projector, self.config.projector)
        out["decoder"] = (self.decoder, self.config.decoder)
        out["layout"] = (self.layout, self.config.layout)
        return out

    @property
    def audio_specs(self) -> dict[str, AudioSpec]:
        return {name: enc.spec for name, enc in self.encoders.items()}

    @property
    def cacheable_encoders(self) -> list[str]:
        """Encoders frozen with no ``trainable`` parameters, in recipe order: their features never change
        in training, so the feature cache can hold them."""
        return [name for name, spec in zip(self.encoders, self.config.encoders)
                if spec.train == "frozen" and not spec.trainable]

    @property
    def encoders_frozen(self) -> bool:
        """Every encoder frozen, none with ``trainable`` parameters: its features never change."""
        return len(self.cacheable_encoders) == len(self.encoders)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> AudioLanguageModel:
        """Frozen components stay in eval mode (fixed BatchNorm statistics, no dropout or SpecAugment)."""
        super().train(mode)
        for module, spec in self.components().values():
            if spec.train == "frozen":
                module.eval()
        return self

    # ------------------------------------------------------------------ forward pieces
    def encode(self, waveforms: dict[str, Tensor], lengths: dict[str, Tensor],
               clips_per_pass: int | None = None, names: list[str] | None = None) -> dict[str, AudioFeatures]:
        """Every encoder's (or the ``names`` encoders') features for the batch's clips; ``clips_per_pass``
        runs each encoder over slices of that many clips (bounded activation memory; faster on CPU)."""
        device = self.device
        features = {}
        for name, enc in self.encoders.items():
            if names is not None and name not in names:
                continue
            wave = waveforms[name].to(device, non_blocking=True)
            length = lengths[name].to(device, non_blocking=True)
            clips = max(len(wave), 1)
            step = clips_per_pass or clips
            features[name] = AudioFeatures.cat([enc(wave[s : s + step], length[s : s + step])
                                                for s in range(0, clips, step)])
        return features

    def batch_features(self, batch: Batch) -> dict[str, AudioFeatures]:
        """Every encoder's features: the cached ones from ``batch.features``, the others computed from
        ``batch.waveforms`` (a cache may hold only the frozen encoders), in recipe order."""
        cached = {k: v.to(self.device, non_blocking=True) for k, v in (batch.features or {}).items()}
        live = [name for name in self.encoders if name not in cached]
        if not live:
            return {name: cached[name] for name in self.encoders}
        if batch.waveforms is None or any(name not in batch.waveforms for name in live):
            raise ValueError(f"batch has neither waveforms nor cached features for encoder(s) {', '.join(live)}")
        frozen = set(live) <= set(self.cacheable_encoders)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            computed = self.encode(batch.waveforms, batch.lengths, names=live)
        return {name: cached[name] if name in cached else computed[name] for name in self.encoders}

    def prompt_context(self, text: TextInputs, clips_per_example: list[int]) -> PromptContext:
        """Embeddings of each example's prompt tokens, one row per clip (the intent query's input)."""
        ids = [[t for t in p if t >= 0] for p in text.prompt_ids]
        longest = max(1, max(len(p) for p in ids))
        table = torch.zeros(len(ids), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool, device=self.device)
        for i, p in enumerate(ids):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, : len(p)] = True
        rows = torch.repeat_interleave(torch.arange(len(ids), device=self.device),
                                       torch.tensor(clips_per_example, device=self.device))
        return PromptContext(self.decoder.embed(table)[rows], mask[rows])

    def audio_tokens(self, features: dict[str, AudioFeatures], text: TextInputs,
                     clips_per_example: list[int]) -> AudioTokens:
        streams = list(features.values())
        fused = streams[0] if self.fusion is None else self.fusion([features[k] for k in self.encoders])
        prompt = self.prompt_context(text, clips_per_example) if self.projector.uses_prompt else None
        return self.projector(fused, prompt)

    def decoder_inputs(self, batch: Batch, *, for_generation: bool,
                       max_response_tokens: int | None = None, thinking: bool | None = None) -> DecoderInputs:
        options = {} if thinking is None else {"thinking": thinking}
        text = self.layout.tokenize(batch.prompts, None if for_generation else batch.responses, **options)
        if max_response_tokens is not None and text.response_ids is not None:
            text.truncated = sum(len(r) > max_response_tokens for r in text.response_ids)
            text.response_ids = [r[:max_response_tokens] for r in text.response_ids]
        tokens = self.audio_tokens(self.batch_features(batch), text, batch.clips_per_example)
        inputs = self.layout.assemble(text, tokens, batch.clips_per_example, for_generation)
        inputs.truncated = text.truncated
        inputs.text = text
        return inputs

    def forward(self, batch: Batch, max_response_tokens: int | None = None) -> LossOutput:
        """Next-token cross-entropy on the response tokens only (logits computed only there).

        The labelled positions are picked without a host sync when the layout counted them
        (``DecoderInputs.num_labels``): a stable sort puts them first, in order, and the next
        ``num_labels`` positions (labelled or ignored ones) are scored; the sum is the same.
        """
        inputs = self.decoder_inputs(batch, for_generation=False, max_response_tokens=max_response_tokens)
        hidden, _ = self.decoder(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        targets = inputs.labels[:, 1:].reshape(-1)
        where = targets != IGNORE
        if inputs.num_labels is None:
            picked = where.nonzero().squeeze(-1)
        else:
            picked = torch.argsort((~where).to(torch.uint8), stable=True)[: inputs.num_labels]
        logits = self.decoder.logits(hidden[:, :-1].reshape(-1, hidden.shape[-1])[picked])
        count = where.sum()
        loss = F.cross_entropy(logits.float(), targets[picked], ignore_index=IGNORE, reduction="sum")
        return LossOutput(loss / count.clamp_min(1), count, inputs.truncated)

    def logits(self, batch: Batch) -> Tensor:
        """Full logits over the training layout (tests, parity checks)."""
        inputs = self.decoder_inputs(batch, for_generation=False)
        hidden, _ = self.decoder(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        return self.decoder.logits(hidden)


def apply_train_modes(model: AudioLanguageModel) -> None:
    """Set requires_grad from each component's ``train`` mode (and ``trainable``); inject LoRA adapters where asked."""
    keys = {id(spec): f"model.encoders.{i}" for i, spec in enumerate(model.config.encoders)}
    for path, (module, spec) in model.components().items():
        if spec.train == "lora":
            from peft import LoraConfig as PeftLoraConfig
            from peft import inject_adapter_in_model

            from alm_kit.config.schema import LoraConfig

            lora = spec.lora or LoraConfig()
            inject_adapter_in_model(
                PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=list(lora.target_modules)),
                module,
            )
            for name, param in module.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            module.requires_grad_(spec.train == "full")
        if spec.trainable:
            _unfreeze(module, spec.trainable, keys.get(id(spec), f"model.{path}"))
    model.train(model.training)


def _unfreeze(module: nn.Module, patterns: list[str], key: str) -> None:
    """``trainable``: parameters matching any glob pattern train, whatever the component's mode."""
    from fnmatch import fnmatchcase

    params = dict(module.named_parameters())
    for pattern in patterns:
        hits = [p for n, p in params.items() if fnmatchcase(n, pattern)]
        if not hits:
            some = ", ".join(list(params)[:8]) + (", ..." if len(params) > 8 else "")
            raise ConfigError(f"'{pattern}' matches no parameter of this component (it has: {some or 'none'})",
                              key=f"{key}.trainable")
        for param in hits:
            param.requires_grad_(True)


def build_model(config: ModelConfig, *, registry: Registry | None = None, origin=None,
                seed: int = 0) -> AudioLanguageModel:
    model = AudioLanguageModel(config, registry=registry, origin=origin, seed=seed)
    apply_train_modes(model)
    return model
