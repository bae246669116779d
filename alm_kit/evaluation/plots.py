"""Bar charts of an accuracy table: one PNG per grouping (needs matplotlib: ``pip install 'alm-kit[plot]'``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alm_kit.errors import AlmKitError
from alm_kit.evaluation.scoring import group_fields


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlmKitError("--plot needs matplotlib: pip install 'alm-kit[plot]'") from None
    return plt


def plot_table(table: dict[str, Any], out_dir: str | Path, title: str = "") -> list[Path]:
    """``out_dir/<grouping>.png`` for every grouping: accuracy per value, the overall accuracy as a line."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overall = 100 * table["overall"]["accuracy"]
    written = []
    for name in group_fields(table):
        rows = table[name]
        labels = list(rows)
        values = [100 * rows[v]["accuracy"] for v in labels]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(labels)))
        bars = ax.barh(range(len(labels)), values, color="#4c72b0")
        ax.set_yticks(range(len(labels)), [f"{v} (n={rows[v]['total']})" for v in labels], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(overall, color="#c44e52", linestyle="--", linewidth=1, label=f"overall {overall:.1f}%")
        for bar, value in zip(bars, values):
            ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, f"{value:.1f}", va="center", fontsize=7)
        ax.set_xlim(0, 105)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"{title}\nby {name}" if title else f"accuracy by {name}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
