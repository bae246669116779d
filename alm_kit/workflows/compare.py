"""``alm-kit compare``: train (or load) several models and score them on one multiple-choice test.

Each source is a recipe file (trained here ``seeds`` times, into ``OUT/runs/<name>/seed-<seed>``)
or an existing run folder / checkpoint (loaded as it is). Every model is evaluated on the same
MMAU-format file, and the results go to ``OUT/compare.md`` (also printed: mean and 95% interval
over test items and seeds, and which differences from the best are significant; the statistics
are in ``alm_kit/evaluation/statistics.py``), ``OUT/compare.csv`` (every per-seed figure),
``OUT/compare_summary.csv`` and ``OUT/compare.png`` (``compare_plot.py``; needs matplotlib).

Measured per model:

* parameters: trainable (``requires_grad`` under the recipe's train modes) and total;
* audio tokens per clip: valid projector outputs per clip, averaged over the first test items'
  clips (without the layouts' optional boundary vectors);
* training samples/s: the run's last ``samples_per_s`` in ``metrics.jsonl`` (training steps only:
  feature caching and evaluation excluded), per seed;
* peak memory during training (and the evaluation after it): on CUDA the peak allocated by torch,
  elsewhere the process's peak resident set (Linux ``VmHWM``, reset before each run; empty where
  it cannot be reset); empty for loaded runs;
* accuracy overall and per group of the test file (MMAU ``task``, ``sub-category``, ...), per seed
  and per item: the table's intervals and tests need every answer, not only the per-seed means.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alm_kit.errors import AlmKitError
from alm_kit.evaluation.statistics import ALPHA
from alm_kit.workflows.comparison import Cell, Column, CompareResult, Comparison, SeedRun


# --------------------------------------------------------------------------- measurements
def _rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: CUDA allocations on a CUDA device, else the process's resident set."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda allocated" if self.cuda else "process RSS"
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._valid = True
        else:
            self._valid = _rss_reset()
        return self

    def __exit__(self, *exc) -> None:
        if not self._valid:
            return
        self.mib = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _rss_peak_mib()


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def audio_tokens_per_clip(model, items, max_items: int = 8) -> float:
    """Mean number of valid audio tokens the projector gives a clip of the test set."""
    from alm_kit.inference.engine import Request, make_batch

    requests = [Request(audio=list(i.audio), prompt=i.question) for i in items[:max_items]]
    was_training = model.training
    model.eval()
    try:
        batch = make_batch(model, requests)
        text = model.layout.tokenize(batch.prompts)
        tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
    finally:
        model.train(was_training)
    return float(tokens.mask.sum(1).float().mean())


def _training_curve(run_dir: Path | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float | None]:
    """(step, loss) and (step, held-out accuracy) records and the last samples/s of a run's metrics.jsonl."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return [], [], None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r and "step" in r]
    speed = next((r["samples_per_s"] for r in reversed(train) if r.get("samples_per_s") is not None), None)
    evals = [(int(r["step"]), float(r["eval_accuracy"])) for r in records if "eval_accuracy" in r]
    return [(int(r["step"]), float(r["loss"])) for r in train], evals, speed


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/step-N or the older RUN/checkpoint)."""
    for candidate in (checkpoint.parent.parent, checkpoint.parent, checkpoint):
        if (candidate / "metrics.jsonl").exists():
            return candidate
    return None


def _seed_folders(source: Path) -> list[Path]:
    """The runs of one compared model: ``source`` itself, or its ``seed-N`` folders (compare's own layout)."""
    from alm_kit.checkpoint import WEIGHTS, resolve_checkpoint

    if (resolve_checkpoint(source) / WEIGHTS).exists():
        return [source]
    folders = sorted((p for p in source.glob("seed-*") if p.is_dir()), key=lambda p: (len(p.name), p.name))
    return folders or [source]  # not a checkpoint: load_checkpoint names what is missing


# --------------------------------------------------------------------------- one source
def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _chance(items) -> float:
    return sum(1 / len(i.choices) for i in items if i.choices) / max(len(items), 1)


def _train(recipe, name: str, seed: int, run_dir: Path, progress: bool):
    """Train one seed; the trainer scores ``data.eval`` (the shared test file) after training.

    Returns (model, checkpoint, evaluation, peak memory)."""
    from alm_kit.training.engine import Trainer

    trainer = Trainer(recipe, progress=progress, run_dir=run_dir)
    with PeakMemory(trainer.device) as memory:
        trained = trainer.fit()
    if getattr(trained, "interrupted", False):
        raise AlmKitError(f"compare: training {name} (seed {seed}) was interrupted (its checkpoint is in {run_dir}); "
                          "stopped before the remaining runs")
    return trainer.model, Path(trained.checkpoint), trained.evaluation, memory


def compare(sources: list[str | Path], eval_file: str | Path | None = None, *, steps: int | None = None,
            seeds: int = 1, out_dir: str | Path = "runs/compare", overrides: list[str] = (),
            limit: int | None = None, progress: bool = True, plot: bool = True) -> Comparison:
    """Train or load every source, evaluate each on ``eval_file``, write the table, CSVs and plot to ``out_dir``.

    A recipe is trained ``seeds`` times, with ``training.seed`` = its seed, its seed + 1, ...,
    into ``OUT/runs/<name>/seed-<seed>``. A run folder (or checkpoint) is used as it is; a folder of
    ``seed-N`` runs (compare's own ``OUT/runs/<name>``) counts as one model with those seeds.
    ``eval_file`` defaults to the first recipe's ``data.eval``; ``steps`` and ``overrides``
    (``key.path=value``) apply to every recipe.
    """
    from alm_kit.checkpoint import load_checkpoint, resolve_checkpoint
    from alm_kit.config.loader import load_recipe
    from alm_kit.evaluation.formats import read_benchmark
    from alm_kit.evaluation.runner import evaluate_file

    if not sources:
        raise AlmKitError("compare: name at least one recipe or run folder")
    if seeds < 1:
        raise AlmKitError(f"compare: --seeds must be at least 1, got {seeds}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = list(overrides) + ([f"training.max_steps={steps}"] if steps else [])
    results: list[CompareResult] = []
    taken: set[str] = set()
    items = None
    for source in map(Path, sources):
        if not source.exists():
            raise AlmKitError(f"compare: {source} not found (give recipe files or run folders / checkpoints)")
        name = None
        if source.is_file():
            recipe = load_recipe(source, extra)
            eval_file = eval_file or recipe.data.eval
            if eval_file is None:
                raise AlmKitError(f"compare: {source} has no data.eval: pass --eval TEST_FILE (MMAU format)")
            name = _unique_name(recipe.name, taken)
            if (out_dir / "runs" / name).exists():
                shutil.rmtree(out_dir / "runs" / name)  # compare owns OUT/runs: every call trains afresh
            plan = [(recipe.training.seed + k, None) for k in range(seeds)]
        else:
            plan = [(None, folder) for folder in _seed_folders(source)]
        runs: list[SeedRun] = []
        sizes = None
        for seed, folder in plan:
            if folder is None:  # with eval_every, the trainer also scores the test file during training
                recipe = load_recipe(source, extra + [
                    f"training.seed={seed}", f"data.eval={json.dumps(str(Path(eval_file).resolve()))}",
                    f"data.max_eval_examples={limit or 'null'}"])
                run_dir = out_dir / "runs" / name / f"seed-{seed}"
                model, checkpoint, evaluation, memory = _train(recipe, name, seed, run_dir, progress)
            else:
                checkpoint = resolve_checkpoint(folder)
                model, recipe = load_checkpoint(checkpoint)
                name = name or _unique_name(recipe.name, taken)
                seed, memory, evaluation = recipe.training.seed, None, None
                run_dir = out_dir / "runs" / name / (f"seed-{seed}" if len(plan) > 1 else "")
            if eval_file is None:
                raise AlmKitError("compare: no test file: pass --eval TEST_FILE (MMAU format)")
            if items is None:
                items = read_benchmark(eval_file).items
            if evaluation is None:
                evaluation = evaluate_file(model, eval_file, recipe.generation, limit=limit, progress=progress)
            if sizes is None:  # every seed has the same architecture
                sizes = (*parameter_counts(model), audio_tokens_per_clip(model, items))
            losses, evals, speed = _training_curve(_run_dir_of(checkpoint))
            runs.append(SeedRun(
                seed=seed, checkpoint=checkpoint, correct=[bool(p["correct"]) for p in evaluation["predictions"]],
                samples_per_s=speed, peak_memory_mib=memory.mib if memory else None,
                memory_kind=memory.kind if memory else None, losses=losses, eval_accuracy=evals))
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "compare_eval.json").write_text(json.dumps(evaluation, indent=2))
            del model  # the next run's peak memory must not include this model
            gc.collect()
        results.append(CompareResult(name=name, source=str(source), params_trainable=sizes[0],
                                     params_total=sizes[1], audio_tokens_per_clip=sizes[2], runs=runs))
    scored = items[: len(results[0].runs[0].correct)]
    if any(len(run.correct) != len(scored) for r in results for run in r.runs):
        raise AlmKitError("compare: the models were scored on different numbers of items")  # a paired test needs the same
    comparison = Comparison(results, [i.groups for i in scored], _chance(scored), Path(eval_file))
    write_outputs(comparison, out_dir, plot=plot)
    return comparison


# --------------------------------------------------------------------------- outputs
def _column_label(column: Column, columns: list[Column]) -> str:
    """The group's name alone for the first grouping field (the tasks), ``key: name`` for the others."""
    first = next((c.key for c in columns if c.key is not None), None)
    return column.name if column.key == first else f"{column.key}: {column.name}"


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per model and seed (compare.csv): every per-seed figure, unrounded."""
    header = ["name", "seed", "source", "checkpoint", "params_trainable", "params_total", "audio_tokens_per_clip",
              "train_samples_per_s", "peak_memory_mib", "memory_kind"] + [c.csv_name for c in comparison.columns]
    rows = []
    for r in comparison.results:
        for run in r.runs:
            correct = np.array(run.correct, dtype=float)
            rows.append([r.name, run.seed, r.source, str(run.checkpoint), r.params_trainable, r.params_total,
                         r.audio_tokens_per_clip, run.samples_per_s, run.peak_memory_mib, run.memory_kind]
                        + [float(correct[c.mask].mean()) for c in comparison.columns])
    return header, rows


def summary_rows(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per model and column (compare_summary.csv): mean, interval, test against the best."""
    header = ["name", "column", "seeds", "mean", "ci_low", "ci_high", "best", "p_vs_best", "significant"]
    rows = []
    for r in comparison.results:
        for column in comparison.columns:
            cell = comparison.cells[r.name][column]
            rows.append([r.name, column.csv_name, len(r.runs), cell.interval.mean, cell.interval.low,
                         cell.interval.high, cell.best, cell.p_vs_best, cell.significant])
    return header, rows


def _counts(trainable: int, total: int) -> str:
    """``trainable / total`` in one unit: millions from 100k on, else plain."""
    if total >= 1e5:
        return f"{trainable / 1e6:.2f}M / {total / 1e6:.2f}M"
    return f"{trainable:,} / {total:,}"


def _cell_text(cell: Cell) -> str:
    i = cell.interval
    mean = f"**{i.mean:.1%}**" if cell.best else f"{i.mean:.1%}"
    return f"{mean} ({100 * i.low:.1f}–{100 * i.high:.1f}){' ↓' if cell.significant else ''}"


def _p_text(cell: Cell) -> str:
    if cell.p_vs_best is None:
        return "best" if cell.best else "—"
    return "<0.001" if cell.p_vs_best < 0.001 else f"{cell.p_vs_best:.3f}"


def format_markdown(comparison: Comparison) -> str:
    results, columns = comparison.results, comparison.columns
    kinds = sorted({run.memory_kind for r in results for run in r.runs if run.memory_kind})
    memory_head = f"peak memory MiB ({', '.join(kinds)})" if kinds else "peak memory MiB"
    head = (["model", "params trainable / total", "audio tokens / clip", "train samples/s", memory_head,
             "accuracy (95% CI)", "p vs best"] + [_column_label(c, columns) for c in columns[1:]])
    seeds = sorted({len(r.runs) for r in results})
    over = "test items" + (f" and {'/'.join(map(str, seeds))} seeds" if seeds != [1] else " (one seed)")
    where = f" on {comparison.eval_file}" if comparison.eval_file is not None else ""
    lines = [f"Accuracy{where} (MMAU string match): mean, with a 95% bootstrap interval over {over}. "
             f"Bold: best of its column; ↓: below that best by a significant margin (paired bootstrap on the "
             f"same items, p < {ALPHA}). Chance: {comparison.chance:.1%}.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = comparison.cells[r.name]
        speed, memory = r.mean_of("samples_per_s"), r.mean_of("peak_memory_mib")
        row = [r.name, _counts(r.params_trainable, r.params_total),
               f"{r.audio_tokens_per_clip:g}" if r.audio_tokens_per_clip == int(r.audio_tokens_per_clip)
               else f"{r.audio_tokens_per_clip:.1f}",
               "—" if speed is None else f"{speed:.1f}", "—" if memory is None else f"{memory:,.0f}",
               _cell_text(cells[columns[0]]), _p_text(cells[columns[0]])]
        row += [_cell_text(cells[c]) for c in columns[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def write_outputs(comparison: Comparison, out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
    from alm_kit.workflows.compare_plot import plot_comparison

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out_dir / "compare.md", "csv": out_dir / "compare.csv",
               "summary": out_dir / "compare_summary.csv"}
    written["markdown"].write_text(format_markdown(comparison) + "\n")
    written["csv"].write_text(_csv(*table_rows(comparison)))
    written["summary"].write_text(_csv(*summary_rows(comparison)))
    if plot and plot_comparison(comparison, out_dir / "compare.png") is not None:
        written["png"] = out_dir / "compare.png"
    return written
