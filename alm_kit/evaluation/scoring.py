"""The benchmarks' scoring rules and the accuracy table.

* ``string_match`` (MMAU and MMAR's official evaluation.py): lower-case, tokenize with ``\\b\\w+\\b``;
  correct iff the prediction has tokens, contains every answer token, and contains no token of a
  wrong choice other than the tokens that choice shares with the answer.
* ``option_match`` (MMSU, AIR-Bench, offline): the prediction names exactly the answer option, by its
  text, its letter, or both ("B", "(b)", "B. two dogs", "b) two dogs", "two dogs."), ignoring case,
  surrounding whitespace and punctuation. The official scripts of both benchmarks map the response to
  a letter (AIR-Bench with an external LLM); this is the offline equivalent for answers that are an option.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\b\w+\b")
_LABELLED = re.compile(r"^[\(\[]?([A-Za-z])[\)\]\.:]\s*(.*)$", re.S)
_EDGE = " \t\r\n.,;:!?\"'`*"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU / MMAR official rule (their evaluation.py, reimplemented)."""
    predicted, wanted = _words(prediction), _words(answer)
    if not predicted:
        return False
    wrong: set[str] = set()
    for choice in choices:
        tokens = _words(choice)
        if tokens != wanted:
            wrong |= tokens - wanted
    return wanted <= predicted and predicted.isdisjoint(wrong)


def _normal(text: str) -> str:
    return " ".join(text.split()).strip(_EDGE).casefold()


def chosen_option(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option the prediction names exactly, or None."""
    texts = [_normal(c) for c in choices]
    whole = _normal(prediction)
    if whole and texts.count(whole) == 1:
        return texts.index(whole)
    if len(whole) == 1 and whole in LETTERS[: len(choices)]:
        return LETTERS.index(whole)
    labelled = _LABELLED.match(prediction.strip())
    if labelled:
        letter, rest = labelled.group(1).lower(), _normal(labelled.group(2))
        index = LETTERS.index(letter)
        if index < len(choices) and rest in ("", texts[index]):
            return index
    return None


def option_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    index = chosen_option(prediction, choices)
    return index is not None and _normal(choices[index]) == _normal(answer)


RULES = {"string_match": string_match, "option_match": option_match}


def names_a_choice(prediction: str, choices: Sequence[str]) -> bool:
    """Whether an answer is exactly one option (as :func:`chosen_option` reads it).

    Not so: run-on answers ("oneone", "one one"), empty ones, sentences. ``string_match`` may still
    score such an answer correct, so the accuracy table counts them apart.
    """
    return chosen_option(prediction, choices) is not None


def _row(correct: int, total: int, failed: int, not_a_choice: int = 0) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0, "failed": failed,
            "not_a_choice": not_a_choice}


def accuracy_table(groups: Sequence[dict[str, str]], correct: Sequence[bool], failed: Sequence[bool],
                   order: Sequence[str] = (), not_a_choice: Sequence[bool] | None = None) -> dict[str, Any]:
    """Overall and per-group accuracy; failed items count as wrong (and are counted separately).

    ``{"overall": row, field: {value: row}, ...}``, a row being ``{"correct", "total", "accuracy",
    "failed", "not_a_choice"}``, for every grouping field with more than one value (``sub-category``
    whenever present); fields in ``order`` first, values sorted. ``not_a_choice`` flags the answered
    items whose answer is not exactly one option (:func:`names_a_choice`), counted per row.
    """
    off = list(not_a_choice) if not_a_choice is not None else [False] * len(correct)
    table: dict[str, Any] = {"overall": _row(sum(correct), len(correct), sum(failed), sum(off))}
    fields = list(order) + sorted({k for g in groups for k in g} - set(order))
    for name in fields:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for g, ok, bad, stray in zip(groups, correct, failed, off):
            if name in g:
                counts[g[name]][0] += int(ok)
                counts[g[name]][1] += 1
                counts[g[name]][2] += int(bad)
                counts[g[name]][3] += int(stray)
        if len(counts) > 1 or (name == "sub-category" and counts):
            table[name] = {v: _row(*counts[v]) for v in sorted(counts)}
    return table


def group_fields(table: dict[str, Any]) -> list[str]:
    """The grouping fields of an accuracy table, in report order."""
    return [k for k in table if k != "overall"]


def _notes(row: dict[str, Any], lead: str) -> str:
    """"1 failed, 3 not a choice" (the counts that are not zero), after ``lead``."""
    notes = [f"{row[key]} {label}" for key, label in (("failed", "failed"), ("not_a_choice", "not a choice"))
             if row.get(key)]
    return lead + ", ".join(notes) if notes else ""


def format_table(table: dict[str, Any], title: str | None = None) -> str:
    """Markdown: the overall line, then one table per grouping."""
    row = table["overall"]
    lines = ([f"### {title}", ""] if title else []) + [
        f"**overall: {row['accuracy']:.2%}** ({row['correct']} / {row['total']}{_notes(row, ', ')})"]
    for name in group_fields(table):
        rows = table[name]
        lines += ["", f"| {name} | accuracy | correct / total |", "|---|---:|---:|"]
        for value, r in rows.items():
            extra = _notes(r, "")
            lines.append(f"| {value} | {r['accuracy']:.2%} | {r['correct']} / {r['total']}"
                         f"{f' ({extra})' if extra else ''} |")
    return "\n".join(lines)
