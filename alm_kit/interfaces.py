"""The one typed interface per component kind.

A model is ``encoders -> fusion -> projector -> layout -> decoder``:

* an :class:`Encoder` turns waveforms at its own sample rate into framewise
  features with a validity mask, plus an optional pooled vector (CLAP's anchor,
  HTS-AT's clip latent);
* a :class:`Fusion` turns the streams of several encoders into one stream;
* a :class:`Projector` maps that stream (and, if it wants, the prompt's token
  embeddings: the *intent query*) to audio tokens of the decoder's width;
* a :class:`Layout` tokenizes text and places audio tokens in the decoder input
  (Mellow's prefix, or ``<audio>`` placeholders inside a chat template);
* a :class:`Decoder` is a causal language model with its tokenizer.

Built-in components and third-party plugins implement exactly these classes.
Each component class has a nested dataclass ``Config``; the recipe's ``params``
mapping is validated into it (unknown keys and wrong types are errors).
docs/components.md documents the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn


@dataclass
class NoConfig:
    """For components without options."""


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class AudioSpec:
    """How the data path must prepare waveforms for one encoder."""

    sample_rate: int
    #: fixed clip length in seconds; None keeps the clip's own length (variable-length encoders)
    clip_seconds: float | None = None
    #: how to fill a short clip: zeros; tile the clip to the end (repeat); whole repeats then zeros,
    #: as laion-clap (repeatpad); or leave it short (none). The mask marks zeros as padding.
    pad: Literal["zero", "repeat", "repeatpad", "none"] = "zero"
    #: which part of a long clip to keep; "random" is used in training only (evaluation uses "start")
    crop: Literal["start", "center", "random"] = "start"

    @property
    def clip_samples(self) -> int | None:
        return None if self.clip_seconds is None else int(round(self.clip_seconds * self.sample_rate))


@dataclass(frozen=True)
class StreamInfo:
    """Static shape facts about a feature stream, used to size the next component."""

    frame_dim: int
    pooled_dim: int | None = None
    #: feature frames per second of audio (None when not time-aligned)
    frame_rate: float | None = None
    #: frames for a full clip, when fixed
    num_frames: int | None = None


@dataclass
class AudioFeatures:
    """Framewise features of a batch of clips.

    ``frames`` is (clips, T, D); ``mask`` is (clips, T) bool, True where a frame is
    real audio; ``pooled`` is (clips, G) or None.
    """

    frames: Tensor
    mask: Tensor
    pooled: Tensor | None = None

    def index(self, rows: Tensor) -> AudioFeatures:
        """The clips ``rows`` (a clip may be picked several times)."""
        return AudioFeatures(self.frames[rows], self.mask[rows], None if self.pooled is None else self.pooled[rows])

    @staticmethod
    def cat(parts: Sequence[AudioFeatures]) -> AudioFeatures:
        """The clips of ``parts`` one after the other (passes of one encoder over slices of a batch)."""
        if len(parts) == 1:
            return parts[0]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return AudioFeatures(torch.cat([p.frames for p in parts]), torch.cat([p.mask for p in parts]), pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AudioFeatures:
        """Move to ``device``; ``dtype`` casts the float tensors only."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return AudioFeatures(self.frames.to(device=device, dtype=dtype), self.mask.to(device), pooled)


@dataclass
class PromptContext:
    """The prompt's token embeddings, one row per clip (a clip sees its own example's prompt)."""

    embeds: Tensor  # (clips, L, d)
    mask: Tensor  # (clips, L) bool


@dataclass
class AudioTokens:
    """Projector output: decoder-width tokens per clip."""

    embeds: Tensor  # (clips, N, d)
    mask: Tensor  # (clips, N) bool


#: the label of a position that carries no loss (PyTorch's cross-entropy ``ignore_index``)
IGNORE = -100


@dataclass
class DecoderInputs:
    """What a layout hands to the decoder."""

    inputs_embeds: Tensor  # (B, L, d)
    attention_mask: Tensor | None  # (B, L) long, 1 = attend; None = attend everywhere (Mellow compat)
    position_ids: Tensor | None  # (B, L)
    labels: Tensor | None  # (B, L), IGNORE (-100) where no loss; labels[t] is the target AT position t
    #: responses cut to the training's max_response_tokens (reported by the trainer)
    truncated: int = 0
    #: the token ids the layout placed (the inference engine reads the prompt's end from them)
    text: TextInputs | None = None


@dataclass
class TextInputs:
    """Token ids per example, produced by a layout before the audio is projected."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]] | None = None
    truncated: int = 0


# --------------------------------------------------------------------------- components
class Component(nn.Module):
    """Common base: a nested ``Config`` dataclass and a flag for pretrained base weights."""

    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def has_pretrained_weights(self) -> bool:
        """True when the weights come from a checkpoint the recipe names (hub id or path).

        Checkpoints then store only what training changed; components initialised at
        random are stored in full so that a checkpoint is self-contained.
        """
        return False


class Encoder(Component):
    """Waveforms at ``spec.sample_rate`` -> :class:`AudioFeatures`."""

    #: set in __init__ from the config
    spec: AudioSpec
    info: StreamInfo

    def forward(self, waveforms: Tensor, lengths: Tensor) -> AudioFeatures:  # pragma: no cover
        """``waveforms`` (clips, samples) float32 in [-1, 1]; ``lengths`` (clips,) real samples."""
        raise NotImplementedError


class Fusion(Component):
    """Several encoder streams (recipe order) -> one stream.

    A fusion that can also hand its streams on *unjoined* (ALARM's per-encoder adapters) sets
    ``stream_infos`` and implements ``forward_streams``; the ``chain`` fusion can then run it
    before another fusion. Fusions that only join leave ``stream_infos`` None.
    """

    info: StreamInfo
    #: the streams ``forward_streams`` returns (recipe order); None: this fusion only joins
    stream_infos: list[StreamInfo] | None = None

    def __init__(self, config: Any, streams: list[StreamInfo]) -> None:
        super().__init__(config)
        self.streams = streams

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:  # pragma: no cover
        raise NotImplementedError

    def forward_streams(self, features: list[AudioFeatures]) -> list[AudioFeatures]:
        """The streams before joining, one per entry of ``stream_infos``."""
        raise NotImplementedError(f"{type(self).__name__} only joins streams (its stream_infos is None)")


class Projector(Component):
    """One stream (+ optional prompt context) -> decoder-width audio tokens."""

    #: projectors that read the prompt (intent query) set this; the model then builds PromptContext
    uses_prompt: ClassVar[bool] = False

    def __init__(self, config: Any, stream: StreamInfo, output_dim: int) -> None:
        super().__init__(config)
        self.stream = stream
        self.output_dim = output_dim

    def forward(self, audio: AudioFeatures, prompt: PromptContext | None = None) -> AudioTokens:  # pragma: no cover
        raise NotImplementedError


class Decoder(Component):
    """A causal LM and its tokenizer."""

    hidden_size: int
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def embed(self, token_ids: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:  # pragma: no cover
        """Return (last hidden states (B, L, d), past_key_values or None)."""
        raise NotImplementedError

    def logits(self, hidden: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def language_model(self) -> nn.Module:  # pragma: no cover
        """The underlying transformers model (for ``generate``, peft, export)."""
        raise NotImplementedError

    def save_tokenizer(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)


class Layout(Component):
    """Tokenize text and arrange audio tokens and text into decoder inputs."""

    #: most clips one example may carry (None: any)
    max_audios: ClassVar[int | None] = None

    def __init__(self, config: Any, decoder: Decoder) -> None:
        super().__init__(config)
        # not a submodule: the decoder belongs to the model, the layout only uses it
        object.__setattr__(self, "decoder", decoder)

    def tokenize(self, prompts: list[str], responses: list[str] | None = None) -> TextInputs:  # pragma: no cover
        """Token ids of prompts (and responses). Layouts of thinking decoders may also accept a
        keyword ``thinking: bool`` (on/off for this call); it is passed only when a caller sets it."""
        raise NotImplementedError

    def end_token_id(self) -> int:
        """The token that ends an answer in this layout (generation stops there)."""
        return self.decoder.tokenizer.eos_token_id

    def assemble(
        self, text: TextInputs, audio: AudioTokens, clips_per_example: list[int], for_generation: bool
    ) -> DecoderInputs:  # pragma: no cover
        """Build decoder inputs; clips of example i are rows sum(clips[:i]) .. of ``audio``.

        With ``for_generation`` the batch is left-padded and has no labels.
        """
        raise NotImplementedError


INTERFACES: dict[str, type[Component]] = {
    "encoder": Encoder,
    "fusion": Fusion,
    "projector": Projector,
    "decoder": Decoder,
    "layout": Layout,
}
