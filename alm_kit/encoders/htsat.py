"""HTS-AT (Ke Chen et al.) through laion-clap's implementation.

Outputs, chosen by ``output``:

* ``sed`` (Mellow): frames = sigmoid class posteriors (clips, 1024, 527), each of the
  32 time steps repeated 32x as HTS-AT does; pooled = the clip latent (768).
* ``fine_grained``: frames = the 768-d latent per time step (same layout); pooled = latent.
* ``embedding``: one frame, the clip latent.

Mellow's settings (the defaults): 32 kHz, 10 s, 64 mels, window 1024, hop 320,
fmin 50, fmax 14000, Swin-Tiny. CLAP-trained HTS-AT uses 48 kHz, 10.24 s, hop 480.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor

from alm_kit.encoders._laion import NoAttentionMaps, building_laion_modules, clap_module, fix_front_end
from alm_kit.interfaces import AudioFeatures, AudioSpec, Encoder, StreamInfo
from alm_kit.nn.masks import frames_mask

#: laion/HTS-AT repeat each of the time steps this many times in framewise outputs
HTSAT_FRAME_REPEAT = 32
#: prefixes that wrap HTS-AT weights in known checkpoints (HTS-AT training, laion-clap, DDP)
CHECKPOINT_PREFIXES = ("module.", "sed_model.", "model.audio_branch.", "audio_branch.", "htsat.")


class HTSATEncoder(NoAttentionMaps, Encoder):
    """HTS-AT audio encoder (Swin transformer over a folded log-mel)."""

    @dataclass
    class Config:
        output: Literal["sed", "fine_grained", "embedding"] = "sed"
        sample_rate: int = 32000
        clip_seconds: float = 10.0
        #: short clips: zeros (Mellow's training), tiled to the end (Mellow's inference), or laion-clap's repeatpad
        pad: Literal["zero", "repeat", "repeatpad"] = "zero"
        crop: Literal["start", "center", "random"] = "start"
        window_size: int = 1024
        hop_size: int = 320
        mel_bins: int = 64
        fmin: int = 50
        fmax: int = 14000
        spec_size: int = 256
        patch_size: int = 4
        embed_dim: int = 96
        depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
        num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
        swin_window: int = 8
        num_classes: int = 527
        drop_path_rate: float = 0.1
        #: HTS-AT's SpecAugment while training (only matters when the encoder trains)
        spec_augment: bool = True
        #: keep HTS-AT's 32x repeated frames (Mellow) or return one frame per time step
        repeat_frames: bool = True
        #: LayerNorm on each patch embedding (Swin's ``patch_norm``, HTS-AT's default). It rescales
        #: every patch to the same size, so a patch 20 dB louder gives much the same token: false
        #: keeps the level in the tokens (the Swin blocks and the final norm are unchanged)
        patch_norm: bool = True
        #: HTS-AT AudioSet checkpoint or laion-clap checkpoint (audio branch is taken)
        checkpoint: str | None = None
        init_seed: int = 0

        def __post_init__(self) -> None:
            if len(self.depths) != len(self.num_heads):
                raise ValueError("depths and num_heads must have the same length")
            if self.spec_size % self.mel_bins:
                raise ValueError("spec_size must be a multiple of mel_bins (HTS-AT folds time into frequency)")
            # HTS-AT folds (time x mel) into a spec_size x spec_size image: at most spec_size * (spec_size /
            # mel_bins) mel frames fit (laion's own check is a bare assert at the first forward)
            fits = self.spec_size * (self.spec_size // self.mel_bins)
            frames = int(round(self.clip_seconds * self.sample_rate)) // self.hop_size + 1
            if frames > fits:
                raise ValueError(
                    f"clip_seconds {self.clip_seconds:g} at hop_size {self.hop_size} gives {frames} mel frames, but "
                    f"spec_size {self.spec_size} with mel_bins {self.mel_bins} holds at most {fits}: raise spec_size "
                    f"or hop_size, lower mel_bins, or shorten clip_seconds")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        htsat = clap_module("htsat")
        audio_cfg = SimpleNamespace(
            sample_rate=config.sample_rate, window_size=config.window_size, hop_size=config.hop_size,
            mel_bins=config.mel_bins, fmin=config.fmin, fmax=config.fmax,
        )
        with torch.random.fork_rng(devices=[]), building_laion_modules():
            torch.manual_seed(config.init_seed)
            self.htsat = htsat.HTSAT_Swin_Transformer(
                spec_size=config.spec_size, patch_size=config.patch_size, patch_stride=(config.patch_size,) * 2,
                num_classes=config.num_classes, embed_dim=config.embed_dim, depths=list(config.depths),
                num_heads=list(config.num_heads), window_size=config.swin_window,
                drop_path_rate=config.drop_path_rate, config=audio_cfg,
            )
        fix_front_end(self.htsat)
        if not config.spec_augment:
            self.htsat.spec_augmenter = torch.nn.Identity()
        if not config.patch_norm:  # laion's patch_norm=False would drop every other LayerNorm too
            self.htsat.patch_embed.norm = torch.nn.Identity()
        if config.checkpoint:
            self.load_checkpoint(config.checkpoint)
        self.spec = AudioSpec(config.sample_rate, config.clip_seconds, config.pad, config.crop)
        freq_ratio = config.spec_size // config.mel_bins
        steps = config.spec_size // config.patch_size // 2 ** (len(config.depths) - 1) * freq_ratio
        latent = config.embed_dim * 2 ** (len(config.depths) - 1)
        frames = 1 if config.output == "embedding" else steps * (HTSAT_FRAME_REPEAT if config.repeat_frames else 1)
        self.num_frames = frames
        self.info = StreamInfo(
            frame_dim=config.num_classes if config.output == "sed" else latent,
            pooled_dim=latent,
            frame_rate=None if config.output == "embedding" else frames / config.clip_seconds,
            num_frames=frames,
        )

    @property
    def has_pretrained_weights(self) -> bool:
        return self.config.checkpoint is not None

    @classmethod
    def sources(cls, config: Config) -> list[Any]:
        from alm_kit.interfaces import Source

        if not config.checkpoint:
            return []
        return [Source("file", config.checkpoint, "checkpoint",
                       hint="point it at an HTS-AT AudioSet checkpoint (HTSAT_AudioSet_Saved_1.ckpt) or a "
                            "laion-clap checkpoint, or {params}.checkpoint=null for random weights (docs/components.md)")]

    def standalone_params(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.config), "checkpoint": None}

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        own = self.htsat.state_dict()
        for prefix in ("",) + CHECKPOINT_PREFIXES:
            picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if picked and set(picked) >= set(own) - {k for k in own if "extractor" in k}:
                missing, unexpected = self.htsat.load_state_dict(picked, strict=False)
                missing = [k for k in missing if "extractor" not in k]
                if missing:
                    raise ValueError(f"{path}: HTS-AT weights missing {missing[:5]}")
                return
        raise ValueError(
            f"{path} holds no HTS-AT weights of this size (looked for keys like "
            f"'{next(iter(own))}' under prefixes {', '.join(CHECKPOINT_PREFIXES)})"
        )

    def forward(self, waveforms: Tensor, lengths: Tensor) -> AudioFeatures:
        out = self.htsat({"waveform": waveforms.float()}, device=waveforms.device)
        pooled = out["embedding"]
        if self.config.output == "embedding":
            frames = pooled[:, None, :]
        else:
            frames = out["framewise_output" if self.config.output == "sed" else "fine_grained_embedding"]
            if not self.config.repeat_frames:
                frames = frames[:, ::HTSAT_FRAME_REPEAT]
        mask = frames_mask(lengths, waveforms.shape[-1], frames.shape[1])
        return AudioFeatures(frames, mask, pooled)
