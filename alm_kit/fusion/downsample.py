"""ALARM's per-encoder adapters: bring every stream to one token rate with strided convolutions, then join.

Per stream (ALARM's ``DownsamplerConformer`` without the Conformer, + its ``llm_proj``):
``Linear(D -> width) -> Conv1d(width -> e*width, k=3) + GELU + LayerNorm -> Conv1d(e*width -> width, k,
stride s) + GELU + LayerNorm -> Linear(width -> output_dim)`` with e = ``expansion`` (ALARM: 2; the first
Linear is skipped when D = width, as in ALARM). The stride is chosen from the stream's frame rate so that
every stream ends near ``target_rate`` tokens per second (ALARM: 25/s; Whisper's 50/s -> stride 2).
Padded frames are zeroed before each convolution, so padding never reaches a real output token; an
output token is valid when any input frame of its window is. The streams are then cut to the
shortest length and concatenated on the feature axis (or summed).

As a step of a ``chain`` (not the last one) the adapted streams are handed on unjoined
(``forward_streams``): ALARM's adapters in front of cross-attention or Perceiver compression.
``adapt`` leaves chosen streams as they are (ALARM-P adapts only Whisper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alm_kit.interfaces import AudioFeatures, Fusion, StreamInfo
from alm_kit.nn.attention import masked_fill_padding


def stride_for(stream: StreamInfo, target_rate: float) -> int:
    """Frames per output token: ``round(frame_rate / target_rate)``, at least 1."""
    if stream.frame_rate is None:
        raise ValueError("downsample fusion needs time-aligned streams (an encoder stream has no frame_rate); "
                         "set 'strides' explicitly")
    return max(1, int(round(stream.frame_rate / target_rate)))


class ConvAdapter(nn.Module):
    """One stream's adapter (B, T, D) -> (B, ceil(T / stride), output_dim), mask-aware."""

    def __init__(self, input_dim: int, width: int, output_dim: int, stride: int, kernel_size: int = 4,
                 dropout: float = 0.0, expansion: int = 2) -> None:
        super().__init__()
        self.stride = stride
        #: a window never skips frames: the kernel covers at least one stride
        self.kernel = max(kernel_size, stride)
        self.left = max(0, (self.kernel - stride) // 2)
        self.inp = nn.Identity() if input_dim == width else nn.Linear(input_dim, width)
        self.conv = nn.Conv1d(width, expansion * width, 3, padding=1)
        self.norm = nn.LayerNorm(expansion * width)
        self.down = nn.Conv1d(expansion * width, width, self.kernel, stride=stride)
        self.down_norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, output_dim)

    def out_length(self, frames: int) -> int:
        return -(-frames // self.stride)

    def _pad(self, x: Tensor, length: int) -> Tensor:
        """Pad (B, C, T) on the time axis so that the strided conv gives ``length`` outputs."""
        right = max(0, (length - 1) * self.stride + self.kernel - x.shape[-1] - self.left)
        return F.pad(x, (self.left, right))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        length = self.out_length(x.shape[1])
        h = masked_fill_padding(self.inp(x), mask)
        h = self.norm(F.gelu(self.conv(h.transpose(1, 2)).transpose(1, 2)))
        h = masked_fill_padding(h, mask).transpose(1, 2)
        h = self.down(self._pad(h, length))[..., :length].transpose(1, 2)
        h = self.down_norm(F.gelu(h))
        valid = F.max_pool1d(self._pad(mask[:, None].to(x.dtype), length), self.kernel, self.stride)
        valid = valid[:, 0, :length] > 0
        return masked_fill_padding(self.out(self.drop(h)), valid), valid


class DownsampleFusion(Fusion):
    """ALARM's adapters: every stream to ``target_rate`` tokens/s, then concatenated (or summed)."""

    @dataclass
    class Config:
        #: tokens per second of audio after the adapters (ALARM: 25)
        target_rate: float = 25.0
        #: adapter width (ALARM: the LLM width)
        width: int = 1024
        #: each adapter's output width (null: width)
        output_dim: int | None = None
        #: strided convolution kernel (widened to the stride when the stride is larger)
        kernel_size: int = 4
        #: channels of the k=3 convolution = expansion * width (ALARM: 2)
        expansion: int = 2
        #: frames per token for each stream (null: round(frame_rate / target_rate))
        strides: list[int] | None = None
        #: which streams get an adapter (null: all); the others pass through unchanged (ALARM-P: only Whisper's)
        adapt: list[bool] | None = None
        #: join the adapted streams on the feature axis, or add them
        combine: Literal["concat", "sum"] = "concat"
        dropout: float = 0.0

        def __post_init__(self) -> None:
            if self.target_rate <= 0:
                raise ValueError("target_rate must be > 0")
            if (self.width < 1 or (self.output_dim is not None and self.output_dim < 1) or self.kernel_size < 1
                    or self.expansion < 1):
                raise ValueError("width, output_dim, kernel_size and expansion must be >= 1")
            if self.adapt is not None and not any(self.adapt):
                raise ValueError("adapt must choose at least one stream")
            if self.strides is not None and any(s < 1 for s in self.strides):
                raise ValueError("strides must be >= 1")

    def __init__(self, config: Config, streams: list[StreamInfo]) -> None:
        super().__init__(config, streams)
        for key in ("strides", "adapt"):
            given = getattr(config, key)
            if given is not None and len(given) != len(streams):
                raise ValueError(f"{key} has {len(given)} entries for {len(streams)} encoder streams")
        adapt = config.adapt or [True] * len(streams)
        strides = config.strides or [stride_for(s, config.target_rate) if a else 1 for s, a in zip(streams, adapt)]
        out_dim = config.output_dim or config.width
        #: adapters by stream index ("0", "1", ...); streams without one pass through
        self.adapters = nn.ModuleDict({
            str(i): ConvAdapter(s.frame_dim, config.width, out_dim, stride, config.kernel_size, config.dropout,
                                config.expansion)
            for i, (s, stride, a) in enumerate(zip(streams, strides, adapt)) if a
        })
        #: each stream after its adapter (what a chain's next step receives)
        self.stream_infos = [self._adapted(i, s, out_dim) for i, s in enumerate(streams)]
        widths = {s.frame_dim for s in self.stream_infos}
        if config.combine == "sum" and len(widths) > 1:
            raise ValueError(f"combine: sum needs streams of one width; these have {sorted(widths)} "
                             "(streams without an adapter keep their width)")
        pooled = [s.pooled_dim for s in streams if s.pooled_dim is not None]
        lengths = [s.num_frames for s in self.stream_infos if s.num_frames is not None]
        self.info = StreamInfo(
            frame_dim=sum(s.frame_dim for s in self.stream_infos) if config.combine == "concat" else out_dim,
            pooled_dim=sum(pooled) if pooled else None,
            frame_rate=config.target_rate,
            num_frames=min(lengths) if len(lengths) == len(streams) else None,
        )

    def adapter_for(self, index: int) -> ConvAdapter | None:
        return self.adapters[str(index)] if str(index) in self.adapters else None

    def _adapted(self, index: int, stream: StreamInfo, out_dim: int) -> StreamInfo:
        adapter = self.adapter_for(index)
        if adapter is None:
            return stream
        return StreamInfo(frame_dim=out_dim, pooled_dim=stream.pooled_dim,
                          frame_rate=None if stream.frame_rate is None else stream.frame_rate / adapter.stride,
                          num_frames=None if stream.num_frames is None else adapter.out_length(stream.num_frames))

    @property
    def strides(self) -> list[int | None]:
        """Frames per output token of each stream (None: no adapter)."""
        return [None if (a := self.adapter_for(i)) is None else a.stride for i in range(len(self.streams))]

    def forward_streams(self, features: list[AudioFeatures]) -> list[AudioFeatures]:
        """Every stream through its adapter, not joined (pooled vectors pass through)."""
        adapters = [self.adapter_for(i) for i in range(len(features))]
        return [f if a is None else AudioFeatures(*a(f.frames, f.mask), f.pooled) for a, f in zip(adapters, features)]

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:
        adapted = self.forward_streams(features)
        length = min(a.frames.shape[1] for a in adapted)
        frames = [a.frames[:, :length] for a in adapted]
        mask = torch.stack([a.mask[:, :length] for a in adapted], 0).any(0)
        joined = torch.cat(frames, -1) if self.config.combine == "concat" else torch.stack(frames, 0).sum(0)
        pooled = [f.pooled for f in features if f.pooled is not None]
        return AudioFeatures(joined, mask, torch.cat(pooled, -1) if pooled else None)
