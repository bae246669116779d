"""The multiple-choice evaluation behind ``data.eval`` (after and during training).

The same reading, prompting and scoring as ``alm-kit eval`` (:mod:`alm_kit.evaluation.runner`),
without output files or the answer cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alm_kit.evaluation.formats import BenchItem, read_benchmark
from alm_kit.evaluation.prompts import mcq_prompt
from alm_kit.evaluation.scoring import format_table, string_match

__all__ = ["evaluate_file", "format_table", "mellow_prompt", "read_mcq", "string_match"]


def mellow_prompt(question: str, choices: list[str]) -> str:
    """Mellow's MCQ style: ``question a) x b) y c) z d) w``."""
    return mcq_prompt("mellow", question, choices)


def read_mcq(path: str | Path) -> list[BenchItem]:
    """The items of any supported benchmark file (format detected)."""
    return read_benchmark(path).items


def evaluate_file(model, path: str | Path, gen, *, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """``{"table", "predictions", "failed"}`` for a benchmark file (missing audio: failed items, not errors)."""
    from alm_kit.evaluation.runner import evaluate_benchmark

    result = evaluate_benchmark(model, gen, path, limit=limit, progress=progress)
    summary = result.summary()
    return {"table": result.table, "predictions": summary["predictions"], "failed": result.failed}
