"""Start training from another run's weights (``training.init_from``), e.g. a projector pre-aligned by
``training.objective: align`` and then instruction-tuned by a recipe that extends the alignment one.

Unlike resuming, only weights are taken (no optimizer, schedule or data position), and only
those of the named components (``training.init_components``; all that the checkpoint holds by default).
"""

from __future__ import annotations

from pathlib import Path

from alm_kit.checkpoint import WEIGHTS, resolve_checkpoint
from alm_kit.errors import CheckpointError
from alm_kit.model import AudioLanguageModel


def init_from_checkpoint(model: AudioLanguageModel, directory: str | Path,
                         components: list[str] | None = None) -> list[str]:
    """Copy the checkpoint's tensors of ``components`` into ``model``; return the names copied.

    ``directory`` is a checkpoint or a run folder (then its latest checkpoint)."""
    from safetensors.torch import load_file

    directory = resolve_checkpoint(directory)  # a checkpoint, or a run folder (its latest checkpoint)
    if not (directory / WEIGHTS).exists():
        raise CheckpointError(f"training.init_from: {directory} is not an alm-kit checkpoint ({WEIGHTS} is missing)")
    state = load_file(str(directory / WEIGHTS))
    known = list(model.components())
    prefixes = known if components is None else components
    unknown = [c for c in prefixes if c not in known]
    if unknown:
        raise CheckpointError(f"training.init_components: unknown component(s) {', '.join(unknown)}; "
                              f"this model has: {', '.join(known)}")
    own = model.state_dict()
    picked = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in prefixes)}
    if components is not None:
        empty = [c for c in components if not any(k.startswith(c + ".") for k in picked)]
        if empty:
            raise CheckpointError(f"training.init_from: {directory} holds no weights of {', '.join(empty)}")
    unexpected = sorted(k for k in picked if k not in own)
    shapes = sorted(k for k in picked if k in own and picked[k].shape != own[k].shape)
    if unexpected or shapes:
        raise CheckpointError(
            f"training.init_from: {directory} does not fit this model: "
            + "; ".join(part for part in (
                f"unknown tensors {unexpected[:5]}" if unexpected else "",
                "other shapes for " + ", ".join(f"{k} {tuple(picked[k].shape)} vs {tuple(own[k].shape)}"
                                                for k in shapes[:5]) if shapes else "") if part))
    model.load_state_dict(picked, strict=False)
    return sorted(picked)
