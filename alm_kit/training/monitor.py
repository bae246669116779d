"""Watching a run: ``metrics.jsonl`` in the run folder, TensorBoard when installed, ``alm-kit plot``.

``metrics.jsonl`` holds one JSON object per line: training records
(``{"step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s"}``) every optimizer step and
evaluation records (``{"step", "eval_loss"?, "eval_accuracy"?}``) every ``training.eval_every``
steps. A resumed run drops the records after the step it resumes from and appends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alm_kit.errors import AlmKitError

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise AlmKitError(f"{path} not found: is {run_dir} a training run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter when the ``tensorboard`` package is installed, else None."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


class RunLog:
    """Appends metric records; on rank 0 only (other ranks get ``enabled=False``)."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = run_dir / METRICS
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # records of steps after the checkpoint were never part of the resumed run
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
        self.file = path.open("a")
        if tensorboard:
            self.writer = tensorboard_writer(run_dir / "tensorboard")

    def write(self, record: dict[str, Any], *, flush: bool = False) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if flush:
            self.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("eval_", "eval/"), value, record["step"])

    def flush(self) -> None:
        """To disk: the engine flushes at every sync point (every ``log_every`` steps and before each
        checkpoint), so a killed run's metrics reach at least its last checkpoint."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """A PNG of the training loss (and held-out loss / accuracy, when recorded) against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlmKitError("alm-kit plot needs matplotlib: pip install 'alm-kit[plot]'") from None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    if not train:
        raise AlmKitError(f"{Path(run_dir) / METRICS} has no training records yet")
    evals = [r for r in records if "eval_loss" in r]
    accuracy = [r for r in records if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(11 if accuracy else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set(xlabel="step", ylabel="loss", title=Path(run_dir).name)
    ax.legend()
    if accuracy:
        ax = axes[0][1]
        ax.plot([r["step"] for r in accuracy], [r["eval_accuracy"] for r in accuracy], "o-", color="C2")
        ax.set(xlabel="step", ylabel="multiple-choice accuracy", ylim=(0, 1), title="evaluation")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
