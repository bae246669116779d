"""What resuming a run needs: its checkpoints folder (``checkpoints/step-N``, the ``latest`` pointer,
keep-last-K) and the state of every RNG a step draws from.

A checkpoint is complete before ``latest`` names it (alm_kit.checkpoint writes it under a
temporary name and renames it; ``latest`` is itself replaced by a rename), so a crash at any
moment leaves ``latest`` pointing at a whole checkpoint. Old ones are pruned only after that.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alm_kit.checkpoint import CHECKPOINTS, LATEST, resolve_checkpoint, write_latest

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants tuples; a round trip through a checkpoint may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RunCheckpoints:
    """The ``checkpoints`` folder of one run."""

    def __init__(self, run_dir: str | Path, keep: int | None) -> None:
        self.dir = Path(run_dir) / CHECKPOINTS
        self.keep = keep

    def steps(self) -> list[Path]:
        """Complete step-N checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        return resolve_checkpoint(self.dir) if (self.dir / LATEST).exists() else None

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def mark_latest(self, checkpoint: Path) -> None:
        write_latest(self.dir, checkpoint.name)
        self.prune(checkpoint)

    def prune(self, latest: Path) -> None:
        if not self.keep:
            return
        steps = self.steps()
        for old in [p for p in steps if p != latest][: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        """Start again: drop every checkpoint of an earlier run (``alm-kit train --overwrite``)."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
