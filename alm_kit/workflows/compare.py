"""``alm-kit compare``: train (or load) several models and score them on one multiple-choice test.

Each source is a recipe file (trained here, into ``OUT/runs/<name>``) or an existing run folder /
checkpoint (loaded as it is). Every model is evaluated on the same MMAU-format file, and the
results go to ``OUT/compare.md`` (also printed), ``OUT/compare.csv`` and ``OUT/compare.png``
(loss curves and accuracy against trainable parameters; needs matplotlib, the ``plot`` extra).

Measured per model:

* parameters: trainable (``requires_grad`` under the recipe's train modes) and total;
* audio tokens per clip: valid projector outputs per clip, averaged over the first test items'
  clips (without the layouts' optional boundary vectors);
* training samples/s: the run's last ``samples_per_s`` in ``metrics.jsonl`` (training steps only:
  feature caching and evaluation excluded);
* peak memory during training: on CUDA the peak allocated by torch, elsewhere the process's
  peak resident set (Linux ``VmHWM``, reset before each run; empty where it cannot be reset);
  empty for loaded runs;
* accuracy overall and per group of the test file (MMAU ``task``, ``sub-category``, ...).
"""

from __future__ import annotations

import csv
import gc
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alm_kit.errors import AlmKitError

GROUP_KEYS = ("task", "category", "sub-category", "difficulty")


@dataclass
class CompareResult:
    """One compared model."""

    name: str
    source: str
    checkpoint: Path
    params_trainable: int
    params_total: int
    audio_tokens_per_clip: float
    accuracy: float
    #: group key -> group name -> accuracy
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    samples_per_s: float | None = None
    #: MiB; what was measured is in ``memory_kind`` ("cuda allocated" / "process RSS")
    peak_memory_mib: float | None = None
    memory_kind: str | None = None
    #: (step, loss) of every training step
    losses: list[tuple[int, float]] = field(default_factory=list)


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


def _training_curve(run_dir: Path | None) -> tuple[list[tuple[int, float]], float | None]:
    """(step, loss) records and the last samples/s of a run folder's metrics.jsonl."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return [], None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r and "step" in r]
    speed = next((r["samples_per_s"] for r in reversed(train) if r.get("samples_per_s") is not None), None)
    return [(int(r["step"]), float(r["loss"])) for r in train], speed


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/step-N or the older RUN/checkpoint)."""
    for candidate in (checkpoint.parent.parent, checkpoint.parent, checkpoint):
        if (candidate / "metrics.jsonl").exists():
            return candidate
    return None


def _groups(table: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {key: {name: row["accuracy"] for name, row in table[key].items()} for key in GROUP_KEYS if key in table}


# --------------------------------------------------------------------------- one source
def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def compare(sources: list[str | Path], eval_file: str | Path | None = None, *, steps: int | None = None,
            out_dir: str | Path = "runs/compare", overrides: list[str] = (), limit: int | None = None,
            progress: bool = True, plot: bool = True) -> list[CompareResult]:
    """Train or load every source, evaluate each on ``eval_file``, write the table, CSV and plot to ``out_dir``.

    ``eval_file`` defaults to the first recipe's ``data.eval``. ``steps`` and ``overrides``
    (``key.path=value``) apply to every recipe; loaded runs are used as they are.
    """
    from alm_kit.checkpoint import load_checkpoint, resolve_checkpoint
    from alm_kit.config.loader import load_recipe
    from alm_kit.evaluation.formats import read_benchmark
    from alm_kit.evaluation.runner import evaluate_file
    from alm_kit.training.engine import Trainer

    if not sources:
        raise AlmKitError("compare: name at least one recipe or run folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CompareResult] = []
    taken: set[str] = set()
    for source in map(Path, sources):
        if not source.exists():
            raise AlmKitError(f"compare: {source} not found (give recipe files or run folders / checkpoints)")
        if source.is_dir():  # a run folder or a checkpoint
            checkpoint = resolve_checkpoint(source)
            model, recipe = load_checkpoint(checkpoint)
            name = _unique_name(recipe.name, taken)
            losses, speed = _training_curve(_run_dir_of(checkpoint))
            memory = None
        else:
            extra = list(overrides) + ([f"training.max_steps={steps}"] if steps else [])
            recipe = load_recipe(source, extra)
            if eval_file is None and recipe.data.eval:
                eval_file = recipe.data.eval
            recipe = load_recipe(source, extra + ["data.eval=null"])  # evaluated below, on the shared file
            name = _unique_name(recipe.name, taken)
            run_dir = out_dir / "runs" / name
            if run_dir.exists():
                shutil.rmtree(run_dir)  # compare owns OUT/runs: every call trains afresh
            trainer = Trainer(recipe, progress=progress, run_dir=run_dir)
            with PeakMemory(trainer.device) as memory:
                result = trainer.fit()
            if getattr(result, "interrupted", False):
                raise AlmKitError(f"compare: training {name} was interrupted (its checkpoint is in {run_dir}); "
                                  "stopped before the remaining models")
            model, checkpoint = trainer.model, Path(result.checkpoint)
            losses, speed = _training_curve(run_dir)
        if eval_file is None:
            raise AlmKitError("compare: no test file: pass --eval TEST_FILE (MMAU format)")
        eval_file = Path(eval_file)
        items = read_benchmark(eval_file).items
        evaluation = evaluate_file(model, eval_file, recipe.generation, limit=limit, progress=progress)
        trainable, total = parameter_counts(model)
        results.append(CompareResult(
            name=name, source=str(source), checkpoint=checkpoint, params_trainable=trainable, params_total=total,
            audio_tokens_per_clip=audio_tokens_per_clip(model, items),
            accuracy=evaluation["table"]["overall"]["accuracy"], groups=_groups(evaluation["table"]),
            samples_per_s=speed, peak_memory_mib=memory.mib if memory else None,
            memory_kind=memory.kind if memory else None, losses=losses))
        (out_dir / "runs" / name).mkdir(parents=True, exist_ok=True)
        (out_dir / "runs" / name / "compare_eval.json").write_text(json.dumps(evaluation, indent=2))
        del model
        trainer = None  # the next run's peak memory must not include this model
        gc.collect()
    write_outputs(results, out_dir, eval_file, plot=plot)
    return results


# --------------------------------------------------------------------------- outputs
def group_columns(results: list[CompareResult]) -> list[tuple[str, str]]:
    """(group key, group name) of every per-group accuracy column, in order of first appearance.

    A key whose groups repeat an earlier key's exactly (the synthetic set's category and
    sub-category) is left out.
    """
    keys = list(dict.fromkeys(key for r in results for key in r.groups))
    kept: list[str] = []
    for key in keys:
        same = [k for k in kept if all(r.groups.get(k) == r.groups.get(key) for r in results)]
        if not same:
            kept.append(key)
    return list(dict.fromkeys((key, name) for key in kept for r in results for name in r.groups.get(key, {})))


def _column_label(key: str, name: str, columns: list[tuple[str, str]]) -> str:
    return name if sum(n == name for _, n in columns) == 1 else f"{key}: {name}"


def table_rows(results: list[CompareResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and raw values (the CSV)."""
    columns = group_columns(results)
    header = ["name", "source", "params_trainable", "params_total", "audio_tokens_per_clip",
              "train_samples_per_s", "peak_memory_mib", "memory_kind", "accuracy"]
    header += [f"accuracy[{key}={name}]" for key, name in columns]
    rows = []
    for r in results:
        rows.append([r.name, r.source, r.params_trainable, r.params_total, round(r.audio_tokens_per_clip, 2),
                     None if r.samples_per_s is None else round(r.samples_per_s, 2),
                     None if r.peak_memory_mib is None else round(r.peak_memory_mib, 1), r.memory_kind,
                     round(r.accuracy, 4)]
                    + [None if name not in r.groups.get(key, {}) else round(r.groups[key][name], 4)
                       for key, name in columns])
    return header, rows


def _counts(trainable: int, total: int) -> str:
    """``trainable / total`` in one unit: millions from 100k on, else plain."""
    if total >= 1e5:
        return f"{trainable / 1e6:.2f}M / {total / 1e6:.2f}M"
    return f"{trainable:,} / {total:,}"


def format_markdown(results: list[CompareResult], eval_file: str | Path | None = None) -> str:
    columns = group_columns(results)
    kinds = sorted({r.memory_kind for r in results if r.memory_kind})
    memory_head = f"peak memory MiB ({', '.join(kinds)})" if kinds else "peak memory MiB"
    head = (["model", "params trainable / total", "audio tokens / clip", "train samples/s", memory_head, "accuracy"]
            + [_column_label(k, n, columns) for k, n in columns])
    lines = []
    if eval_file is not None:
        lines.append(f"Accuracy on {eval_file} (MMAU string match).\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = max(r.accuracy for r in results)
    bold = len({r.accuracy for r in results}) > 1  # mark the best only when there is a difference
    for r in results:
        acc = f"{r.accuracy:.1%}"
        cells = [r.name, _counts(r.params_trainable, r.params_total),
                 f"{r.audio_tokens_per_clip:g}" if r.audio_tokens_per_clip == int(r.audio_tokens_per_clip)
                 else f"{r.audio_tokens_per_clip:.1f}",
                 "—" if r.samples_per_s is None else f"{r.samples_per_s:.1f}",
                 "—" if r.peak_memory_mib is None else f"{r.peak_memory_mib:,.0f}",
                 f"**{acc}**" if bold and r.accuracy == best else acc]
        cells += ["—" if n not in r.groups.get(k, {}) else f"{r.groups[k][n]:.1%}" for k, n in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(results: list[CompareResult]) -> str:
    header, rows = table_rows(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def plot_results(results: list[CompareResult], path: Path) -> Path | None:
    """Loss curves and accuracy against trainable parameters; None (and no file) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if r.losses:
            steps, losses = zip(*r.losses)
            curves.plot(steps, losses, label=r.name, linewidth=1.2)
    curves.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    losses = [loss for r in results for _, loss in r.losses]
    if losses:
        curves.legend(fontsize=8)
        if min(losses) > 0 and max(losses) / min(losses) > 10:
            curves.set_yscale("log")
    for r in results:
        scatter.scatter(r.params_trainable, 100 * r.accuracy, s=30)
        scatter.annotate(r.name, (r.params_trainable, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4),
                         fontsize=8)
    counts = [r.params_trainable for r in results]
    if min(counts) > 0 and max(counts) / min(counts) > 10:
        scatter.set_xscale("log")
    scatter.set_ylim(0, min(100, 100 * max(r.accuracy for r in results) * 1.2 + 5))
    scatter.set(xlabel="trainable parameters", ylabel="accuracy (%)", title="Accuracy vs. trainable parameters")
    scatter.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: list[CompareResult], out_dir: Path, eval_file: str | Path | None = None, *,
                  plot: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out_dir / "compare.md", "csv": out_dir / "compare.csv"}
    written["markdown"].write_text(format_markdown(results, eval_file) + "\n")
    written["csv"].write_text(format_csv(results))
    if plot and plot_results(results, out_dir / "compare.png") is not None:
        written["png"] = out_dir / "compare.png"
    return written
