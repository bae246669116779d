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

Conventions of every signature below: *clips* is the number of clips in a batch
(the clips of all examples flattened in example order; ``clips_per_example`` says
how many belong to each example), ``d`` is the decoder's ``hidden_size``, and a
mask is a bool tensor that is True where a position is real (audio or text), False
where it is padding. The examples run as doctests (``tests/components/test_interfaces_docs.py``).

Example:
    A component is a class of its kind with a nested ``Config``; a hook registers
    it (``alm_kit/registry/hookspecs.py``) and a recipe names it::

        @hookimpl
        def register_projectors(register):
            register("gain", "my_pkg.gain:Gain")

        # recipe:  model: {projector: {name: gain, params: {scale: 0.5}}}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn


@dataclass
class NoConfig:
    """For components without options."""


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class AudioSpec:
    """How the data path must prepare waveforms for one encoder (set as ``Encoder.spec``).

    Example:
        >>> AudioSpec(16000, clip_seconds=2.0).clip_samples
        32000
        >>> AudioSpec(16000, clip_seconds=None, pad="none").clip_samples is None  # variable length
        True
    """

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
    """Static shape facts about a feature stream, used to size the next component.

    An encoder sets it as ``self.info``; the fusion (or, with one encoder, the projector)
    receives it in its constructor.

    Example:
        >>> info = StreamInfo(frame_dim=128, pooled_dim=128, frame_rate=12.5, num_frames=25)  # 2 s clips
        >>> nn.Linear(info.frame_dim, 576).in_features
        128
    """

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

    Example:
        >>> feats = AudioFeatures(torch.zeros(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
        >>> feats.index(torch.tensor([1, 1])).mask.sum(1).tolist()  # clip 1 twice
        [3, 3]
        >>> AudioFeatures.cat([feats, feats]).frames.shape
        torch.Size([4, 5, 8])
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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, *,
           non_blocking: bool = False) -> AudioFeatures:
        """Move to ``device``; ``dtype`` casts the float tensors only."""
        move = dict(device=device, non_blocking=non_blocking)
        pooled = None if self.pooled is None else self.pooled.to(dtype=dtype, **move)
        return AudioFeatures(self.frames.to(dtype=dtype, **move), self.mask.to(**move), pooled)


@dataclass
class PromptContext:
    """The prompt's token embeddings, one row per clip (a clip sees its own example's prompt).

    Built by the model from the layout's prompt ids (negative marker ids removed) and handed
    to a projector that sets ``uses_prompt = True``.
    """

    embeds: Tensor  # (clips, L, d)
    mask: Tensor  # (clips, L) bool


@dataclass
class AudioTokens:
    """Projector output: decoder-width tokens per clip; the mask is False for tokens made only of padding."""

    embeds: Tensor  # (clips, N, d)
    mask: Tensor  # (clips, N) bool


#: the label of a position that carries no loss (PyTorch's cross-entropy ``ignore_index``)
IGNORE = -100


@dataclass
class DecoderInputs:
    """What a layout hands to the decoder.

    Example:
        A batch of one 3-position example, every position attended, the last one labelled::

            DecoderInputs(inputs_embeds=torch.zeros(1, 3, d), attention_mask=torch.ones(1, 3, dtype=torch.long),
                          position_ids=torch.arange(3)[None], labels=torch.tensor([[-100, -100, 42]]))
    """

    inputs_embeds: Tensor  # (B, L, d)
    attention_mask: Tensor | None  # (B, L) long, 1 = attend; None = attend everywhere (Mellow compat)
    position_ids: Tensor | None  # (B, L)
    labels: Tensor | None  # (B, L), IGNORE (-100) where no loss; labels[t] is the target AT position t
    #: responses cut to the training's max_response_tokens (reported by the trainer)
    truncated: int = 0
    #: the token ids the layout placed (the inference engine reads the prompt's end from them)
    text: TextInputs | None = None
    #: labelled positions (labels != IGNORE), counted on the host by the layout; the training loss then
    #: picks them without waiting for the device. None: the loss finds them on the device (a sync).
    num_labels: int | None = None


@dataclass
class TextInputs:
    """Token ids per example, produced by a layout before the audio is projected.

    A layout may put negative marker ids in ``prompt_ids`` (where its ``assemble`` puts audio);
    they are dropped when the prompt context is built.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]] | None = None
    truncated: int = 0


# --------------------------------------------------------------------------- what a component reads
#: a hub repo id: "name" or "owner/name"
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One thing a component reads when it is built."""

    kind: Literal["file", "hub", "download", "package"]
    #: a path (file), a repo id (hub), a URL (download) or an importable module name (package)
    target: str
    #: the component param that names it ("checkpoint", "pretrained"); the message prefixes the component's key
    key: str
    #: hub: a file of the repo that must be in the local cache; download: the path it is cached at
    cached_as: str | None = None
    #: how to get it when it is missing (pip command, docs section, another key to set); ``{params}``
    #: stands for the component's params key (``model.encoders.0.params``)
    hint: str = ""


def hub_or_path(value: str, key: str, cached_as: str = "config.json", hint: str = "") -> Source:
    """A ``pretrained``-style value: a local folder when it exists or cannot be a repo id, else a hub repo."""
    if Path(value).expanduser().exists() or not _REPO_ID.match(value) or value.startswith("."):
        return Source("file", value, key, hint=hint)
    return Source("hub", value, key, cached_as=cached_as, hint=hint)



# --------------------------------------------------------------------------- components
class Component(nn.Module):
    """Common base: a nested ``Config`` dataclass and a flag for pretrained base weights.

    ``Config`` is a dataclass nested in the component class; the recipe entry's ``params`` are
    validated into it (unknown keys, wrong types and ``ValueError`` from ``__post_init__`` are
    reported with the recipe file and key) and the instance is the constructor's first argument.
    Construction runs under ``torch.random.fork_rng`` seeded from the build seed and the
    component's key path, so random initialisation is reproducible.

    Example:
        >>> from dataclasses import dataclass
        >>> class Gain(Projector):
        ...     @dataclass
        ...     class Config:
        ...         scale: float = 1.0
        ...
        ...         def __post_init__(self):
        ...             if self.scale <= 0:
        ...                 raise ValueError(f"scale must be > 0, got {self.scale}")  # name the field first
        ...
        ...     def forward(self, audio, prompt=None):
        ...         return AudioTokens(audio.frames * self.config.scale, audio.mask)
        >>> gain = Gain(Gain.Config(scale=0.5), StreamInfo(frame_dim=4), output_dim=4)
        >>> gain.config.scale  # Component.__init__ stored it
        0.5
    """

    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any) -> None:
        """Store the validated ``Config`` instance as ``self.config``.

        Args:
            config: an instance of the class's ``Config`` (``NoConfig()`` when it has none).

        Subclasses call ``super().__init__(config, ...)`` first, then build their layers.
        """
        super().__init__()
        self.config = config

    @property
    def has_pretrained_weights(self) -> bool:
        """True when the weights come from a checkpoint the recipe names (hub id or path).

        Checkpoints then store only what training changed; components initialised at
        random are stored in full so that a checkpoint is self-contained.

        Returns:
            bool: override to return True when ``self.config`` names a weights file or hub id.

        Example:
            >>> class LoadedGain(Gain):  # Gain: see the class
            ...     @property
            ...     def has_pretrained_weights(self):
            ...         return True  # e.g. self.config.checkpoint is not None
            >>> LoadedGain(Gain.Config(), StreamInfo(4), 4).has_pretrained_weights, gain.has_pretrained_weights
            (True, False)
        """
        return False

    @classmethod
    def sources(cls, config: Any) -> list[Any]:
        """What building with ``config`` reads from outside: files, hub models, downloads, packages.

        ``alm-kit train`` checks them all before it builds anything (``alm_kit.sources``), so that a
        missing checkpoint or an unreachable hub is one clear message, not a traceback after minutes.

        Args:
            config: the validated ``Config`` the component would be built with.

        Returns:
            list[Source]: one per file / hub repo / URL / package; the default is none.

        Example:
            >>> from alm_kit.interfaces import Source
            >>> class FileGain(Gain):  # Gain: see the class
            ...     @classmethod
            ...     def sources(cls, config):
            ...         return [Source("file", "/weights/gain.pt", "checkpoint", hint="see the plugin's README")]
            >>> FileGain.sources(Gain.Config())[0].target, Gain.sources(Gain.Config())
            ('/weights/gain.pt', [])
        """
        return []

    def standalone_params(self) -> dict[str, Any] | None:
        """Recipe params that rebuild this component's layers without reading its weights source.

        A checkpoint that stores every weight of a component (``alm-kit import``, ``alm-kit export``, a
        fully fine-tuned decoder) records them in ``meta.json``; loading it builds the component from
        them, so it needs no network and no package that only provided the weights. In strings,
        ``{checkpoint}`` stands for the checkpoint folder (the decoder's tokenizer is saved as
        ``{checkpoint}/tokenizer``).

        Returns:
            dict | None: plain data valid for ``Config``, building the same shapes with no download; None
            (the default): loading builds the component from its recipe entry, fetching its weights again.

        Example:
            >>> class HubGain(LoadedGain):  # LoadedGain: see has_pretrained_weights
            ...     def standalone_params(self):
            ...         return {"scale": self.config.scale}  # the same layers, no weights file named
            >>> HubGain(Gain.Config(scale=2.0), StreamInfo(4), 4).standalone_params(), gain.standalone_params()
            ({'scale': 2.0}, None)
        """
        return None


class Encoder(Component):
    """Waveforms at ``spec.sample_rate`` -> :class:`AudioFeatures`.

    Built as ``cls(config)``. ``__init__`` must set ``self.spec`` (:class:`AudioSpec`: how the data
    path resamples, pads and crops clips for this encoder) and ``self.info`` (:class:`StreamInfo`:
    frame width, pooled width or None, frames per second, frames per full clip).

    Example:
        A complete encoder: the mean and RMS of every 10 ms hop, pooled = masked mean.

        >>> from dataclasses import dataclass
        >>> from alm_kit.nn.masks import lengths_to_mask, masked_mean
        >>> class HopStats(Encoder):
        ...     @dataclass
        ...     class Config:
        ...         sample_rate: int = 16000
        ...         hop: int = 160
        ...
        ...     def __init__(self, config):
        ...         super().__init__(config)
        ...         self.spec = AudioSpec(config.sample_rate, clip_seconds=None, pad="none")  # any length
        ...         self.info = StreamInfo(frame_dim=2, pooled_dim=2, frame_rate=config.sample_rate / config.hop)
        ...
        ...     def forward(self, waveforms, lengths):
        ...         hop = self.config.hop
        ...         hops = waveforms[:, : waveforms.shape[1] // hop * hop].unflatten(1, (-1, hop))
        ...         frames = torch.stack([hops.mean(-1), hops.pow(2).mean(-1).sqrt()], dim=-1)
        ...         mask = lengths_to_mask((lengths // hop).clamp_min(1), frames.shape[1])
        ...         frames = frames * mask[..., None]  # padded frames are zero
        ...         return AudioFeatures(frames, mask, masked_mean(frames, mask))
        >>> encoder = HopStats(HopStats.Config())
        >>> out = encoder(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 8000]))
        >>> out.frames.shape, out.mask.sum(1).tolist(), out.pooled.shape
        (torch.Size([2, 100, 2]), [100, 50], torch.Size([2, 2]))
    """

    #: set in __init__ from the config
    spec: AudioSpec
    info: StreamInfo

    def forward(self, waveforms: Tensor, lengths: Tensor) -> AudioFeatures:  # pragma: no cover
        """``waveforms`` (clips, samples) float32 in [-1, 1]; ``lengths`` (clips,) real samples.

        Args:
            waveforms: (clips, samples) float32 in [-1, 1], mono, resampled to
                ``spec.sample_rate`` and fitted to ``spec`` (padded or cropped to
                ``clip_seconds``; rows of a variable-length encoder are zero-padded to the
                longest clip of the batch).
            lengths: (clips,) long, how many samples of each row are real audio.

        Returns:
            AudioFeatures: ``frames`` (clips, T, ``info.frame_dim``) with T = ``info.num_frames``
            for a full clip; ``mask`` (clips, T) bool, False for frames computed only from
            padding; ``pooled`` (clips,
            ``info.pooled_dim``), or None when ``info.pooled_dim`` is None. Valid frames and
            ``pooled`` should not depend on what the padding holds (``alm_kit.nn.masks``,
            ``alm_kit.nn.norm.MaskedGroupNorm``).

        Example:
            >>> features = encoder(torch.zeros(2, 16000), torch.tensor([16000, 4000]))  # encoder: see the class
            >>> features.mask.sum(1).tolist()
            [100, 25]
        """
        raise NotImplementedError


class Fusion(Component):
    """Several encoder streams (recipe order) -> one stream.

    Built as ``cls(config, streams)`` with the encoders' :class:`StreamInfo` in recipe order
    (stored as ``self.streams``); ``__init__`` must set ``self.info``, the joined stream's
    :class:`StreamInfo`, which sizes the projector. Only built when the recipe sets
    ``model.fusion`` (required with several encoders).

    A fusion that can also hand its streams on *unjoined* (ALARM's per-encoder adapters) sets
    ``stream_infos`` and implements ``forward_streams``; the ``chain`` fusion can then run it
    before another fusion. Fusions that only join leave ``stream_infos`` None.

    Example:
        Join streams of one width by putting their frames one after the other in time:

        >>> class Sequential(Fusion):
        ...     def __init__(self, config, streams):
        ...         super().__init__(config, streams)
        ...         if len({s.frame_dim for s in streams}) != 1:
        ...             raise ValueError("every stream needs the same frame_dim")
        ...         self.info = StreamInfo(frame_dim=streams[0].frame_dim)
        ...
        ...     def forward(self, features):
        ...         return AudioFeatures(torch.cat([f.frames for f in features], 1),
        ...                              torch.cat([f.mask for f in features], 1))
        >>> fusion = Sequential(NoConfig(), [StreamInfo(8), StreamInfo(8)])
        >>> a = AudioFeatures(torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
        >>> b = AudioFeatures(torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
        >>> fusion([a, b]).frames.shape
        torch.Size([2, 8, 8])
    """

    info: StreamInfo
    #: the streams ``forward_streams`` returns (recipe order); None: this fusion only joins
    stream_infos: list[StreamInfo] | None = None

    def __init__(self, config: Any, streams: list[StreamInfo]) -> None:
        """Keep the streams' shapes; a subclass then sets ``self.info`` and builds its layers.

        Args:
            config: the validated ``Config`` instance (``self.config``).
            streams: the :class:`StreamInfo` of every encoder, in recipe order (``self.streams``).
        """
        super().__init__(config)
        self.streams = streams

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:  # pragma: no cover
        """Join the streams.

        Args:
            features: one :class:`AudioFeatures` per stream of ``self.streams``, in the same
                order, all with the same clips (rows); frame counts and widths differ per stream.

        Returns:
            AudioFeatures: one stream whose frame width is ``self.info.frame_dim`` (and pooled width
            ``self.info.pooled_dim``), with a mask that is False for frames made only of padding.

        Example:
            >>> fusion([a, b]).mask.shape  # a, b, fusion: see the class
            torch.Size([2, 8])
        """
        raise NotImplementedError

    def forward_streams(self, features: list[AudioFeatures]) -> list[AudioFeatures]:
        """The streams before joining, one per entry of ``stream_infos``.

        Only for fusions that set ``stream_infos``; the default raises.

        Args:
            features: as for :meth:`forward`.

        Returns:
            list[AudioFeatures]: stream i matches ``self.stream_infos[i]``.

        Example:
            >>> fusion.stream_infos is None  # this one only joins: chain may use it only as the last step
            True
        """
        raise NotImplementedError(f"{type(self).__name__} only joins streams (its stream_infos is None)")


class Projector(Component):
    """One stream (+ optional prompt context) -> decoder-width audio tokens.

    Built as ``cls(config, stream, output_dim)``: ``stream`` is the single encoder's (or the
    fusion's) :class:`StreamInfo`, ``output_dim`` the decoder's ``hidden_size`` (stored as
    ``self.stream`` and ``self.output_dim``).

    Example:
        One token per frame (the pooled vector, when there is one, first):

        >>> class PerFrame(Projector):
        ...     def __init__(self, config, stream, output_dim):
        ...         super().__init__(config, stream, output_dim)
        ...         self.proj = nn.Linear(stream.frame_dim, output_dim)
        ...         self.pooled = None if stream.pooled_dim is None else nn.Linear(stream.pooled_dim, output_dim)
        ...
        ...     def forward(self, audio, prompt=None):
        ...         tokens, mask = self.proj(audio.frames), audio.mask
        ...         if self.pooled is not None:
        ...             tokens = torch.cat([self.pooled(audio.pooled)[:, None], tokens], 1)
        ...             mask = torch.cat([mask.new_ones(len(mask), 1), mask], 1)
        ...         return AudioTokens(tokens, mask)
        >>> projector = PerFrame(NoConfig(), StreamInfo(frame_dim=8, pooled_dim=8), output_dim=32)
        >>> audio = AudioFeatures(torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 8))
        >>> projector(audio).embeds.shape
        torch.Size([2, 6, 32])
    """

    #: projectors that read the prompt (intent query) set this; the model then builds PromptContext
    uses_prompt: ClassVar[bool] = False

    def __init__(self, config: Any, stream: StreamInfo, output_dim: int) -> None:
        """Keep the input's shape and the output width; a subclass then builds its layers.

        Args:
            config: the validated ``Config`` instance (``self.config``).
            stream: the :class:`StreamInfo` of the projector's input (``self.stream``).
            output_dim: the decoder's ``hidden_size``, the width of every audio token (``self.output_dim``).
        """
        super().__init__(config)
        self.stream = stream
        self.output_dim = output_dim

    def forward(self, audio: AudioFeatures, prompt: PromptContext | None = None) -> AudioTokens:  # pragma: no cover
        """Map one stream to audio tokens.

        Args:
            audio: (clips, T, ``stream.frame_dim``) frames with their mask, and the pooled vector
                when ``stream.pooled_dim`` is set.
            prompt: each clip's prompt embeddings (clips, L, d) with mask, when the class sets
                ``uses_prompt = True``; None otherwise.

        Returns:
            AudioTokens: ``embeds`` (clips, N, ``output_dim``) and ``mask`` (clips, N) bool,
            False for tokens made only of padding. N may differ from batch to batch (it is the
            number of audio positions the layout places per clip).

        Example:
            >>> tokens = projector(audio)  # projector, audio: see the class
            >>> tokens.mask.shape
            torch.Size([2, 6])
        """
        raise NotImplementedError


class Decoder(Component):
    """A causal LM and its tokenizer.

    Built as ``cls(config)``. ``__init__`` must set ``self.hidden_size`` (the embedding width,
    every audio token's width) and ``self.tokenizer`` (a transformers tokenizer; it is saved with
    every checkpoint). alm-kit runs its own training and decoding loops, calling only
    :meth:`embed`, :meth:`forward` and :meth:`logits`.

    Example:
        A transformers model built from a config (random weights; ``from_pretrained`` likewise):

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from alm_kit.decoders.tiny_tokenizer import build_tiny_tokenizer
        >>> class TinyLlama(Decoder):
        ...     def __init__(self, config):
        ...         super().__init__(config)
        ...         self.tokenizer = build_tiny_tokenizer()
        ...         self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=32,
        ...             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        ...         self.hidden_size = 32
        ...
        ...     def embed(self, token_ids):
        ...         return self.lm.get_input_embeddings()(token_ids)
        ...
        ...     def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
        ...                 use_cache=False):
        ...         out = self.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        ...                             position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        ...         return out.last_hidden_state, out.past_key_values if use_cache else None
        ...
        ...     def logits(self, hidden):
        ...         return self.lm.lm_head(hidden)
        ...
        ...     @property
        ...     def language_model(self):
        ...         return self.lm
        >>> decoder = TinyLlama(NoConfig())
        >>> hidden, cache = decoder(decoder.embed(torch.tensor([[5, 6, 7]])))
        >>> decoder.logits(hidden).shape[:2], cache
        (torch.Size([1, 3]), None)
    """

    hidden_size: int
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def embed(self, token_ids: Tensor) -> Tensor:  # pragma: no cover
        """Token embeddings.

        Args:
            token_ids: long tensor of any shape (...,), ids of ``self.tokenizer``.

        Returns:
            Tensor: (..., d) with d = ``hidden_size``, differentiable when the embeddings train.

        Example:
            >>> decoder.embed(torch.tensor([[1, 2, 3]])).shape  # decoder: see the class
            torch.Size([1, 3, 32])
        """
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:  # pragma: no cover
        """Return (last hidden states (B, L, d), past_key_values or None).

        Args:
            inputs_embeds: (B, L, d) the layout's decoder input; while decoding with a cache, the
                new positions only (B, 1, d).
            attention_mask: (B, L_total) long, 1 = attend, covering the cached positions too;
                None: attend everywhere.
            position_ids: (B, L) long position of every new input position; None: 0, 1, 2, ...
            past_key_values: the cache of earlier positions. On the first call of a generation
                it is a preallocated transformers ``Cache`` when ``language_model.config`` has
                ``num_hidden_layers`` (and no sliding window), else None (make your own).
            use_cache: return the updated cache.

        Returns:
            tuple: hidden states of the last layer (B, L, d) before the LM head, and the cache
            (a transformers ``Cache``: the decoding loop drops finished rows through its
            ``layers``) when ``use_cache``, else None.

        Example:
            >>> prompt = decoder.embed(torch.tensor([[5, 6, 7]]))  # decoder: see the class
            >>> hidden, cache = decoder(prompt, use_cache=True)
            >>> step, cache = decoder(decoder.embed(torch.tensor([[8]])), position_ids=torch.tensor([[3]]),
            ...                       past_key_values=cache, use_cache=True)
            >>> step.shape, cache.get_seq_length()
            (torch.Size([1, 1, 32]), 4)
        """
        raise NotImplementedError

    def logits(self, hidden: Tensor) -> Tensor:  # pragma: no cover
        """Next-token scores from hidden states.

        Args:
            hidden: (..., d) hidden states from :meth:`forward` (training passes only the response
                positions, flattened; decoding the last position of each row).

        Returns:
            Tensor: (..., vocab) unnormalised scores over ``self.tokenizer``'s ids.

        Example:
            >>> decoder.logits(torch.zeros(4, 32)).shape[0]  # decoder: see the class
            4
        """
        raise NotImplementedError

    @property
    def language_model(self) -> nn.Module:  # pragma: no cover
        """The underlying model, usually a transformers ``PreTrainedModel``.

        alm-kit reads its ``config`` (``num_hidden_layers``, ``max_position_embeddings``,
        ``sliding_window``) and ``_no_split_modules`` (FSDP) when they exist.

        Returns:
            nn.Module: the wrapped model.

        Example:
            >>> decoder.language_model.config.num_hidden_layers  # decoder: see the class
            2
        """
        raise NotImplementedError

    def save_tokenizer(self, directory: str) -> None:
        """Write the tokenizer next to a checkpoint's weights (loaded back with ``AutoTokenizer``).

        Args:
            directory: the folder to write into.

        Example:
            >>> import tempfile
            >>> decoder.save_tokenizer(tempfile.mkdtemp())  # decoder: see the class
        """
        self.tokenizer.save_pretrained(directory)


class Layout(Component):
    """Tokenize text and arrange audio tokens and text into decoder inputs.

    Built as ``cls(config, decoder)``; ``self.decoder`` is the model's decoder (its ``tokenizer``
    and ``embed``), not a submodule of the layout. The model calls :meth:`tokenize` first, then
    projects the audio, then :meth:`assemble`. The pieces, padding, position ids and labels
    helpers that the built-in layouts share are in ``alm_kit.nn.sequence``.

    Example:
        ``[clip tokens...][prompt][response]`` per example:

        >>> from alm_kit.nn.sequence import TextEmbedder, audio_piece, clip_rows, stack
        >>> class AudioFirst(Layout):
        ...     def tokenize(self, prompts, responses=None):
        ...         encode = lambda text: self.decoder.tokenizer.encode(text, add_special_tokens=False)
        ...         return TextInputs([encode(p) for p in prompts],
        ...                           None if responses is None else [encode(r) + [self.end_token_id()]
        ...                                                           for r in responses])
        ...
        ...     def assemble(self, text, audio, clips_per_example, for_generation):
        ...         responses = [] if for_generation or text.response_ids is None else text.response_ids
        ...         embedder = TextEmbedder(self.decoder, text.prompt_ids + responses, audio.embeds.device)
        ...         n = len(text.prompt_ids)
        ...         examples = []
        ...         for i, clips in enumerate(clip_rows(audio, clips_per_example)):
        ...             pieces = [audio_piece(embeds, mask) for embeds, mask in clips]
        ...             pieces.append(embedder.piece(i, text.prompt_ids[i]))
        ...             if responses:
        ...                 pieces.append(embedder.piece(n + i, responses[i], loss=True))
        ...             examples.append(pieces)
        ...         inputs = stack(examples, left_pad=for_generation)
        ...         return DecoderInputs(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids,
        ...                              None if for_generation else inputs.labels)
        >>> layout = AudioFirst(NoConfig(), decoder)  # decoder: see Decoder
        >>> text = layout.tokenize(["what is it?", "loud?"], ["a dog", "yes"])
        >>> audio = AudioTokens(torch.zeros(3, 4, 32), torch.ones(3, 4, dtype=torch.bool))
        >>> inputs = layout.assemble(text, audio, [1, 2], for_generation=False)  # example 1 has two clips
        >>> inputs.inputs_embeds.shape[0], int((inputs.labels != -100).sum()) == sum(map(len, text.response_ids))
        (2, True)
    """

    #: most clips one example may carry (None: any)
    max_audios: ClassVar[int | None] = None

    def __init__(self, config: Any, decoder: Decoder) -> None:
        """Keep the decoder for tokenizing and embedding text.

        Args:
            config: the validated ``Config`` instance (``self.config``).
            decoder: the model's decoder (``self.decoder``; its tokenizer and embeddings).
        """
        super().__init__(config)
        # not a submodule: the decoder belongs to the model, the layout only uses it
        object.__setattr__(self, "decoder", decoder)

    def tokenize(self, prompts: list[str], responses: list[str] | None = None) -> TextInputs:  # pragma: no cover
        """Token ids of prompts (and responses). Layouts of thinking decoders may also accept a
        keyword ``thinking: bool`` (on/off for this call); it is passed only when a caller sets it.

        Args:
            prompts: one prompt per example.
            responses: one answer per example (training), or None (generation). A response's
                ids should end with :meth:`end_token_id` so that the model learns to stop.

        Returns:
            TextInputs: ``prompt_ids`` per example (may contain negative marker ids for
            ``assemble``), ``response_ids`` per example or None. The model truncates responses to
            ``training.max_response_tokens`` afterwards.

        Example:
            >>> text = layout.tokenize(["how many beeps?"], ["three"])  # layout: see the class
            >>> text.response_ids[0][-1] == layout.end_token_id()
            True
        """
        raise NotImplementedError

    def end_token_id(self) -> int:
        """The token that ends an answer in this layout (generation stops there).

        Returns:
            int: a token id of ``self.decoder.tokenizer``; the default is its EOS. Override it
            when the layout ends answers with another token (a chat template's ``<|im_end|>``).

        Example:
            >>> layout.end_token_id() == decoder.tokenizer.eos_token_id  # layout: see the class
            True
        """
        return self.decoder.tokenizer.eos_token_id

    def assemble(
        self, text: TextInputs, audio: AudioTokens, clips_per_example: list[int], for_generation: bool
    ) -> DecoderInputs:  # pragma: no cover
        """Build decoder inputs; clips of example i are rows sum(clips[:i]) .. of ``audio``.

        With ``for_generation`` the batch is left-padded and has no labels.

        Args:
            text: what :meth:`tokenize` returned (responses possibly truncated).
            audio: the projector's tokens for every clip of the batch, (clips, N, d).
            clips_per_example: how many clips (rows of ``audio``) each example has, in order.
                Raise ``ValueError`` for an example with more clips than the layout takes.
            for_generation: True: left-pad the rows (the next token follows the last
                position) and return ``labels=None``, ignoring responses. False: right-pad and set
                ``labels`` to the response ids at their positions, -100 elsewhere.

        Returns:
            DecoderInputs: ``inputs_embeds`` (B, L, d); ``attention_mask`` (B, L) long (0 for
            padding and masked audio tokens) or None; ``position_ids`` (B, L) counting attended
            positions only, or None; ``labels`` as above.

        Example:
            >>> prompt = layout.tokenize(["what is it?"])  # layout: see the class
            >>> one_clip = AudioTokens(torch.zeros(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
            >>> gen = layout.assemble(prompt, one_clip, [1], for_generation=True)
            >>> gen.labels is None, gen.inputs_embeds.shape[1] == 4 + len(prompt.prompt_ids[0])
            (True, True)
        """
        raise NotImplementedError


INTERFACES: dict[str, type[Component]] = {
    "encoder": Encoder,
    "fusion": Fusion,
    "projector": Projector,
    "decoder": Decoder,
    "layout": Layout,
}
