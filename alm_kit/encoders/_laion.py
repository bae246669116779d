"""Import laion-clap's model code without laion_clap/__init__.py.

``import laion_clap`` runs ``laion_clap.hook``, which loads BERT/RoBERTa/BART
tokenizers from the hub at import time (minutes of retries offline) and puts
its folder on sys.path. The audio branch needs none of that, so alm-kit loads
``laion_clap/clap_module`` as a package of its own name and imports submodules
from it: the same files, no side effects.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from alm_kit.nn.precision import keep_fp32

_PACKAGE = "alm_kit._laion_clap_module"


def clap_module(submodule: str) -> types.ModuleType:
    """Return ``laion_clap.clap_module.<submodule>`` imported in isolation."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("laion_clap")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("this encoder needs laion-clap: pip install laion-clap")
        folder = Path(list(spec.submodule_search_locations)[0]) / "clap_module"
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{submodule}")


@contextmanager
def building_laion_modules() -> Iterator[None]:
    """Build laion's Swin modules without torch's ``torch.meshgrid`` indexing UserWarning.

    laion's ``WindowAttention.__init__`` calls ``torch.meshgrid`` without ``indexing=`` (its result is
    the same as with ``indexing="ij"``, the current default); torch warns about every such call. Only
    that warning, and only while laion's code builds, is silenced: a user's own meshgrid calls still warn.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
        yield


def skip_attention_maps(module) -> None:
    """Stop laion's Swin stages from keeping every block's attention map.

    When not training, laion's ``BasicLayer`` appends each block's attention map to a list,
    concatenates and averages them for visualisation (4 MiB per 10 s clip and block in the first
    stage); nothing in alm-kit reads them. ``BasicLayer.training`` only decides that; its blocks
    (dropout, drop-path) keep their own mode, so marking the stages as training changes no output.
    """
    for layer in module.modules():
        if type(layer).__name__ == "BasicLayer" and type(layer).__module__.startswith(_PACKAGE):
            layer.training = True


def fix_front_end(module) -> None:
    """Make the STFT and mel filterbank of torchlibrosa (which laion's code uses) fp32 constants.

    torchlibrosa keeps its DFT kernels and mel matrix as parameters that it freezes itself; a
    component trained in ``full`` mode would unfreeze them, train its signal processing and leave an
    unsynchronised gradient for DDP. As buffers they keep their state-dict names (checkpoints load
    either way) and never train. They also stay fp32 (:func:`~alm_kit.nn.precision.keep_fp32`) when
    the model runs in bf16, and so does the BatchNorm over mel bins after them (``bn0``), which hands
    the normalised log-mel on in the model's dtype.
    """
    for outer in list(module.modules()):
        if not type(outer).__module__.startswith("torchlibrosa.stft"):
            continue
        for inner in outer.modules():
            for name, param in list(inner.named_parameters(recurse=False)):
                delattr(inner, name)
                inner.register_buffer(name, param.detach())
    if hasattr(module, "spectrogram_extractor"):
        keep_fp32(module.spectrogram_extractor)
    if hasattr(module, "logmel_extractor"):
        keep_fp32(module.logmel_extractor, output="model")
    if isinstance(getattr(module, "bn0", None), torch.nn.BatchNorm2d):  # normalises the log-mel: fp32 too
        keep_fp32(module.bn0, output="model")


class NoAttentionMaps:
    """Mixin for encoders built on laion's Swin code: :func:`skip_attention_maps` in every mode."""

    def train(self, mode: bool = True):
        super().train(mode)
        skip_attention_maps(self)
        return self
