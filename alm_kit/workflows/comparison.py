"""What ``alm-kit compare`` measures and the statistics its table shows: per model, one run per seed
(:class:`SeedRun`), and per accuracy column a bootstrap interval and a paired test against the best
model (:class:`Comparison`). ``compare.py`` fills these; ``compare_plot.py`` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alm_kit.evaluation.statistics import ALPHA, Interval, bootstrap_interval, paired_bootstrap_p

GROUP_KEYS = ("task", "category", "sub-category", "difficulty")


@dataclass
class SeedRun:
    """One trained (or loaded) model of a compared entry: one training seed."""

    seed: int | None
    checkpoint: Path
    #: per scored test item, in file order
    correct: list[bool]
    samples_per_s: float | None = None
    #: MiB; what was measured is in ``memory_kind`` ("cuda allocated" / "process RSS")
    peak_memory_mib: float | None = None
    memory_kind: str | None = None
    #: (step, loss) of every training step
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: (step, accuracy) of the periodic evaluations (training.eval_every)
    eval_accuracy: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompareResult:
    """One compared model: its size and one run per seed."""

    name: str
    source: str
    params_trainable: int
    params_total: int
    audio_tokens_per_clip: float
    runs: list[SeedRun]

    def correct(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(seeds, items) 0/1 matrix, the items restricted to ``mask``."""
        matrix = np.array([run.correct for run in self.runs], dtype=float)
        return matrix if mask is None else matrix[:, mask]

    def mean_of(self, name: str) -> float | None:
        """Mean over the seeds that measured ``name`` (samples_per_s, peak_memory_mib)."""
        values = [getattr(run, name) for run in self.runs if getattr(run, name) is not None]
        return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Column:
    """An accuracy column: all items, or the items of one group (``key`` = ``name``)."""

    key: str | None
    name: str
    mask: np.ndarray = field(compare=False, repr=False)

    @property
    def csv_name(self) -> str:
        return "accuracy" if self.key is None else f"accuracy[{self.key}={self.name}]"


@dataclass
class Cell:
    """A model's accuracy in one column: mean, interval and its difference from the column's best."""

    interval: Interval
    best: bool
    #: paired bootstrap p-value against the column's best model (None for the best itself)
    p_vs_best: float | None

    @property
    def significant(self) -> bool:
        return self.p_vs_best is not None and self.p_vs_best < ALPHA


@dataclass
class Comparison:
    """Every compared model on one test file, with the statistics the table shows."""

    results: list[CompareResult]
    #: grouping fields (task, sub-category, ...) of every scored item
    item_groups: list[dict[str, str]]
    #: expected accuracy of uniform guessing: mean of 1 / number of choices
    chance: float
    eval_file: Path | None = None
    columns: list[Column] = field(init=False)
    #: model name -> column -> cell
    cells: dict[str, dict[Column, Cell]] = field(init=False)

    def __post_init__(self) -> None:
        self.columns = group_columns(self.item_groups)
        self.cells = {r.name: {} for r in self.results}
        for column in self.columns:
            matrices = {r.name: r.correct(column.mask) for r in self.results}
            intervals = {name: bootstrap_interval(m) for name, m in matrices.items()}
            best = max(intervals, key=lambda name: intervals[name].mean)
            tied = len({i.mean for i in intervals.values()}) == 1
            for name, matrix in matrices.items():
                p = None if name == best else paired_bootstrap_p(matrices[best], matrix)
                self.cells[name][column] = Cell(intervals[name], best=name == best and not tied, p_vs_best=p)

    @property
    def seeds(self) -> int:
        return max(len(r.runs) for r in self.results)


def group_columns(item_groups: list[dict[str, str]]) -> list[Column]:
    """The overall column, then one per group of each grouping field, in order of first appearance.

    A field with one group only adds nothing to the overall column, and a field that splits the
    items exactly as an earlier one does (the synthetic set's category and sub-category) is left out.
    """
    columns = [Column(None, "overall", np.ones(len(item_groups), dtype=bool))]
    partitions: list[list[str | None]] = []
    for key in GROUP_KEYS:
        values = [g.get(key) for g in item_groups]
        names = list(dict.fromkeys(v for v in values if v is not None))
        relabel = [{v: i for i, v in enumerate(dict.fromkeys(values))}[v] for v in values]
        if len(names) < 2 or relabel in partitions:
            continue
        partitions.append(relabel)
        columns += [Column(key, name, np.array([v == name for v in values])) for name in names]
    return columns
