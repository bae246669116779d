"""Read training manifests (alm-kit JSON Lines, Mellow's ReasonAQA) into :class:`Example` lists.

Format (docs/data.md), one JSON object per line, paths relative to the manifest's folder::

    {"audio": "a.wav" | ["a.wav", "b.wav"], "prompt": "...", "response": "...", "id": "optional"}

Any other field is kept in ``Example.meta``; ``description`` (the audio described in text, for
``alm-kit rephrase``) is read by :func:`description_of`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alm_kit.errors import AlmKitWarning, ManifestError  # noqa: F401  (re-exported)

Format = Literal["auto", "jsonl", "reasonaqa"]
REASONAQA_KEYS = ("filepath1", "input", "answer")


@dataclass
class Example:
    id: str
    audio: list[Path]
    prompt: str
    response: str | None = None
    #: where it came from, for error messages: "file:line"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadLine:
    """A manifest line that cannot be read, kept so that it fails alone (``read_manifest(bad_lines=...)``)."""

    number: int
    #: the record's id, or the default id of its line ("<file stem>-<line>")
    id: str
    error: str


def json_records(path: Path, what: str = "manifest", *, bad_lines: list[BadLine] | None = None
                 ) -> tuple[list[tuple[int, Any]], Literal["json", "jsonl"]]:
    """(line number, parsed record) of a JSON Lines or JSON list file, and which of the two it is.

    Errors name ``what`` and the file (and the line); for a JSON list the "line" is the item number.
    With ``bad_lines``, a JSON Lines line that does not parse is appended there instead of raising.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {path}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return [(i + 1, item) for i, item in enumerate(items)], "json"
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            error = f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
            if bad_lines is None:
                raise ManifestError(error) from None
            bad_lines.append(BadLine(number, f"{path.stem}-{number}", error))
    return records, "jsonl"


def detect_format(records: list[tuple[int, Any]]) -> Literal["jsonl", "reasonaqa"]:
    first = records[0][1] if records else {}
    if isinstance(first, dict) and all(k in first for k in REASONAQA_KEYS):
        return "reasonaqa"
    return "jsonl"


def _field(record: dict, key: str, where: str, *, types: tuple[type, ...] = (str,)) -> Any:
    if key not in record:
        raise ManifestError(f"{where}: missing field '{key}' (have: {', '.join(record) or 'nothing'})")
    value = record[key]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ManifestError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def read_manifest(path: str | Path, format: Format = "auto", *, require_response: bool = True,
                  bad_lines: list[BadLine] | None = None) -> list[Example]:
    """The examples of a manifest; errors name the file and line.

    With ``bad_lines`` (``alm-kit generate --input``), an unusable line (not JSON, not an object, a
    field missing or of the wrong type) is appended there and the other lines are still read.
    """
    path = Path(path)
    records = json_records(path, bad_lines=bad_lines)[0]
    if not records and not bad_lines:
        raise ManifestError(f"{path}: manifest is empty")
    kind = detect_format(records) if format == "auto" else format
    root = path.parent
    examples = []
    for number, record in records:
        where = f"{path}:{number}"
        try:
            if not isinstance(record, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
            examples.append(
                _from_reasonaqa(record, root, where, number) if kind == "reasonaqa"
                else _from_jsonl(record, root, where, number, path.stem, require_response)
            )
        except ManifestError as exc:
            if bad_lines is None:
                raise
            rid = record.get("id") if isinstance(record, dict) else None
            bad_lines.append(BadLine(number, str(rid) if rid is not None else f"{path.stem}-{number}", str(exc)))
    if bad_lines:
        bad_lines.sort(key=lambda bad: bad.number)
    return examples


def repeated_ids(ids: list[str]) -> list[str]:
    """The ids that occur more than once, in order of first occurrence."""
    counts = Counter(ids)
    return [i for i in counts if counts[i] > 1]


def warn_repeated_ids(ids: list[str], where: str) -> None:
    """Warn (:class:`~alm_kit.errors.AlmKitWarning`) when ``where`` repeats ids: results, failures and
    the answer cache are reported per id, so a repeated one is ambiguous (and often a copy-paste slip)."""
    repeated = repeated_ids(ids)
    if repeated:
        shown = ", ".join(repeated[:5]) + (f", ... ({len(repeated)} in all)" if len(repeated) > 5 else "")
        warnings.warn(f"{where}: repeated ids: {shown}", AlmKitWarning, stacklevel=2)


def _from_jsonl(record: dict, root: Path, where: str, number: int, stem: str, require_response: bool) -> Example:
    audio = _field(record, "audio", where, types=(str, list))
    audio = [audio] if isinstance(audio, str) else audio
    if not audio or not all(isinstance(a, str) and a for a in audio):
        raise ManifestError(f"{where}: field 'audio' must be a path or a non-empty list of paths")
    prompt = _field(record, "prompt", where)
    response = _field(record, "response", where) if require_response or "response" in record else None
    known = {"id", "audio", "prompt", "response"}
    return Example(
        id=str(record.get("id", f"{stem}-{number}")),
        audio=[root / a for a in audio],
        prompt=prompt,
        response=response,
        source=where,
        meta={k: v for k, v in record.items() if k not in known},
    )


def _from_reasonaqa(record: dict, root: Path, where: str, number: int) -> Example:
    """Mellow's records: {taskname, filepath1, filepath2, caption1, caption2, input, answer, subtype}."""
    paths = [_field(record, "filepath1", where)]
    second = record.get("filepath2")
    if isinstance(second, str) and second.strip() and second.strip().lower() not in {"none", "null"}:
        paths.append(second)
    return Example(
        id=str(record.get("id", f"reasonaqa-{number}")),
        audio=[root / p for p in paths],
        prompt=_field(record, "input", where),
        response=_field(record, "answer", where),
        source=where,
        meta={k: record[k] for k in ("taskname", "subtype", "caption1", "caption2") if k in record},
    )


def description_of(example: Example) -> str | None:
    """The text description of an example's audio (``alm-kit rephrase`` answers from it), or None.

    The record's ``description``: a string; a list of strings (one per line, e.g. several
    captions); or a mapping of named facts (``{"emotion": "happy", "speaker": "male, 66"}``, one
    ``name: value`` line each). Without one, Mellow's ``caption1`` / ``caption2`` are used
    (``Clip 1: ...`` / ``Clip 2: ...`` when the example has two clips).
    """
    value = example.meta.get("description")
    where = example.source or f"example {example.id}"
    if value is None:
        captions = [example.meta.get(k) for k in ("caption1", "caption2")[: len(example.audio)]]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            return None
        if len(captions) == 1:
            return captions[0]
        return "\n".join(f"Clip {i}: {c}" for i, c in enumerate(captions, 1))
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = "\n".join(v.strip() for v in value)
    elif isinstance(value, dict) and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        text = "\n".join(f"{k}: {v}" for k, v in value.items())
    else:
        raise ManifestError(f"{where}: field 'description' must be a string, a list of strings or a mapping of "
                            f"names to plain values, got {type(value).__name__}")
    return text.strip() or None


def check_audio_files(examples: list[Example], *, skip_bad: bool) -> tuple[list[Example], list[str]]:
    """Check every clip up front: its header, and the samples of float files (the only ones that can
    hold NaN or infinite values). Fail on the first bad one, or drop and report them."""
    kept, problems = [], []
    checked: dict[Path, str | None] = {}  # a clip shared by several examples is read once
    for example in examples:
        problem = None
        for clip in example.audio:
            if clip not in checked:
                checked[clip] = audio_problem(clip)
            if checked[clip]:
                problem = f"{example.source}: {checked[clip]}"
                break
        if problem is None:
            kept.append(example)
        elif skip_bad:
            problems.append(problem)
        else:
            raise ManifestError(problem + " (set data.skip_bad_audio=true to skip such examples)")
    return kept, problems


#: libsndfile subtypes whose samples may be NaN or infinite (integer PCM and lossy codecs cannot be)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


def audio_problem(clip: Path) -> str | None:
    """Why ``clip`` cannot be trained on, or None. Reads the header; float files are also decoded
    block by block; a WAV cut short gets a warning (it still decodes)."""
    import numpy as np
    import soundfile as sf

    from alm_kit.audio.io import AudioError, check_audio_path
    from alm_kit.audio.wav import warn_if_cut_short

    try:
        check_audio_path(clip)
        info = sf.info(str(clip))
        if info.frames == 0:
            return f"audio file is empty (0 samples): {clip}"
        if info.subtype in FLOAT_SUBTYPES:
            for block in sf.blocks(str(clip), blocksize=1 << 16, dtype="float32"):
                if not np.isfinite(block).all():
                    return f"audio contains NaN or infinite samples: {clip}"
    except AudioError as exc:
        return str(exc)
    except Exception as exc:  # libsndfile raises several types
        return f"cannot read audio file {clip}: {exc}"
    warn_if_cut_short(clip, str(clip))
    return None
