"""Align temporal streams by adaptive average pooling and concatenate them on the feature axis."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alm_kit.interfaces import AudioFeatures, Fusion, StreamInfo
from alm_kit.nn.pooling import adaptive_pool


class ConcatFusion(Fusion):
    """TinyGiantALM's alignment: every stream pooled to ``length`` tokens, then joined."""

    @dataclass
    class Config:
        #: tokens per clip after pooling (None: the shortest stream's length)
        length: int | None = None
        #: frames only from time-aligned streams (frame_rate set); the others (a CLAP embedding: one
        #: frame) add only their pooled vector (TinyGiantALM: Whisper + HTS-AT frames, CLAP as the anchor)
        temporal_only: bool = False

    def __init__(self, config: Config, streams: list[StreamInfo]) -> None:
        super().__init__(config, streams)
        #: indices of the streams whose frames are joined
        self.framed = [i for i, s in enumerate(streams) if not config.temporal_only or s.frame_rate is not None]
        if not self.framed:
            raise ValueError("temporal_only: no encoder stream has a frame_rate (all are clip-level)")
        pooled = [s.pooled_dim for s in streams if s.pooled_dim is not None]
        lengths = [streams[i].num_frames for i in self.framed if streams[i].num_frames is not None]
        self.info = StreamInfo(
            frame_dim=sum(streams[i].frame_dim for i in self.framed),
            pooled_dim=sum(pooled) if pooled else None,
            num_frames=config.length or (min(lengths) if lengths else None),
        )

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:
        framed = [features[i] for i in self.framed]
        length = self.config.length or min(f.frames.shape[1] for f in framed)
        aligned = [adaptive_pool(f.frames, f.mask, length) for f in framed]
        frames = torch.cat([a[0] for a in aligned], -1)
        mask = torch.stack([a[1] for a in aligned], 0).any(0)
        pooled = [f.pooled for f in features if f.pooled is not None]
        return AudioFeatures(frames, mask, torch.cat(pooled, -1) if pooled else None)
