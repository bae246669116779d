"""Ask a model every item of a benchmark file, score it, and write the results.

Answers are appended to ``OUT_DIR/predictions.jsonl`` after every batch, keyed by the checkpoint's
content, the generation settings, the prompt template, the device type and each item's prompt and
audio *contents* (a clip whose bytes changed is answered again); a re-run with the same key answers
only what is missing (an interrupted run resumes, a changed setting starts afresh). Items whose audio is missing or unreadable fail on their own:
they are listed, count as wrong, and are retried by the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alm_kit.config.schema import GenerationConfig
from alm_kit.errors import AlmKitError
from alm_kit.evaluation.formats import BenchItem, Benchmark, read_benchmark, write_annotated
from alm_kit.evaluation.prompts import mcq_prompt, resolve_template
from alm_kit.evaluation.scoring import RULES, accuracy_table, format_table, names_a_choice
from alm_kit.hashing import file_sha256, update_with_file

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
PLOTS = "plots"
#: generation settings that do not change an answer (left out of the cache key)
_NOT_IN_KEY = ("batch_size", "encoder_batch")


@dataclass
class EvalResult:
    benchmark: Benchmark
    items: list[BenchItem]
    table: dict[str, Any]
    markdown: str
    #: item index -> answer ("" for failed items)
    predictions: dict[int, str]
    correct: list[bool]
    #: [{"id", "error"}] for items that could not be answered
    failed: list[dict[str, str]]
    #: items answered by an earlier run with the same key
    reused: int = 0
    run_key: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON written to results.json (without the file paths)."""
        return {
            "benchmark": str(self.benchmark.path), "format": self.benchmark.format.name,
            "scoring": self.benchmark.format.scoring, "run_key": self.run_key, "items": len(self.items),
            "reused": self.reused, "table": self.table, "failed": self.failed,
            "predictions": [{"id": item.id, "prediction": self.predictions.get(item.index, ""), "answer": item.answer,
                             "correct": ok, "is_choice": names_a_choice(self.predictions.get(item.index, ""), item.choices)}
                            for item, ok in zip(self.items, self.correct)],
        }


def checkpoint_fingerprint(directory: str | Path) -> str:
    """Content hash of a checkpoint's weights and recipe (copies of a checkpoint share it)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in ("recipe.yaml", "model.safetensors"):
        path = directory / name
        if path.exists():
            update_with_file(digest, path)
    return digest.hexdigest()[:16]


def run_key(checkpoint: str, gen: GenerationConfig, template: str, device: str) -> str:
    settings = {k: v for k, v in dataclasses.asdict(gen).items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"checkpoint": checkpoint, "generation": settings, "template": template, "device": device},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def item_key(key: str, prompt: str, audio_hashes: Sequence[str]) -> str:
    """An item's cache key: the run's key, the prompt and the content hash of each clip."""
    blob = "\0".join([key, prompt, *audio_hashes])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_cache(path: Path, key: str) -> dict[str, str]:
    cache: dict[str, str] = {}
    if not path.exists():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interrupted run
            continue
        if row.get("run") == key:
            cache[row["key"]] = row["prediction"]
    return cache


def _answer_part(text: str) -> str:
    """What is scored: for thinking decoders the answer after ``</think>`` (the reasoning names every option)."""
    from alm_kit.text.thinking import THINK_CLOSE, THINK_OPEN, split_thinking

    return split_thinking(text)[1] if THINK_CLOSE in text or THINK_OPEN in text else text


def _ask(model, gen: GenerationConfig, items: list[BenchItem], prompts: dict[int, str]) -> list[str | Exception]:
    """Answers for one batch; when the batch fails, each item alone (so one bad clip fails only itself)."""
    answers = _ask_texts(model, gen, items, prompts)
    return [a if isinstance(a, Exception) else _answer_part(a) for a in answers]


def _ask_texts(model, gen: GenerationConfig, items: list[BenchItem], prompts: dict[int, str]) -> list[str | Exception]:
    from alm_kit.inference.engine import Request, generate

    requests = [Request(audio=list(i.audio), prompt=prompts[i.index], id=i.id) for i in items]
    try:
        return list(generate(model, requests, gen))
    except AlmKitError as exc:
        if len(requests) == 1:
            return [exc]
    out: list[str | Exception] = []
    for request in requests:
        try:
            out.append(generate(model, [request], gen)[0])
        except AlmKitError as exc:
            out.append(exc)
    return out


def evaluate_benchmark(model, gen: GenerationConfig, benchmark: Benchmark | str | Path, *, fmt: str | None = None,
                       checkpoint: str = "", out_dir: str | Path | None = None, limit: int | None = None,
                       audio_root: str | Path | None = None, reuse: bool = True, progress: bool = True,
                       plot: bool = False) -> EvalResult:
    """Answer, score and (with ``out_dir``) write: the annotated benchmark file, results.json, plots.

    ``checkpoint`` identifies the weights in the cache key (:func:`checkpoint_fingerprint`).
    """
    if not isinstance(benchmark, Benchmark):
        benchmark = read_benchmark(benchmark, fmt, audio_root=audio_root)
    items = benchmark.items[:limit] if limit else benchmark.items
    template = resolve_template(gen.mcq_template, model.config.layout.name)
    prompts = {item.index: mcq_prompt(template, item.question, item.choices) for item in items}
    key = run_key(checkpoint, gen, template, str(model.device.type))
    out = Path(out_dir) if out_dir is not None else None
    cache_path = out / PREDICTIONS if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(cache_path, key) if cache_path is not None and reuse else {}
    predictions: dict[int, str] = {}
    errors: dict[int, str] = {}
    todo: list[BenchItem] = []
    keys: dict[int, str] = {}
    hashes: dict[Path, str] = {}  # a clip shared by several items is read once
    for item in items:
        missing = [str(a) for a in item.audio if not a.is_file()]
        if missing:
            errors[item.index] = f"audio file not found: {', '.join(missing)}"
            continue
        for clip in item.audio:
            if clip not in hashes:
                hashes[clip] = file_sha256(clip)
        keys[item.index] = item_key(key, prompts[item.index], [hashes[clip] for clip in item.audio])
        if keys[item.index] in cache:
            predictions[item.index] = cache[keys[item.index]]
        else:
            todo.append(item)
    reused = len(predictions)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{benchmark.format.name} {benchmark.path.name}",
               unit="item", disable=not progress)
    writer = open(cache_path, "a", encoding="utf-8") if cache_path is not None else None
    try:
        for start in range(0, len(todo), gen.batch_size):
            chunk = todo[start : start + gen.batch_size]
            for item, answer in zip(chunk, _ask(model, gen, chunk, prompts)):
                if isinstance(answer, Exception):
                    errors[item.index] = str(answer)
                    continue
                predictions[item.index] = answer
                if writer is not None:
                    writer.write(json.dumps({"run": key, "key": keys[item.index], "id": item.id,
                                             "prediction": answer}, ensure_ascii=False) + "\n")
            if writer is not None:
                writer.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    rule = RULES[benchmark.format.scoring]
    failed_flags = [item.index in errors for item in items]
    correct = [not bad and rule(item.answer, predictions[item.index], item.choices)
               for item, bad in zip(items, failed_flags)]
    stray = [not bad and not names_a_choice(predictions[item.index], item.choices)
             for item, bad in zip(items, failed_flags)]
    table = accuracy_table([item.groups for item in items], correct, failed_flags, benchmark.format.groups,
                           not_a_choice=stray)
    failed = [{"id": item.id, "error": errors[item.index]} for item in items if item.index in errors]
    title = f"{benchmark.format.name}: {benchmark.path.name} ({len(items)} items, {benchmark.format.scoring})"
    result = EvalResult(benchmark, items, table, format_table(table, title),
                        {item.index: predictions.get(item.index, "") for item in items}, correct, failed,
                        reused, key)
    if out is not None:
        result.files["predictions"] = write_annotated(
            benchmark, result.predictions, out / f"{benchmark.path.stem}.predictions{benchmark.path.suffix or '.json'}")
        summary = result.summary() | {"checkpoint": checkpoint, "template": template,
                                      "generation": dataclasses.asdict(gen)}
        (out / RESULTS).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result.files["results"] = out / RESULTS
        result.files["cache"] = cache_path
        if plot:
            from alm_kit.evaluation.plots import plot_table

            for path in plot_table(table, out / PLOTS, title):
                result.files[f"plot:{path.stem}"] = path
    return result
