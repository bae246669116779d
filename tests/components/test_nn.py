"""Shared building blocks in alm_kit.nn: masked normalisation over time."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import alm_kit.nn.norm
from alm_kit.nn.masks import lengths_to_mask
from alm_kit.nn.norm import MaskedGroupNorm, masked_group_norm
from tests.conftest import assert_differs


@pytest.mark.parametrize("num_groups", [1, 2, 8])
def test_masked_group_norm_equals_group_norm_without_padding(num_groups):
    norm = MaskedGroupNorm(num_groups, 8)
    plain = nn.GroupNorm(num_groups, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    plain.load_state_dict(norm.state_dict())  # same parameters as nn.GroupNorm
    x = torch.randn(3, 8, 20) * 3 + 1
    torch.testing.assert_close(norm(x), plain(x))
    torch.testing.assert_close(norm(x, torch.ones(3, 20, dtype=torch.bool)), plain(x))


@pytest.mark.parametrize("shape", [(3, 8, 30), (3, 8, 30, 5)])
def test_valid_frames_do_not_depend_on_padding(shape):
    """A clip alone equals the clip in a padded batch; padding comes out as zeros."""
    norm = MaskedGroupNorm(4, 8)
    with torch.no_grad():
        norm.bias.uniform_(-1, 1)
    lengths = torch.tensor([30, 12, 1])
    mask = lengths_to_mask(lengths, 30)
    padded = (~mask).reshape(3, 1, 30, *[1] * (len(shape) - 3)).expand(shape)  # T is dim 2
    x = torch.randn(shape)
    noisy = torch.where(padded, 100 * torch.randn(shape), x)  # loud garbage in the padded frames
    a, b = norm(x, mask), norm(noisy, mask)
    torch.testing.assert_close(a, b)
    assert torch.all(a[padded] == 0)
    for i, n in enumerate(lengths.tolist()):
        alone = norm(x[i:i + 1, :, :n])
        torch.testing.assert_close(a[i:i + 1, :, :n], alone, rtol=1e-4, atol=1e-5)
    # the unmasked statistics do depend on the padding (the check above is not vacuous)
    assert_differs(nn.GroupNorm(4, 8)(noisy)[1, :, :12], a[1, :, :12])


def test_gradients_reach_only_valid_frames_and_bf16_keeps_its_dtype():
    x = torch.randn(2, 4, 10, requires_grad=True)
    mask = lengths_to_mask(torch.tensor([10, 6]))
    masked_group_norm(x, mask, 2).pow(2).sum().backward()
    assert torch.all(x.grad[1, :, 6:] == 0) and x.grad[1, :, :6].abs().sum() > 0
    assert masked_group_norm(x.detach().bfloat16(), mask, 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        masked_group_norm(x, mask, 3)


def test_docstring_examples_run():
    assert doctest.testmod(alm_kit.nn.norm, extraglobs={"torch": torch}).failed == 0
