"""ALARM-P compression: every non-main stream squeezed by a Perceiver to K latents, placed before the main stream.

Output per clip, with ``framing: together`` (ALARM's code: one learned pair around all latents)
``[start, latents_1 (K), ..., latents_n (K), end, main frames]``, or with ``framing: per_stream``
``[start_1, latents_1, end_1, start_2, ..., end_n, main frames]``. The start/end vectors are learned, at
the main stream's width. Each extra stream has its own Perceiver resampler (the ``perceiver`` projector's,
with the main stream's width as its output width). ALARM runs it on adapted streams (``chain`` after
``downsample``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from alm_kit.fusion.streams import leading_stream
from alm_kit.interfaces import AudioFeatures, Fusion, StreamInfo
from alm_kit.nn.attention import PerceiverConfig, PerceiverResampler


class PerceiverFusion(Fusion):
    """Compress extra streams to ``num_latents`` tokens each and put them (framed) before the main stream."""

    @dataclass
    class Config(PerceiverConfig):
        """The per-stream Perceiver's options (ALARM's defaults) plus which stream stays whole."""

        #: latents per extra stream (ALARM: 20)
        num_latents: int = 20
        hidden_dim: int = 512
        #: index (recipe order) of the stream kept at full length (Whisper in ALARM)
        main_stream: int = 0
        #: one start/end pair around all latents (ALARM), or one pair per extra stream
        framing: Literal["together", "per_stream"] = "together"

    def __init__(self, config: Config, streams: list[StreamInfo]) -> None:
        super().__init__(config, streams)
        main = leading_stream("perceiver", streams, config.main_stream, "main_stream")
        self.others = [i for i in range(len(streams)) if i != config.main_stream]
        self.resamplers = nn.ModuleList(PerceiverResampler(config, streams[i].frame_dim, main.frame_dim)
                                        for i in self.others)
        pairs = 1 if config.framing == "together" else len(self.others)
        #: (pairs, 2, width): learned start and end vectors framing the latents
        self.boundaries = nn.Parameter(torch.randn(pairs, 2, main.frame_dim) * 0.02)
        pooled = [s.pooled_dim for s in streams if s.pooled_dim is not None]
        self.prefix_length = len(self.others) * config.num_latents + 2 * pairs
        self.info = StreamInfo(
            frame_dim=main.frame_dim, pooled_dim=sum(pooled) if pooled else None, frame_rate=None,
            num_frames=None if main.num_frames is None else self.prefix_length + main.num_frames)

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:
        main = features[self.config.main_stream]
        clips = main.frames.shape[0]
        latents = [self.resamplers[j](features[i].frames, features[i].mask).to(main.frames.dtype)
                   for j, i in enumerate(self.others)]
        groups = [torch.cat(latents, 1)] if self.config.framing == "together" else latents
        parts = []
        for pair, group in zip(self.boundaries, groups):
            start, end = pair.to(main.frames.dtype)[:, None, None, :].expand(-1, clips, 1, -1).unbind(0)
            parts += [start, group, end]
        frames = torch.cat(parts + [main.frames], 1)
        prefix = torch.ones(clips, self.prefix_length, dtype=torch.bool, device=main.mask.device)
        pooled = [f.pooled for f in features if f.pooled is not None]
        return AudioFeatures(frames, torch.cat([prefix, main.mask], 1), torch.cat(pooled, -1) if pooled else None)
