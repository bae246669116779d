"""Parts of a model that must compute in fp32 whatever the rest runs in (mel filterbanks, STFTs,
normalisation layers that compute in fp32 by design).

A model loaded for inference in bf16 or fp16 (``generation.dtype``) has its weights cast by
:func:`alm_kit.runtime.cast_weights`; a module marked with :func:`keep_fp32` keeps fp32 weights and
runs on fp32 inputs outside autocast. What it hands on is chosen by ``output``: fp32, the dtype the
rest of the model was cast to (``"model"``: a front end feeding a bf16 body), or the dtype its input
came in (``"input"``). Plugin encoders use it the same way the built-in ones do::

    keep_fp32(self.frontend, output="model")
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from torch import nn

Output = Literal["fp32", "model", "input"]


class FP32Module:
    """Mixin of modules marked by :func:`keep_fp32` (see there)."""

    _fp32_output: Output = "fp32"
    #: the dtype the model around it was cast to (set by alm_kit.runtime.cast_weights)
    _model_dtype: torch.dtype = torch.float32

    def forward(self, *args, **kwargs):
        low = next((t.dtype for t in (*self.parameters(), *self.buffers())
                    if t.is_floating_point() and t.dtype != torch.float32), None)
        if low is not None:  # the model was cast as a whole (model.to(torch.bfloat16)): back to fp32
            self._model_dtype = low
            self.float()
        came_in = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), torch.float32)
        args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device, enabled=False):
            out = super().forward(*args, **kwargs)
        wanted = {"fp32": torch.float32, "model": self._model_dtype, "input": came_in}[self._fp32_output]
        return out.to(wanted)


@cache
def _fp32_class(cls: type) -> type:
    return type(f"FP32{cls.__name__}", (FP32Module, cls), {"__module__": cls.__module__})


def keep_fp32(module: nn.Module, output: Output = "fp32") -> nn.Module:
    """Mark ``module`` (in place) to keep fp32 weights and compute in fp32; ``output`` is the dtype it
    hands on (see the module docstring). Its parameters and state-dict names do not change."""
    if not isinstance(module, FP32Module):
        module.__class__ = _fp32_class(type(module))
    module._fp32_output = output
    return module


def is_fp32(module: nn.Module) -> bool:
    return isinstance(module, FP32Module)


def set_model_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Record the dtype the model around a :func:`keep_fp32` module was cast to, and keep it fp32."""
    module._model_dtype = dtype
    module.float()
