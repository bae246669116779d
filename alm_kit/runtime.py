"""Where a model runs and in what precision: one choice for the training and the inference engine.

``precision`` (a recipe's ``training.precision``) names the compute precision: ``auto`` is bf16
autocast on CUDA and fp32 elsewhere; ``bf16`` asks for bf16 autocast on any device; ``fp32`` for
none. Training keeps fp32 weights (AdamW needs them; autocast computes in bf16).

``dtype`` (``generation.dtype``, ``--dtype``, ``ALM.from_pretrained(dtype=)``) names the *weights* of a
model loaded for inference: ``auto`` is bf16 on CUDA and fp32 elsewhere. Low-precision weights
compute under autocast of their own dtype; fp32 weights under ``precision: auto``. Modules marked
:func:`~alm_kit.nn.precision.keep_fp32` (mel filterbanks, STFTs) stay fp32.
"""

from __future__ import annotations

import torch

from alm_kit.nn.precision import is_fp32, set_model_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype that ``name`` (auto | fp32 | bf16 | fp16) means on ``device``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``model``'s floating-point weights and buffers to ``dtype`` in place, leaving the modules
    marked :func:`~alm_kit.nn.precision.keep_fp32` in fp32."""
    model.to(dtype)
    for module in model.modules():
        if is_fp32(module):
            set_model_dtype(module, dtype)
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s floating-point parameters have."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def inference_autocast(model: torch.nn.Module, device: torch.device) -> torch.autocast:
    """Autocast for generation with ``model``: its own dtype for bf16/fp16 weights (what mixes dtypes
    computes in it), bf16 on CUDA for fp32 weights, none for fp32 weights elsewhere."""
    dtype = model_dtype(model)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return autocast(device, "auto")
