"""Reasoning blocks in answers: Qwen3's ``<think> ... </think>`` and the CoTA answer format.

A thinking answer looks like Qwen3's rendering of an assistant turn with reasoning::

    <think>
    ...reasoning...
    </think>

    the answer

The CoTA format (the Audio-Reasoner data set as TinyGiantALM trains on it) puts four sections
inside the block. TinyGiantALM names them Plan, Audio Analysis, Logic and Summary but does
not publish their markup; alm-kit writes each as a ``Name: text`` paragraph::

    <think>
    Plan: ...
    Audio Analysis: ...
    Logic: ...
    Summary: ...
    </think>

    the answer

``split_thinking`` separates reasoning from answer (scoring, display); ``cota_sections``
reads the four sections back.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

#: (manifest field, heading) of each CoTA section, in order
COTA_SECTIONS: tuple[tuple[str, str], ...] = (
    ("plan", "Plan"),
    ("analysis", "Audio Analysis"),
    ("logic", "Logic"),
    ("summary", "Summary"),
)
_HEADINGS = "|".join(re.escape(heading) for _, heading in COTA_SECTIONS)
_HEADING = re.compile(rf"^({_HEADINGS}):[ \t]*", re.MULTILINE)


def format_thinking(thought: str, answer: str) -> str:
    """``<think>\\n{thought}\\n</think>\\n\\n{answer}`` (Qwen3's layout of a reasoning turn)."""
    return f"{THINK_OPEN}\n{thought.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def format_cota(plan: str, analysis: str, logic: str, summary: str, answer: str) -> str:
    """The CoTA answer: the four sections inside one thinking block, then the answer."""
    values = {"plan": plan, "analysis": analysis, "logic": logic, "summary": summary}
    body = "\n".join(f"{heading}: {' '.join(values[name].split())}" for name, heading in COTA_SECTIONS)
    return format_thinking(body, answer)


def split_thinking(text: str) -> tuple[str, str]:
    """(thought, answer) of a generated text.

    * ``<think>T</think>A`` -> (T, A); the opening tag may be missing (Qwen3 templates can put it
      in the prompt), and only the last ``</think>`` counts;
    * ``<think>T`` never closed (generation stopped while thinking) -> (T, "");
    * no tags -> ("", text).

    Both parts are stripped of surrounding whitespace.
    """
    if THINK_CLOSE in text:
        thought, _, answer = text.rpartition(THINK_CLOSE)
        start = thought.find(THINK_OPEN)
        if start >= 0:
            thought = thought[start + len(THINK_OPEN):]
        return thought.strip(), answer.strip()
    start = text.find(THINK_OPEN)
    if start >= 0:
        return text[start + len(THINK_OPEN):].strip(), ""
    return "", text.strip()


def cota_sections(thought: str) -> dict[str, str]:
    """The CoTA sections of a thought, keyed by field name (``plan``, ``analysis``, ``logic``, ``summary``).

    A section runs from its heading (at the start of a line) to the next heading; missing
    sections are absent from the result, text before the first heading is ignored.
    """
    by_heading = {heading: name for name, heading in COTA_SECTIONS}
    matches = list(_HEADING.finditer(thought))
    out: dict[str, str] = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(thought)
        out[by_heading[match.group(1)]] = thought[match.end():end].strip()
    return out
