"""``compare.png``: accuracy against trainable parameters with error bars, training loss across seeds,
and held-out accuracy during training when the recipes set ``training.eval_every``.

Readable as published: every model keeps one colour in every panel; loss curves are smoothed, their
spread across seeds is a band and the raw curves stay faint behind; the chance level is drawn on
the accuracy axes; labels are moved apart until none overlaps another or a point.
Needs matplotlib (the ``plot`` extra); without it no file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from alm_kit.workflows.comparison import Comparison

#: offsets (points) tried for a label, nearest first: right, left, above, below, then the diagonals
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends (no padding pulls the ends toward zero)."""
    if window <= 1 or len(values) < 3:
        return np.asarray(values, dtype=float)
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def _aligned(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps every curve has, and the (curves, steps) values there."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    table = [dict(c) for c in curves]
    return np.array(steps), np.array([[t[s] for s in steps] for t in table], dtype=float)


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], colors: list,
                 bars: list[tuple[float, float]] | None = None) -> list:
    """Annotate each point with its label at the nearest offset where it overlaps no other label, point or
    error bar (``bars``: low, high in data units) and stays inside the axes; a label set away from its
    point gets a thin leader line."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    markers = []
    for (x, y), (low, high) in zip(points, bars or [(y, y) for _, y in points]):
        (px, py), (_, plow), (_, phigh) = ax.transData.transform([(x, y), (x, low), (x, high)])
        markers.append(Bbox.from_extents(px - 6, min(py - 6, plow - 2), px + 6, max(py + 6, phigh + 2)))
    frame = ax.get_window_extent(renderer)
    placed, texts = [], []
    for i in np.argsort([-y for _, y in points], kind="stable"):  # top first: the crowded bottom gets the rest
        candidates = [(dx * d, dy * d) for d in (6, 14, 24, 36, 50, 66) for dx, dy in _DIRECTIONS]
        for n, (x, y) in enumerate(candidates):
            text = ax.annotate(labels[i], points[i], xytext=(x, y), textcoords="offset points", fontsize=8,
                               color=colors[i], ha="left" if x > 0 else "right" if x < 0 else "center",
                               va="bottom" if y > 0 else "top" if y < 0 else "center",
                               arrowprops=None if max(abs(x), abs(y)) <= 6 else
                               {"arrowstyle": "-", "color": colors[i], "lw": 0.6, "alpha": 0.7})
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer).expanded(1.04, 1.2)  # the text, not its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside and not _overlaps(box, placed) and not _overlaps(box, markers)) or n == len(candidates) - 1:
                break  # nowhere free at all: the last try stands rather than no label
            text.remove()
        placed.append(box)
        texts.append(text)
    return texts


def _parameter_count(value: float, _position=None) -> str:
    return f"{value / 1e6:g}M" if abs(value) >= 1e5 else f"{value / 1e3:g}k" if abs(value) >= 1e3 else f"{value:g}"


def dodge(values: list[float], low: float, high: float, *, log: bool, gap: float = 0.025) -> list[float]:
    """``values`` moved apart to at least ``gap`` of the axis [low, high] (a run of close values is
    spread evenly around its centre), so that models of (nearly) the same size stand side by side."""
    forward, back = (np.log10, lambda v: 10**v) if log else (lambda v: v, lambda v: v)
    origin, width = forward(low), forward(high) - forward(low)
    where = (forward(np.asarray(values, dtype=float)) - origin) / width
    order = np.argsort(where, kind="stable")
    clusters = [[order[0]]]
    for i in order[1:]:
        if where[i] - where[clusters[-1][-1]] < gap:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    moved = where.copy()
    for cluster in clusters:
        centre = where[cluster].mean()
        for k, i in enumerate(cluster):
            moved[i] = centre + (k - (len(cluster) - 1) / 2) * gap
    return [float(back(origin + m * width)) for m in moved]


def _accuracy_panel(ax, comparison: Comparison, colors: list) -> tuple[list, list[str], list]:
    overall = comparison.columns[0]
    counts = [r.params_trainable for r in comparison.results]
    low, high = min(counts), max(counts)
    log = low > 0 and high / low > 10
    if log:
        ax.set_xscale("log")
        ax.set_xlim(low / 2, high * 2)
    else:
        margin = (high - low) * 0.35 or max(high * 0.1, 1)
        ax.set_xlim(low - margin, high + margin)
    xs = dodge(counts, *ax.get_xlim(), log=log)
    points, labels, bars = [], [], []
    for r, color, x in zip(comparison.results, colors, xs):
        i = comparison.cells[r.name][overall].interval
        y = 100 * i.mean
        bars.append((100 * i.low, 100 * i.high))
        ax.errorbar(x, y, yerr=[[y - 100 * i.low], [100 * i.high - y]], fmt="o", color=color,
                    capsize=4, markersize=6, elinewidth=1.4)
        points.append((x, y))
        labels.append(r.name)
    ax.axhline(100 * comparison.chance, color="0.4", linestyle="--", linewidth=1)
    ax.text(0.01, 100 * comparison.chance, " chance", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=8, color="0.3")
    ax.set_ylim(0, min(100, max(b for _, b in bars) * 1.15 + 5))
    seeds = comparison.seeds
    ax.set(xlabel="trainable parameters (models of nearly equal size set side by side)", ylabel="accuracy (%)",
           title=f"Accuracy vs. trainable parameters (95% CI, {seeds} seed{'s' * (seeds > 1)})")
    ax.xaxis.set_major_formatter(_parameter_count)
    ax.grid(True, alpha=0.3)
    return points, labels, bars


def _loss_panel(ax, comparison: Comparison, colors: list) -> None:
    everything = []
    for r, color in zip(comparison.results, colors):
        curves = [run.losses for run in r.runs if run.losses]
        if not curves:
            continue
        steps, values = _aligned(curves)
        if not len(steps):
            continue
        window = max(1, len(steps) // 25)
        for row in values:
            ax.plot(steps, row, color=color, alpha=0.12, linewidth=0.6)
        smoothed = np.array([smooth(row, window) for row in values])
        ax.plot(steps, smoothed.mean(0), color=color, linewidth=1.6, label=r.name)
        if len(values) > 1:
            ax.fill_between(steps, smoothed.min(0), smoothed.max(0), color=color, alpha=0.2, linewidth=0)
        everything.append(smoothed)
    ax.set(xlabel="optimizer step", ylabel="training loss",
           title="Training loss (smoothed; band: range over seeds; faint: raw)")
    if everything:
        ax.legend(fontsize=8)
        values = np.concatenate([e.ravel() for e in everything])
        if values.min() > 0 and values.max() / values.min() > 10:
            ax.set_yscale("log")
            ax.set_ylim(values.min() / 1.5, values.max() * 1.5)  # the smoothed curves; raw spikes may leave
            ax.yaxis.set_major_formatter(lambda value, _position: f"{value:g}")  # 0.5, not 5 x 10^-1
            ax.yaxis.set_minor_formatter(lambda value, _position: f"{value:g}" if f"{value:e}"[0] in "235" else "")
        else:
            pad = 0.1 * (values.max() - values.min()) or 0.1
            ax.set_ylim(values.min() - pad, values.max() + pad)
    ax.grid(True, alpha=0.3)


def _held_out_panel(ax, comparison: Comparison, colors: list) -> None:
    for r, color in zip(comparison.results, colors):
        curves = [run.eval_accuracy for run in r.runs if run.eval_accuracy]
        if not curves:
            continue
        steps, values = _aligned(curves)
        ax.plot(steps, 100 * values.mean(0), "o-", color=color, markersize=3, linewidth=1.4, label=r.name)
        if len(values) > 1:
            ax.fill_between(steps, 100 * values.min(0), 100 * values.max(0), color=color, alpha=0.2, linewidth=0)
    ax.axhline(100 * comparison.chance, color="0.4", linestyle="--", linewidth=1)
    ax.text(0.01, 100 * comparison.chance, " chance", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=8, color="0.3")
    ax.set(xlabel="optimizer step", ylabel="accuracy (%)", ylim=(0, 100),
           title="Held-out accuracy during training (band: range over seeds)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)


def plot_comparison(comparison: Comparison, path: Path) -> Path | None:
    """Write the PNG; None (and no file) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = any(run.eval_accuracy for r in comparison.results for run in r.runs)
    fig, axes = plt.subplots(1, 3 if held_out else 2, figsize=(18 if held_out else 13, 5))
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(comparison.results))]
    _loss_panel(axes[0], comparison, colors)
    if held_out:
        _held_out_panel(axes[1], comparison, colors)
    points, labels, bars = _accuracy_panel(axes[-1], comparison, colors)
    fig.tight_layout()
    fig.canvas.draw()  # the final layout and limits: labels are measured in it
    place_labels(axes[-1], points, labels, colors, bars)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
