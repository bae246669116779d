"""Normalisation over time that ignores padded frames.

``nn.GroupNorm`` on conv features (B, C, T) averages over time, so the padding of a short clip
shifts the statistics and the valid frames change with the batch they are in. wav2vec 2.0's
feature encoder normalises its first conv layer exactly that way (``GroupNorm(512, 512)``, an
instance norm over time). :class:`MaskedGroupNorm` computes the statistics over the valid
frames only: a clip alone and the same clip in a padded batch give the same valid frames.
Masks follow :mod:`alm_kit.interfaces`: True marks a real frame.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_group_norm(x: Tensor, mask: Tensor | None, num_groups: int, weight: Tensor | None = None,
                      bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` over the valid frames of ``x``; padded frames come out as zeros.

    Args:
        x: (B, C, T, *rest) features in conv layout (``rest``: e.g. the mel axis of a 2-d conv).
        mask: (B, T) bool, True where a frame is real audio; None: every frame is real.
        num_groups: channels are split into this many groups; each group of each clip is
            normalised over its channels, its valid frames and ``rest``. ``num_groups == C`` is an
            instance norm over time (wav2vec 2.0), ``1`` a layer norm over channels and time.
        weight, bias: (C,) per-channel affine, or None.
        eps: added to the variance.

    Returns:
        A tensor shaped like ``x``.

    Example:
        >>> x = torch.randn(2, 8, 50)
        >>> mask = torch.arange(50) < torch.tensor([[50], [20]])  # clip 1 has 20 real frames
        >>> y = masked_group_norm(x, mask, num_groups=8)
        >>> torch.allclose(y[1:, :, :20], masked_group_norm(x[1:, :, :20], None, 8), atol=1e-5)
        True
    """
    b, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"{c} channels cannot be split into {num_groups} groups")
    if mask is None:
        mask = torch.ones(b, x.shape[2], dtype=torch.bool, device=x.device)
    groups = x.reshape(b, num_groups, -1, *x.shape[2:]).float()  # (B, G, C/G, T, *rest)
    keep = mask.reshape(b, 1, 1, mask.shape[1], *([1] * (x.dim() - 3))).to(groups.dtype)
    dims = tuple(range(2, groups.dim()))
    count = (keep.expand_as(groups)).sum(dims, keepdim=True).clamp_min(1.0)
    mean = (groups * keep).sum(dims, keepdim=True) / count
    var = ((groups - mean) ** 2 * keep).sum(dims, keepdim=True) / count  # biased, as nn.GroupNorm
    out = ((groups - mean) * torch.rsqrt(var + eps) * keep).reshape(x.shape).to(x.dtype)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape) * keep.reshape(b, 1, *keep.shape[3:]).to(out.dtype)
    return out


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics skip padded frames (same arguments and parameters, so a
    pretrained GroupNorm's ``weight``/``bias`` load into it).

    Call it as ``norm(x, mask)`` with ``x`` (B, C, T, *rest) and ``mask`` (B, T) bool (True = real
    frame); padded frames come out as zeros. See :func:`masked_group_norm`.

    Example:
        >>> norm = MaskedGroupNorm(num_groups=512, num_channels=512)  # wav2vec 2.0's first conv layer
        >>> y = norm(torch.randn(2, 512, 100), torch.arange(100) < torch.tensor([[100], [60]]))
        >>> y.shape, bool(y[1, :, 60:].eq(0).all())
        (torch.Size([2, 512, 100]), True)
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return masked_group_norm(x, mask, self.num_groups, self.weight, self.bias, self.eps)
