"""Pre-norm transformer blocks shared by the query-based projectors (Q-Former, Perceiver, E-Branchformer).

Masks follow :mod:`alm_kit.interfaces`: True marks a valid (real) position.
Every block is residual: ``x + DropPath(Dropout(sublayer(LayerNorm(x))))``.

A query row whose keys are *all* padding (a window of a padded clip that holds no
audio) gets a zero attention output instead of the NaN softmax would give, so such
rows stay finite and do not depend on the padded values.

timm is imported inside the constructors: importing it costs seconds, and this
module is imported by projector modules that only load when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AttentionStackConfig:
    """Options shared by every stack of query layers (Q-Former, Perceiver, fusion modules)."""

    #: width of the queries/latents and of every attention layer
    hidden_dim: int = 768
    num_layers: int = 2
    num_heads: int = 8
    #: feed-forward width = ffn_ratio * hidden_dim
    ffn_ratio: float = 4.0
    dropout: float = 0.1
    #: stochastic depth, rising linearly to this rate over the layers
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.ffn_ratio <= 0:
            raise ValueError("ffn_ratio must be > 0")


def drop_path_layer(rate: float) -> nn.Module:
    if rate <= 0.0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` with a True-is-valid key mask and safe all-padding rows."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True,
                                          kdim=kv_dim, vdim=kv_dim)

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return self.attn(q, kv, kv, need_weights=False)[0]
        has_keys = mask.any(-1)  # (B,)
        # rows without any valid key attend to everything, then their output is zeroed
        safe = mask | ~has_keys[:, None]
        out = self.attn(q, kv, kv, key_padding_mask=~safe, need_weights=False)[0]
        return out * has_keys[:, None, None].to(out.dtype)


class CrossAttentionBlock(nn.Module):
    """``q + Attn(LN(q), LN(kv))``: queries (B, Q, dim) attend to keys/values (B, T, kv_dim)."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = _Attention(dim, num_heads, kv_dim=None if kv_dim == dim else kv_dim, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path_layer(drop_path)

    def attend(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        """The attention output alone (B, Q, dim), without the residual; ``mask`` (B, T) True = valid key."""
        return self.drop(self.attn(self.norm_q(q), self.norm_kv(kv), mask))

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        return q + self.drop_path(self.attend(q, kv, mask))


class SelfAttentionBlock(nn.Module):
    """``x + Attn(LN(x))`` over a sequence (B, T, dim); ``mask`` (B, T) True = valid key."""

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path_layer(drop_path)

    def attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm(x)
        return self.drop(self.attn(h, h, mask))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return x + self.drop_path(self.attend(x, mask))


class FeedForwardBlock(nn.Module):
    """``x + MLP(LN(x))`` with timm's ``Mlp`` (Linear -> GELU -> Dropout -> Linear -> Dropout)."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        from timm.layers import Mlp

        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_dim, dim, act_layer=nn.GELU, drop=dropout)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))


class QueryLayer(nn.Module):
    """One layer of a learned-query resampler: self-attention over the queries, cross-attention
    to the audio (masked), feed-forward. ``cross_first`` puts the cross-attention first (Perceiver);
    otherwise self-attention comes first (Q-Former, and a pre-norm transformer decoder layer when
    the queries are a stream of their own: ALARM-CA, with ``query_mask``)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, kv_dim: int | None = None,
                 dropout: float = 0.0, drop_path: float = 0.0, cross_first: bool = False) -> None:
        super().__init__()
        self.cross_first = cross_first
        self.self_attn = SelfAttentionBlock(dim, num_heads, dropout=dropout, drop_path=drop_path)
        self.cross_attn = CrossAttentionBlock(dim, num_heads, kv_dim=kv_dim, dropout=dropout, drop_path=drop_path)
        self.ffn = FeedForwardBlock(dim, ffn_dim, dropout=dropout, drop_path=drop_path)

    def forward(self, queries: Tensor, kv: Tensor, mask: Tensor | None, query_mask: Tensor | None = None) -> Tensor:
        """``mask`` (B, T) marks valid keys of ``kv``; ``query_mask`` (B, Q) valid queries (None: all)."""
        if self.cross_first:
            queries = self.self_attn(self.cross_attn(queries, kv, mask), query_mask)
        else:
            queries = self.cross_attn(self.self_attn(queries, query_mask), kv, mask)
        return self.ffn(queries)


def masked_fill_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded positions of ``x`` (B, T, D) so that convolutions and sums cannot see them."""
    if mask is None:
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def stochastic_depth(rate: float, num: int) -> list[float]:
    """Linearly increasing drop-path rates for ``num`` layers (0 for the first)."""
    if num <= 1:
        return [0.0] * num
    return torch.linspace(0.0, rate, num).tolist()


@dataclass
class PerceiverConfig(AttentionStackConfig):
    """A Perceiver resampler: ``num_latents`` learned latents and the shared stack options."""

    num_latents: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_latents < 1:
            raise ValueError("num_latents must be >= 1")


class PerceiverResampler(nn.Module):
    """``num_latents`` learned latents; each layer: cross-attention latents -> frames (masked),
    self-attention over the latents, feed-forward. Keys/values are read from the frames at their
    own width ``kv_dim`` (no input projection); every clip gets exactly ``num_latents`` outputs of
    width ``output_dim``. Used by the ``perceiver`` projector and ALARM-P's ``perceiver`` fusion."""

    def __init__(self, config: PerceiverConfig, kv_dim: int, output_dim: int) -> None:
        super().__init__()
        h = config.hidden_dim
        self.latents = nn.Parameter(torch.randn(config.num_latents, h) * 0.02)
        rates = stochastic_depth(config.drop_path, config.num_layers)
        self.layers = nn.ModuleList(
            QueryLayer(h, config.num_heads, int(round(config.ffn_ratio * h)), kv_dim=kv_dim,
                       dropout=config.dropout, drop_path=rate, cross_first=True)
            for rate in rates
        )
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, output_dim)

    def forward(self, frames: Tensor, mask: Tensor | None) -> Tensor:
        """(clips, num_latents, output_dim) from ``frames`` (clips, T, kv_dim), ``mask`` True = valid frame."""
        x = self.latents.to(frames.dtype).expand(frames.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, frames, mask)
        return self.out(self.norm(x))
