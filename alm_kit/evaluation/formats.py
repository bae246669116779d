"""Benchmark files as published: MMAU, MMAR, MMSU, AIR-Bench Foundation, and alm-kit's own MCQ JSONL.

Each format says how to find its items' audio, question, options and answer, which fields group
the accuracy table, how it is scored, and under which keys the prediction is written back so that
the benchmark's own scoring script can read the annotated file (docs/evaluation.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alm_kit.data.manifest import warn_repeated_ids
from alm_kit.errors import ManifestError

Scoring = Literal["string_match", "option_match"]


@dataclass
class BenchItem:
    """One multiple-choice question, whatever file it came from."""

    index: int  # position in the file (0-based)
    id: str
    audio: list[Path]
    question: str
    choices: list[str]
    answer: str
    groups: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchFormat:
    name: str
    description: str
    #: keys whose presence in the first record identifies the format (checked in FORMATS order)
    signature: tuple[str, ...]
    #: keys every record must have
    required: tuple[str, ...]
    scoring: Scoring
    #: grouping fields of the accuracy table, in report order
    groups: tuple[str, ...]
    #: keys the prediction is written under (alm-kit's, then the official script's input key)
    prediction_keys: tuple[str, ...]
    #: audio paths of one record, relative to the base folder
    audio: Callable[[dict[str, Any]], list[str]]
    question: Callable[[dict[str, Any]], str]
    choices: Callable[[dict[str, Any]], list[str]]
    answer: Callable[[dict[str, Any]], str]
    item_id: Callable[[dict[str, Any], int], str]
    #: extra group values computed from the record (AIR-Bench's "task" = task_name + dataset_name)
    derived_groups: Callable[[dict[str, Any]], dict[str, str]] = lambda r: {}
    #: folders tried (in order) to resolve relative audio paths, given the benchmark file's folder
    audio_bases: Callable[[Path], list[Path]] = lambda folder: [folder]


def _lettered(record: dict[str, Any]) -> list[str]:
    """MMSU / AIR-Bench options: choice_a, choice_b, then choice_c, choice_d while present and not null."""
    out = []
    for letter in "abcdefgh":
        value = record.get(f"choice_{letter}")
        if value is None or (letter > "b" and value == ""):
            break
        out.append(str(value))
    return out


def _airbench_audio(record: dict[str, Any]) -> list[str]:
    folder = f"{record['task_name']}_{record['dataset_name']}"
    path = str(record["path"])
    if record["task_name"] == "Audio_Grounding":  # the official inference script reads these as .flac
        path = path[:-3] + "flac"
    return [f"{folder}/{path}"]


def _mmau_audio(record: dict[str, Any]) -> list[str]:
    # audio_id_2: alm-kit's extension for two-clip items (the synthetic test set); MMAU's scorer ignores it
    return [record["audio_id"]] + ([record["audio_id_2"]] if record.get("audio_id_2") else [])


def _own_audio(record: dict[str, Any]) -> list[str]:
    audio = record["audio"]
    return [str(a) for a in audio] if isinstance(audio, list) else [str(audio)]


def _str_id(key: str) -> Callable[[dict[str, Any], int], str]:
    return lambda r, i: str(r[key]) if r.get(key) is not None else str(i + 1)


FORMATS: dict[str, BenchFormat] = {f.name: f for f in (
    BenchFormat(
        name="airbench", description="AIR-Bench Foundation (Foundation/Foundation_meta.json)",
        signature=("path", "task_name", "dataset_name", "choice_a", "answer_gt"),
        required=("path", "task_name", "dataset_name", "question", "choice_a", "choice_b", "answer_gt"),
        scoring="option_match", groups=("task",), prediction_keys=("model_prediction", "response"),
        audio=_airbench_audio, question=lambda r: r["question"], choices=_lettered, answer=lambda r: r["answer_gt"],
        item_id=_str_id("uniq_id"),
        derived_groups=lambda r: {"task": f"{r['task_name']}_{r['dataset_name']}"},
    ),
    BenchFormat(
        name="mmsu", description="MMSU (question/mmsu.jsonl)",
        signature=("audio_path", "choice_a", "answer_gt"),
        required=("audio_path", "question", "choice_a", "choice_b", "answer_gt"),
        scoring="option_match", groups=("category", "sub-category", "task_name"),
        prediction_keys=("model_prediction", "response"),
        audio=lambda r: [r["audio_path"]], question=lambda r: r["question"], choices=_lettered,
        answer=lambda r: r["answer_gt"], item_id=_str_id("id"),
        # the published layout keeps audio/ beside question/, the JSONL's folder
        audio_bases=lambda folder: [folder, folder.parent],
    ),
    BenchFormat(
        name="mmar", description="MMAR (MMAR-meta.json / .jsonl)",
        signature=("audio_path", "choices", "answer"),
        required=("audio_path", "question", "choices", "answer"),
        scoring="string_match", groups=("modality", "category", "sub-category"),
        prediction_keys=("model_prediction", "answer_prediction"),
        audio=lambda r: [r["audio_path"]], question=lambda r: r["question"], choices=lambda r: r["choices"],
        answer=lambda r: r["answer"], item_id=_str_id("id"),
    ),
    BenchFormat(
        name="mmau", description="MMAU (mmau-test-mini.json, mmau-test.json)",
        signature=("audio_id", "choices"),
        required=("audio_id", "question", "choices", "answer"),
        scoring="string_match", groups=("task", "difficulty", "category", "sub-category"),
        prediction_keys=("model_prediction", "model_output"),
        audio=_mmau_audio, question=lambda r: r["question"], choices=lambda r: r["choices"],
        answer=lambda r: r["answer"], item_id=_str_id("id"),
    ),
    BenchFormat(
        name="jsonl", description='alm-kit MCQ JSONL {"id", "audio": [a, b], "question", "choices", "answer", "task"}',
        signature=("audio", "choices"),
        required=("audio", "question", "choices", "answer"),
        scoring="string_match", groups=("task", "category", "sub-category", "difficulty"),
        prediction_keys=("model_prediction",),
        audio=_own_audio, question=lambda r: r["question"], choices=lambda r: r["choices"],
        answer=lambda r: r["answer"], item_id=_str_id("id"),
    ),
)}


@dataclass
class Benchmark:
    path: Path
    format: BenchFormat
    records: list[dict[str, Any]]
    container: Literal["json", "jsonl"]
    items: list[BenchItem]


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], Literal["json", "jsonl"]]:
    """A JSON list of objects or JSON Lines; errors name the file (and line)."""
    from alm_kit.data.manifest import json_records

    path = Path(path)
    numbered, container = json_records(path, "benchmark file")
    records = [record for _, record in numbered]
    if not records:
        raise ManifestError(f"{path}: holds no records")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ManifestError(f"{path}: item {bad + 1} is not a JSON object")
    return records, container


def detect_format(records: list[dict[str, Any]], path: str | Path) -> BenchFormat:
    keys = set(records[0])
    for fmt in FORMATS.values():
        if keys >= set(fmt.signature):
            return fmt
    known = "; ".join(f"{f.name}: {', '.join(f.signature)}" for f in FORMATS.values())
    raise ManifestError(f"{path}: unknown benchmark format (first record has keys {', '.join(sorted(keys))}); "
                        f"recognised formats and the keys that identify them: {known}. "
                        f"Pass --format {{{','.join(FORMATS)}}} to choose one")


def resolve_audio(relative: str, bases: list[Path]) -> Path:
    """The first existing candidate, else the first (so that the error names the primary location)."""
    path = Path(relative)
    if path.is_absolute():
        return path
    candidates = [base / path for base in bases]
    return next((c for c in candidates if c.exists()), candidates[0])


def read_benchmark(path: str | Path, fmt: str | None = None, *, audio_root: str | Path | None = None) -> Benchmark:
    """Read a benchmark file as published; ``fmt`` None detects the format from the first record."""
    path = Path(path)
    records, container = read_records(path)
    if fmt is None:
        bench_format = detect_format(records, path)
    elif fmt in FORMATS:
        bench_format = FORMATS[fmt]
    else:
        raise ManifestError(f"unknown benchmark format '{fmt}'; choose one of {', '.join(FORMATS)}")
    bases = [Path(audio_root)] if audio_root is not None else bench_format.audio_bases(path.resolve().parent)
    items = []
    for i, record in enumerate(records):
        missing = [k for k in bench_format.required if k not in record]
        if missing:
            raise ManifestError(f"{path}: item {i + 1}: missing field(s) {', '.join(missing)} "
                                f"(format {bench_format.name})")
        item_id = bench_format.item_id(record, i)
        where = f"{path}: item {i + 1}" + (f" (id {item_id})" if item_id != str(i + 1) else "")
        choices = bench_format.choices(record)
        if not (isinstance(choices, list) and choices and all(_is_text(c) for c in choices)):
            raise ManifestError(f"{where}: choices must be a non-empty list of strings, got "
                                f"{type(choices).__name__} {_short(choices)}")
        question = bench_format.question(record)
        if not _is_text(question):
            raise ManifestError(f"{where}: question must be a string, got {_short(question)}")
        choices = [str(c) for c in choices]
        answer = str(bench_format.answer(record))
        if answer not in choices:
            raise ManifestError(f"{where}: answer {answer!r} is not one of its choices {choices}")
        groups = {k: str(record[k]) for k in bench_format.groups if record.get(k) is not None}
        groups.update(bench_format.derived_groups(record))
        items.append(BenchItem(
            index=i, id=item_id, audio=[resolve_audio(a, bases) for a in bench_format.audio(record)],
            question=str(question), choices=choices, answer=answer, groups=groups,
        ))
    warn_repeated_ids([item.id for item in items], str(path))
    return Benchmark(path, bench_format, records, container, items)


def _is_text(value: Any) -> bool:
    """A question or an option: a string (numbers are taken as their text, as published files have them)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def write_annotated(benchmark: Benchmark, predictions: dict[int, str], out: str | Path) -> Path:
    """The benchmark's records (those in ``predictions``, by index) with the prediction added under the
    format's keys, in the file's own container (JSON list or JSON Lines)."""
    out = Path(out)
    rows = []
    for index in sorted(predictions):
        record = dict(benchmark.records[index])
        for key in benchmark.format.prediction_keys:
            record[key] = predictions[index]
        rows.append(record)
    tmp = out.with_name(out.name + ".tmp")
    if benchmark.container == "json":
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out
