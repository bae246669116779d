"""ALARM-CA: one stream is the query sequence; each other stream is read in turn by transformer decoder layers.

Each layer is ALARM's ``nn.TransformerDecoderLayer(norm_first=True)`` built from alm-kit's shared blocks:
self-attention over the query stream (its padding masked), cross-attention to the other stream (its
padding masked), feed-forward. ALARM runs it on the adapted streams (``chain`` after ``downsample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alm_kit.fusion.streams import leading_stream
from alm_kit.interfaces import AudioFeatures, Fusion, StreamInfo
from alm_kit.nn.attention import QueryLayer, masked_fill_padding, stochastic_depth


class CrossAttentionFusion(Fusion):
    """The query stream (Whisper in ALARM) keeps its length and mask; for every other stream, projected to
    the layer width, ``layers_per_stream`` pre-norm decoder layers read it. Pooled vectors are concatenated."""

    @dataclass
    class Config:
        #: index (recipe order) of the stream whose frames are the queries
        query_stream: int = 0
        #: width of the layers (null: the query stream's width; otherwise the queries are projected)
        hidden_dim: int | None = None
        num_heads: int = 8
        #: decoder layers per other stream (ALARM: 1)
        layers_per_stream: int = 1
        #: feed-forward width = ffn_ratio * width
        ffn_ratio: float = 4.0
        dropout: float = 0.1
        #: stochastic depth, rising linearly to this rate over the layers
        drop_path: float = 0.0

        def __post_init__(self) -> None:
            if self.num_heads < 1 or self.layers_per_stream < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
                raise ValueError("num_heads, layers_per_stream and hidden_dim must be >= 1")
            if self.ffn_ratio <= 0:
                raise ValueError("ffn_ratio must be > 0")

    def __init__(self, config: Config, streams: list[StreamInfo]) -> None:
        super().__init__(config, streams)
        query = leading_stream("cross_attention", streams, config.query_stream, "query_stream")
        h = config.hidden_dim or query.frame_dim
        if h % config.num_heads:
            raise ValueError(f"width {h} must be divisible by num_heads ({config.num_heads})")
        self.query_in = nn.Identity() if h == query.frame_dim else nn.Linear(query.frame_dim, h)
        self.others = [i for i in range(len(streams)) if i != config.query_stream]
        self.kv_in = nn.ModuleList(nn.Linear(streams[i].frame_dim, h) for i in self.others)
        n = config.layers_per_stream
        rates = stochastic_depth(config.drop_path, n * len(self.others))
        ffn = int(round(config.ffn_ratio * h))
        #: layers[j]: the decoder layers that read the j-th other stream
        self.layers = nn.ModuleList(
            nn.ModuleList(QueryLayer(h, config.num_heads, ffn, dropout=config.dropout, drop_path=r)
                          for r in rates[j * n:(j + 1) * n])
            for j in range(len(self.others)))
        self.norm = nn.LayerNorm(h)
        pooled = [s.pooled_dim for s in streams if s.pooled_dim is not None]
        self.info = StreamInfo(frame_dim=h, pooled_dim=sum(pooled) if pooled else None,
                               frame_rate=query.frame_rate, num_frames=query.num_frames)

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:
        query = features[self.config.query_stream]
        x = self.query_in(query.frames)
        for j, i in enumerate(self.others):
            kv = self.kv_in[j](features[i].frames)
            for layer in self.layers[j]:
                x = layer(x, kv, features[i].mask, query_mask=query.mask)
        frames = masked_fill_padding(self.norm(x), query.mask)
        pooled = [f.pooled for f in features if f.pooled is not None]
        return AudioFeatures(frames, query.mask, torch.cat(pooled, -1) if pooled else None)
