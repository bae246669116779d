"""Where a model runs and in what precision: one choice for the training and the inference engine.

``precision`` (a recipe's ``training.precision``) names the compute precision: ``auto`` is bf16
autocast on CUDA and fp32 elsewhere; ``bf16`` asks for bf16 autocast on any device; ``fp32`` for
none.
"""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; a bare ``cuda`` is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context for ``precision`` on ``device`` (disabled for fp32)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
