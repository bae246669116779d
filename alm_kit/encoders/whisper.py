"""The encoder of OpenAI's Whisper through the ``openai-whisper`` package.

16 kHz input, Whisper's own log-mel (``whisper.audio.log_mel_spectrogram``: 25 ms
window, 10 ms hop, 80 or 128 mels), two convolutions (the second with stride 2:
100 mel frames/s -> **50 frames/s**, one frame per 320 samples), sinusoidal
positions and ``n_layer`` pre-norm transformer blocks. The forward pass is written
here over the submodules of ``whisper.model.AudioEncoder`` (``conv1``, ``conv2``,
``positional_embedding``, ``blocks``, ``ln_post``), so that:

* short windows need no padding to 30 s: the positional embedding is sliced to the
  batch's frame count (``positional_embedding[:T]``);
* with ``pad: none`` every clip is encoded *as if it were alone*: its log-mel is computed
  from its own samples, the mel frames after it are zero (what the convolution's padding
  gives a lone clip) and its padded frames are masked out of self-attention (key padding
  mask). Batching clips of different lengths does not change a clip's real frames.
  With ``pad: zero`` / ``repeat`` every row is one whole window, as in Whisper itself
  (Whisper was trained on zero-padded 30 s windows and attends to the padding).

Outputs: frames (clips, T, n_state) at 50 frames/s; frame i is real when
``i * 320 < length`` (at least one frame); ``pooled`` is the masked mean of the real
frames. ``layers`` taps hidden states and mixes them with learned softmax weights (ALARM).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alm_kit.interfaces import AudioFeatures, AudioSpec, Encoder, StreamInfo
from alm_kit.nn.masks import masked_mean
from alm_kit.nn.precision import keep_fp32

SAMPLE_RATE = 16000
#: mel hop (10 ms) and the samples behind one encoder frame (conv2 has stride 2)
MEL_HOP = 160
SAMPLES_PER_FRAME = 2 * MEL_HOP
#: Whisper's window: 30 s = 3000 mel frames = 1500 encoder frames (n_audio_ctx)
MAX_SECONDS = 30.0
AUDIO_CTX = 1500

WhisperSize = Literal[
    "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
]

#: published dimensions: n_mels, n_audio_state, n_audio_head, n_audio_layer, n_vocab, n_text_layer
#: (n_audio_ctx 1500 and n_text_ctx 448 for all; the text width/heads equal the audio ones).
#: ``large`` and ``turbo`` are openai-whisper's aliases of large-v3 and large-v3-turbo.
WHISPER_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny.en": (80, 384, 6, 4, 51864, 4),
    "tiny": (80, 384, 6, 4, 51865, 4),
    "base.en": (80, 512, 8, 6, 51864, 6),
    "base": (80, 512, 8, 6, 51865, 6),
    "small.en": (80, 768, 12, 12, 51864, 12),
    "small": (80, 768, 12, 12, 51865, 12),
    "medium.en": (80, 1024, 16, 24, 51864, 24),
    "medium": (80, 1024, 16, 24, 51865, 24),
    "large-v1": (80, 1280, 20, 32, 51865, 32),
    "large-v2": (80, 1280, 20, 32, 51865, 32),
    "large-v3": (128, 1280, 20, 32, 51866, 32),
    "large": (128, 1280, 20, 32, 51866, 32),
    "large-v3-turbo": (128, 1280, 20, 32, 51866, 4),
    "turbo": (128, 1280, 20, 32, 51866, 4),
}
#: the size used when neither ``size`` nor a checkpoint says (TinyGiantALM's encoder)
DEFAULT_SIZE = "large-v3-turbo"


def whisper_dims(size: str, n_state: int | None = None, n_head: int | None = None,
                 n_layer: int | None = None) -> Any:
    """``whisper.model.ModelDimensions`` of a published size, optionally with a smaller encoder.

    Builds nothing: use it to read a size's shapes without allocating the model.
    """
    from whisper.model import ModelDimensions

    if size not in WHISPER_SIZES:
        raise ValueError(f"unknown Whisper size {size!r}; known: {', '.join(WHISPER_SIZES)}")
    mels, state, head, layer, vocab, text_layer = WHISPER_SIZES[size]
    return ModelDimensions(
        n_mels=mels, n_audio_ctx=AUDIO_CTX, n_audio_state=n_state or state, n_audio_head=n_head or head,
        n_audio_layer=n_layer or layer, n_vocab=vocab, n_text_ctx=448, n_text_state=state,
        n_text_head=head, n_text_layer=text_layer,
    )


def frames_for(samples: int) -> int:
    """Encoder frames for ``samples`` samples: one per started 20 ms (at least one)."""
    return max(1, -(-int(samples) // SAMPLES_PER_FRAME))


def whisper_frames_mask(lengths: Tensor, num_frames: int) -> Tensor:
    """(clips, num_frames) bool: frame i is real if ``i * 320 < length``; frame 0 always."""
    starts = torch.arange(num_frames, device=lengths.device) * SAMPLES_PER_FRAME
    mask = starts[None, :] < lengths[:, None]
    mask[:, 0] = True
    return mask


def _block_forward(block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """One ``whisper.model.ResidualAttentionBlock`` (self-attention only) with a key mask.

    Same computation as Whisper's (its q and k scaling by d_head^-0.25 each is SDPA's
    1/sqrt(d_head)); ``attn_mask`` (clips, 1, 1, T) bool, True = may be attended to.
    """
    attn = block.attn
    h = block.attn_ln(x)
    q, k, v = attn.query(h), attn.key(h), attn.value(h)
    b, t, d = q.shape
    heads = attn.n_head
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    x = x + attn.out(a.transpose(1, 2).reshape(b, t, d))
    return x + block.mlp(block.mlp_ln(x))


class WhisperEncoder(Encoder):
    """Whisper's audio encoder (openai-whisper), variable-length, with optional layer taps."""

    @dataclass
    class Config:
        #: published size; None: the checkpoint's dimensions, else large-v3-turbo
        size: WhisperSize | None = None
        #: whisper .pt file as ``whisper.load_model`` reads it ({"dims", "model_state_dict"}),
        #: or a bare state dict (then ``size`` gives the shapes); the ``encoder.`` weights are taken
        checkpoint: str | None = None
        #: download the published weights with ``whisper.load_model(size)`` (needs network)
        pretrained: bool = False
        #: window length (at most 30 s); longer clips are cropped
        clip_seconds: float = 30.0
        #: zero/repeat: fill every clip to clip_seconds (Whisper's own way); none: keep clips short
        pad: Literal["zero", "repeat", "none"] = "zero"
        crop: Literal["start", "center", "random"] = "start"
        #: hidden states to mix with learned softmax weights (ALARM, large-v3: [7, 15, 23, 31]);
        #: index k = after k blocks (0 = conv stem + positions, n_layer = after ln_post), as in
        #: transformers' ``hidden_states``; negative indices count from the end. None: last (after ln_post)
        layers: list[int] | None = None
        #: smaller encoders for tests (random weights only)
        n_state: int | None = None
        n_head: int | None = None
        n_layer: int | None = None
        init_seed: int = 0

        def __post_init__(self) -> None:
            if not 0 < self.clip_seconds <= MAX_SECONDS:
                raise ValueError(f"clip_seconds must be in (0, {MAX_SECONDS:g}] (Whisper's window is 30 s)")
            if self.checkpoint and self.pretrained:
                raise ValueError("give either checkpoint or pretrained: true, not both")
            overrides = [k for k in ("n_state", "n_head", "n_layer") if getattr(self, k) is not None]
            if overrides and (self.checkpoint or self.pretrained):
                raise ValueError(f"{', '.join(overrides)} only apply to randomly initialised encoders")
            if any(getattr(self, k) is not None and getattr(self, k) < 1 for k in ("n_state", "n_head", "n_layer")):
                raise ValueError("n_state, n_head and n_layer must be >= 1")
            if self.layers is not None and not self.layers:
                raise ValueError("layers must list at least one index (or be null for the last layer)")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        from whisper.model import AudioEncoder, ModelDimensions

        state = None
        if config.checkpoint:
            dims, state = self._read_checkpoint(config.checkpoint, config.size)
        elif config.pretrained:
            import whisper

            model = whisper.load_model(config.size or DEFAULT_SIZE, device="cpu")
            dims, state = model.dims, model.encoder.state_dict()
            del model
        else:
            dims = whisper_dims(config.size or DEFAULT_SIZE, config.n_state, config.n_head, config.n_layer)
        if not isinstance(dims, ModelDimensions):
            dims = ModelDimensions(**dims)
        if dims.n_audio_state % dims.n_audio_head:
            raise ValueError(f"n_state {dims.n_audio_state} is not a multiple of n_head {dims.n_audio_head}")
        self.dims = dims
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                        dims.n_audio_layer)
        if state is not None:
            self.encoder.load_state_dict(state)
        for module in self.encoder.modules():  # whisper's LayerNorm computes in fp32 by design: so do its weights
            if isinstance(module, torch.nn.LayerNorm):
                keep_fp32(module, output="input")

        n_layer = dims.n_audio_layer
        if config.layers is None:
            self.taps: list[int] = [n_layer]
            self.layer_weights = None
        else:
            bad = [i for i in config.layers if not -(n_layer + 1) <= i <= n_layer]
            if bad:
                raise ValueError(f"layers {bad} out of range: this encoder has hidden states 0..{n_layer}")
            self.taps = [i % (n_layer + 1) for i in config.layers]
            if len(set(self.taps)) != len(self.taps):
                raise ValueError(f"layers {config.layers} name the same hidden state twice")
            # softmax(0) = uniform; trains only when the encoder trains (frozen encoders freeze it too)
            self.layer_weights = nn.Parameter(torch.zeros(len(self.taps)))

        self.spec = AudioSpec(SAMPLE_RATE, config.clip_seconds, config.pad, config.crop)
        fixed = config.pad != "none"
        self.info = StreamInfo(
            frame_dim=dims.n_audio_state,
            pooled_dim=dims.n_audio_state,
            frame_rate=SAMPLE_RATE / SAMPLES_PER_FRAME,
            num_frames=frames_for(self.spec.clip_samples) if fixed else None,
        )

    # ------------------------------------------------------------------ weights
    @staticmethod
    def _read_checkpoint(path: str, size: str | None) -> tuple[Any, dict[str, Tensor]]:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"Whisper checkpoint not found: {path}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a Whisper checkpoint (expected a dict)")
        if "model_state_dict" in raw:
            state = raw["model_state_dict"]
            if "dims" not in raw:
                raise ValueError(f"{path}: has model_state_dict but no dims")
            dims = dict(raw["dims"])
            if size is not None:
                mels, st, head, layer = WHISPER_SIZES[size][:4]
                have = (dims["n_mels"], dims["n_audio_state"], dims["n_audio_head"], dims["n_audio_layer"])
                if have != (mels, st, head, layer):
                    raise ValueError(f"{path}: encoder dims (n_mels, state, heads, layers) {have} "
                                     f"are not those of size {size!r} {(mels, st, head, layer)}; drop `size`")
        else:
            state, dims = raw, whisper_dims(size or DEFAULT_SIZE)
        picked = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not picked:  # a bare encoder state dict
            picked = {k: v for k, v in state.items()
                      if k.split(".")[0] in ("conv1", "conv2", "positional_embedding", "blocks", "ln_post")}
        if not picked:
            raise ValueError(f"{path}: no Whisper encoder weights (keys like 'encoder.conv1.weight')")
        return dims, picked

    @property
    def has_pretrained_weights(self) -> bool:
        return bool(self.config.checkpoint) or self.config.pretrained

    @classmethod
    def sources(cls, config: Config) -> list[Any]:
        from alm_kit.interfaces import Source

        if config.checkpoint:
            return [Source("file", config.checkpoint, "checkpoint", hint="point it at a Whisper .pt file")]
        if not config.pretrained:
            return []
        import whisper

        size = config.size or DEFAULT_SIZE
        url = whisper._MODELS[size]
        root = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "whisper")
        cached = os.path.join(root, os.path.basename(url))
        return [Source("download", url, "pretrained", cached_as=cached, hint=(
            f"download it where there is network (python -c \"import whisper; whisper.load_model('{size}')\" "
            f"caches it as {cached}) and copy it there, or use a copy elsewhere: {{params}}.pretrained=false "
            f"{{params}}.checkpoint=/path/{os.path.basename(url)} (docs/components.md)"))]

    def standalone_params(self) -> dict[str, Any]:
        """The loaded dimensions as a published size with this encoder's width, heads and depth (no download)."""
        dims = self.dims
        size = self.config.size or next(name for name, row in WHISPER_SIZES.items() if row[0] == dims.n_mels)
        return {**dataclasses.asdict(self.config), "checkpoint": None, "pretrained": False, "size": size,
                "n_state": dims.n_audio_state, "n_head": dims.n_audio_head, "n_layer": dims.n_audio_layer}

    def mixing_weights(self) -> Tensor | None:
        """Softmax weights of the tapped layers (sum to 1), or None without ``layers``."""
        return None if self.layer_weights is None else torch.softmax(self.layer_weights, 0)

    # ------------------------------------------------------------------ forward
    def log_mel(self, waveforms: Tensor, content: Tensor, num_frames: int) -> Tensor:
        """(clips, n_mels, 2 * num_frames): each clip's log-mel from its first ``content`` samples.

        A clip is zero-padded to a whole number of encoder frames before the STFT; mel
        frames after it are 0, as a convolution's padding sees a clip encoded alone.
        Whisper normalises each log-mel by its own maximum (per clip here).
        """
        from whisper.audio import log_mel_spectrogram

        n_mels = self.dims.n_mels
        mel = waveforms.new_zeros(waveforms.shape[0], n_mels, 2 * num_frames, dtype=torch.float32)
        with torch.autocast(waveforms.device.type, enabled=False):  # the mel front end computes in fp32
            for i, n in enumerate(content.tolist()):
                frames = frames_for(n)
                clip = waveforms[i, :n].float()
                clip = F.pad(clip, (0, frames * SAMPLES_PER_FRAME - clip.shape[0]))
                mel[i, :, : 2 * frames] = log_mel_spectrogram(clip, n_mels)
        return mel

    def forward(self, waveforms: Tensor, lengths: Tensor) -> AudioFeatures:
        waveforms = waveforms.float()
        clips, total = waveforms.shape
        num_frames = frames_for(total)
        if num_frames > self.dims.n_audio_ctx:
            raise ValueError(f"Whisper takes at most {MAX_SECONDS:g} s ({self.dims.n_audio_ctx} frames); "
                             f"got {total} samples")
        lengths = lengths.to(waveforms.device).long().clamp(0, total)
        isolate = self.config.pad == "none"
        content = lengths.clamp_min(1) if isolate else torch.full_like(lengths, total)
        enc = self.encoder
        x = self.log_mel(waveforms, content, num_frames).to(enc.conv1.weight.dtype)
        x = F.gelu(enc.conv1(x))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding[:num_frames]).to(x.dtype)
        attn_mask = whisper_frames_mask(content, num_frames)[:, None, None, :] if isolate else None

        wanted = set(self.taps)
        hidden: dict[int, Tensor] = {0: x} if 0 in wanted else {}
        last = max(wanted)
        for i, block in enumerate(enc.blocks, start=1):
            if i > last:
                break
            x = _block_forward(block, x, attn_mask)
            if i in wanted:
                hidden[i] = x
        if len(enc.blocks) in wanted:
            hidden[len(enc.blocks)] = enc.ln_post(x)
        if self.layer_weights is None:
            frames = hidden[self.taps[0]]
        else:
            w = torch.softmax(self.layer_weights, 0).to(x.dtype)
            frames = sum(w[j] * hidden[t] for j, t in enumerate(self.taps))
        mask = whisper_frames_mask(lengths, num_frames)
        return AudioFeatures(frames, mask, masked_mean(frames, mask))
