"""Perceiver-style resampler: K learned latents read the audio frames (fixed output length)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alm_kit.interfaces import AudioFeatures, AudioTokens, Projector, PromptContext, StreamInfo
from alm_kit.nn.attention import PerceiverConfig, PerceiverResampler


class PerceiverProjector(Projector):
    """A :class:`~alm_kit.nn.attention.PerceiverResampler` over the fused stream: every clip gets
    exactly ``num_latents`` tokens, read from the frames at their own width."""

    @dataclass
    class Config(PerceiverConfig):
        pass

    def __init__(self, config: Config, stream: StreamInfo, output_dim: int) -> None:
        super().__init__(config, stream, output_dim)
        self.resampler = PerceiverResampler(config, stream.frame_dim, output_dim)

    def forward(self, audio: AudioFeatures, prompt: PromptContext | None = None) -> AudioTokens:
        tokens = self.resampler(audio.frames, audio.mask)
        return AudioTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
