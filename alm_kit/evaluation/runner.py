"""Ask a model every item of a benchmark file, score it, and write the results.

Two ways to get an item's answer: ``generate`` (the model writes an answer, scored with the
benchmark's rule: string match or option match) and ``likelihood`` (the option whose text the model
finds most likely after the prompt, :func:`alm_kit.inference.likelihood.score_candidates`, as
lm-eval-harness scores multiple choice; the chosen option is then scored with the same rule).

Answers are appended to ``OUT_DIR/predictions.jsonl`` after every batch, keyed by the checkpoint's
content, the generation settings, the prompt template, the device type and each item's prompt and
audio *contents* (a clip whose bytes changed is answered again); a re-run with the same key answers
only what is missing (an interrupted run resumes, a changed setting starts afresh). Items whose audio is missing or unreadable fail on their own:
they are listed, count as wrong, and are retried by the next run.

Under torchrun (``ranks``, :mod:`alm_kit.parallel`) every rank asks every N-th of the items the
cache lacks and appends its answers to ``predictions.jsonl.partR``; the answers are gathered on
every rank, scored in input order, and rank 0 folds the parts into the cache and writes the files.
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
from alm_kit.evaluation.scoring import RULES, accuracy_table, format_table, names_a_choice
from alm_kit.hashing import file_sha256, update_with_file
from alm_kit.parallel import Ranks, merge_parts, part_path
from alm_kit.text.mcq import McqTemplate, mcq_prompt, resolve_template, template_from_prompts

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
PLOTS = "plots"
#: generation settings that do not change an answer (left out of the cache key)
_NOT_IN_KEY = ("batch_size", "encoder_batch", "cuda_graphs")


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


#: how an item's answer is obtained: generated and matched, or the most likely option
SCORING_METHODS = ("generate", "likelihood")


def run_key(checkpoint: str, gen: GenerationConfig, template: str | dict, device: str,
            method: str = "generate") -> str:
    settings = {k: v for k, v in dataclasses.asdict(gen).items() if k not in _NOT_IN_KEY}
    fields = {"checkpoint": checkpoint, "generation": settings, "template": template, "device": device}
    if method != "generate":  # generated answers keep the keys of earlier runs
        fields["method"] = method
    blob = json.dumps(fields, sort_keys=True, default=str)
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
    return _each_alone_on_error(lambda rows: generate(model, [requests[i] for i in rows], gen), len(requests))


def _choose(model, gen: GenerationConfig, items: list[BenchItem], prompts: dict[int, str]) -> list[str | Exception]:
    """The option the model finds most likely for each item (its text)."""
    from alm_kit.inference.engine import Request
    from alm_kit.inference.likelihood import score_candidates

    requests = [Request(audio=list(i.audio), prompt=prompts[i.index], id=i.id) for i in items]

    def best(rows: list[int]) -> list[str]:
        scores = score_candidates(model, [requests[i] for i in rows], [items[i].choices for i in rows], gen)
        return [max(options, key=lambda s: s.logprob).text for options in scores]

    return _each_alone_on_error(best, len(requests))


def _each_alone_on_error(run, count: int) -> list[str | Exception]:
    """``run`` over all rows; when the batch fails, each row alone (so one bad clip fails only itself)."""
    try:
        return list(run(list(range(count))))
    except AlmKitError as exc:
        if count == 1:
            return [exc]
    out: list[str | Exception] = []
    for i in range(count):
        try:
            out.append(run([i])[0])
        except AlmKitError as exc:
            out.append(exc)
    return out


def evaluate_benchmark(model, gen: GenerationConfig, benchmark: Benchmark | str | Path, *, fmt: str | None = None,
                       checkpoint: str = "", out_dir: str | Path | None = None, limit: int | None = None,
                       audio_root: str | Path | None = None, reuse: bool = True, progress: bool = True,
                       plot: bool = False, ranks: Ranks | None = None, method: str = "generate") -> EvalResult:
    """Answer, score and (with ``out_dir``) write: the annotated benchmark file, results.json, plots.

    ``checkpoint`` identifies the weights in the cache key (:func:`checkpoint_fingerprint`);
    ``method`` is ``generate`` or ``likelihood`` (:data:`SCORING_METHODS`). ``ranks`` shares the
    items among torchrun's processes; every rank returns the same result.
    """
    if method not in SCORING_METHODS:
        raise AlmKitError(f"unknown scoring method {method!r}; choose from {', '.join(SCORING_METHODS)}")
    ranks = ranks or Ranks()
    if not isinstance(benchmark, Benchmark):
        benchmark = read_benchmark(benchmark, fmt, audio_root=audio_root)
    items = benchmark.items[:limit] if limit else benchmark.items
    template = resolve_template(gen.mcq_template, model.config.layout.name)
    prompts = {item.index: mcq_prompt(template, item.question, item.choices) for item in items}
    if not isinstance(template, str):
        template = dataclasses.asdict(template)  # for the cache key and results.json
    key = run_key(checkpoint, gen, template, str(model.device.type), method)
    answer = _choose if method == "likelihood" else _ask
    out = Path(out_dir) if out_dir is not None else None
    cache_path = out / PREDICTIONS if out is not None else None
    if out is not None and ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        merge_parts(cache_path, unique_ids=False)  # answers of an interrupted torchrun run
    ranks.barrier()
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
    mine = ranks.share(todo)
    bar = tqdm(total=len(items) - len(todo) + len(mine), initial=len(items) - len(todo), unit="item",
               desc=f"{benchmark.format.name} {benchmark.path.name}"
                    + (f" (rank 0 of {ranks.size})" if ranks.enabled else ""), disable=not (progress and ranks.is_main))
    sink = part_path(cache_path, ranks.rank) if cache_path is not None and ranks.enabled else cache_path
    writer = open(sink, "a", encoding="utf-8") if sink is not None else None
    try:
        for start in range(0, len(mine), gen.batch_size):
            chunk = mine[start : start + gen.batch_size]
            for item, prediction in zip(chunk, answer(model, gen, chunk, prompts)):
                if isinstance(prediction, Exception):
                    errors[item.index] = str(prediction)
                    continue
                predictions[item.index] = prediction
                if writer is not None:
                    writer.write(json.dumps({"run": key, "key": keys[item.index], "id": item.id,
                                             "prediction": prediction}, ensure_ascii=False) + "\n")
            if writer is not None:
                writer.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if ranks.enabled:  # every rank gets every answer (the ones it asked are its own)
        asked = [item.index for item in mine]
        share = ({i: predictions[i] for i in asked if i in predictions}, {i: errors[i] for i in asked if i in errors})
        for their_predictions, their_errors in ranks.gather(share):
            predictions.update(their_predictions)
            errors.update(their_errors)
        if cache_path is not None and ranks.is_main:
            merge_parts(cache_path, unique_ids=False)
        ranks.barrier()

    rule = RULES[benchmark.format.scoring]
    failed_flags = [item.index in errors for item in items]
    correct = [not bad and rule(item.answer, predictions[item.index], item.choices)
               for item, bad in zip(items, failed_flags)]
    stray = [not bad and not names_a_choice(predictions[item.index], item.choices)
             for item, bad in zip(items, failed_flags)]
    table = accuracy_table([item.groups for item in items], correct, failed_flags, benchmark.format.groups,
                           not_a_choice=stray)
    failed = [{"id": item.id, "error": errors[item.index]} for item in items if item.index in errors]
    how = benchmark.format.scoring if method == "generate" else f"most likely option, {benchmark.format.scoring}"
    title = f"{benchmark.format.name}: {benchmark.path.name} ({len(items)} items, {how})"
    result = EvalResult(benchmark, items, table, format_table(table, title),
                        {item.index: predictions.get(item.index, "") for item in items}, correct, failed,
                        reused, key)
    if out is not None and ranks.is_main:
        result.files["predictions"] = write_annotated(
            benchmark, result.predictions, out / f"{benchmark.path.stem}.predictions{benchmark.path.suffix or '.json'}")
        summary = result.summary() | {"checkpoint": checkpoint, "template": template, "method": method,
                                      "generation": dataclasses.asdict(gen)}
        (out / RESULTS).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result.files["results"] = out / RESULTS
        result.files["cache"] = cache_path
        if plot:
            from alm_kit.evaluation.plots import plot_table

            for path in plot_table(table, out / PLOTS, title):
                result.files[f"plot:{path.stem}"] = path
    return result


#: training prompts read to recover a template (enough to see the pattern, cheap on huge manifests)
TEMPLATE_SAMPLE = 2000


def template_from_manifest(recipe, manifest: str | Path | None = None) -> tuple[McqTemplate, str]:
    """The multiple-choice template a training manifest's prompts follow (``alm-kit eval
    --template-from-data``): ``manifest``, by default the recipe's ``data.train``. Returns the
    template and the file it came from; AlmKitError when there is no manifest or no recognisable pattern."""
    from alm_kit.data.manifest import read_manifest
    from alm_kit.data.shards import shard_paths

    source = str(manifest or recipe.data.train or "")
    give = "give the training manifest: --template-from-data MANIFEST"
    if not source:
        raise AlmKitError(f"--template-from-data: the checkpoint's recipe names no data.train; {give}")
    if not Path(source).is_file():
        if manifest is None and _is_shards(source, shard_paths):
            raise AlmKitError(f"--template-from-data: data.train is shards ({source}); {give} (JSONL)")
        where = "" if manifest else " (data.train of the checkpoint's recipe, relative to the current folder)"
        raise AlmKitError(f"--template-from-data: {source} not found{where}; {give}")
    examples = read_manifest(source, recipe.data.format if manifest is None else "auto", require_response=False)
    records = [(e.prompt, e.meta.get("choices") if isinstance(e.meta.get("choices"), list) else None)
               for e in examples[:TEMPLATE_SAMPLE]]
    template = template_from_prompts(records)
    if template is None:
        raise AlmKitError(f"--template-from-data: the prompts of {source} follow no multiple-choice pattern alm-kit "
                          "recognises (the options labelled the same way, e.g. '(a) x (b) y' or 'A. x' per line, "
                          "in at least 80% of the prompts that list options); pass --template")
    return template, source


def _is_shards(source: str, shard_paths) -> bool:
    try:
        return shard_paths(source) is not None
    except AlmKitError:  # shards, some of them missing
        return True


def evaluate_file(model, path: str | Path, gen: GenerationConfig, *, limit: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """``{"table", "predictions", "failed"}`` for a benchmark file, without output files or the answer
    cache: the ``data.eval`` score during and after training (missing audio: failed items, not errors)."""
    result = evaluate_benchmark(model, gen, path, limit=limit, progress=progress)
    return {"table": result.table, "predictions": result.summary()["predictions"], "failed": result.failed}
