"""How a multiple-choice item becomes a prompt: the recipe's ``generation.mcq_template``.

A template is the text around the options (``prompt``, with ``{question}``, ``{choices}`` and
optionally ``{letters}``) and how the options are written: ``choice`` (one option, with ``{label}``
and ``{choice}``), the ``labels`` (``upper`` A B C, ``lower`` a b c, ``number`` 1 2 3) and the
``separator`` between options (``"\\n"``: one per line, ``" "``: inline). Built in:

* ``mellow``: ``question a) x b) y c) z`` on one line, the style Mellow was trained on (ReasonAQA).
* ``chat``: the question, the options one per line as ``A. x``, and an instruction to answer with the
  option's text (a text answer scores under MMAU/MMAR's string match as well as under option match).
* ``auto`` (default): ``mellow`` for the ``prefix`` layout (plain-text prompts), ``chat`` for any
  other layout (chat-template decoders).

Any other string is a ``prompt`` whose options are written one per line as ``A. x``; a mapping
sets every part. :func:`template_from_prompts` recovers a template from a training set's own prompts
(``alm-kit eval --template-from-data``), so that a model is asked the way it was trained.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

BUILTIN = ("auto", "mellow", "chat")
CHAT = "{question}\nChoices:\n{choices}\nAnswer with the text of the correct choice."
LABELS = {"upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "lower": "abcdefghijklmnopqrstuvwxyz",
          "number": [str(i) for i in range(1, 27)]}


@dataclass(frozen=True)
class McqTemplate:
    """A multiple-choice prompt: the text around the options, and how the options are written."""

    #: the whole prompt: {question}, {choices} (the options as below) and optionally {letters} ("A, B or C")
    prompt: str = "{question}\n{choices}"
    #: one option: {label} and {choice}, e.g. "{label}. {choice}", "({label}) {choice}", "{choice}"
    choice: str = "{label}. {choice}"
    #: upper (A B C), lower (a b c) or number (1 2 3)
    labels: Literal["upper", "lower", "number"] = "upper"
    #: between two options: "\n" one per line, " " inline, "; ", ...
    separator: str = "\n"

    def __post_init__(self) -> None:
        missing = [f for f in ("{question}", "{choices}") if f not in self.prompt]
        if missing:
            raise ValueError(f"mcq_template must be one of {', '.join(BUILTIN)} or a template containing "
                             f"{{question}} and {{choices}} (missing {', '.join(missing)})")
        _check_format("prompt", self.prompt, question="q", choices="c", letters="l")
        if "{choice}" not in self.choice:
            raise ValueError(f"mcq_template choice {self.choice!r} must contain {{choice}} (and usually {{label}})")
        _check_format("choice", self.choice, label="A", choice="x")
        if self.labels not in LABELS:
            raise ValueError(f"mcq_template labels must be one of {', '.join(LABELS)}, got {self.labels!r}")

    def render(self, question: str, choices: Sequence[str]) -> str:
        labels = LABELS[self.labels][: len(choices)]
        options = self.separator.join(self.choice.format(label=label, choice=choice)
                                      for label, choice in zip(labels, choices))
        spoken = ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else "".join(labels)
        return self.prompt.format(question=question.strip(), choices=options, letters=spoken)


def _check_format(part: str, text: str, **fields: str) -> None:
    try:
        text.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"mcq_template: bad template {part} ({exc}); only "
                         f"{', '.join('{' + f + '}' for f in fields)} are filled in (write {{{{ and }}}} for "
                         "literal braces)") from None


NAMED = {
    "mellow": McqTemplate(prompt="{question} {choices}", choice="{label}) {choice}", labels="lower", separator=" "),
    "chat": McqTemplate(prompt=CHAT),
}


def check_template(template: str | McqTemplate) -> None:
    """Raise ValueError for a template that is neither built in nor has the needed fields."""
    if isinstance(template, str) and template not in BUILTIN:
        McqTemplate(prompt=template)


def resolve_template(template: str | McqTemplate, layout_name: str) -> str | McqTemplate:
    """``auto`` -> ``mellow`` for the prefix layout, else ``chat``; anything else as it is."""
    if template == "auto":
        return "mellow" if layout_name == "prefix" else "chat"
    return template


def as_template(template: str | McqTemplate) -> McqTemplate:
    """The template a name (not ``auto``) or a prompt string stands for."""
    if isinstance(template, McqTemplate):
        return template
    return NAMED[template] if template in NAMED else McqTemplate(prompt=template)


def mcq_prompt(template: str | McqTemplate, question: str, choices: Sequence[str]) -> str:
    """The prompt for one item (``template`` already resolved, i.e. not ``auto``)."""
    return as_template(template).render(question, choices)


# ---------------------------------------------------------------- templates from training prompts
#: an option label at the end of the text before an option: "(a) ", "a) ", "A. ", "[1] ", "b: "
_LABEL_BEFORE = re.compile(r"(?:^|(?<=\s))(?P<open>[\(\[]?)(?P<label>[A-Za-z]|\d{1,2})(?P<close>[\)\]\.:])"
                           r"(?P<space>[ \t]*)$")
#: label styles tried when a record does not list its options: (open, close)
_MARKS = (("(", ")"), ("", ")"), ("", "."), ("[", "]"), ("", ":"))


def _label_style(label: str) -> tuple[str, int] | None:
    for style, labels in LABELS.items():
        if label in labels:
            return style, list(labels).index(label)
    return None


def _find_options(prompt: str) -> list[str] | None:
    """The options of a prompt that does not say what they are: the texts after the longest run of
    consecutive labels (a b c / A B C / 1 2 3) in one of the usual marks; the last option runs to the
    end of the prompt, or of its line when the options are one per line."""
    best: list[tuple[int, int]] = []
    for style in LABELS.values():
        for open_, close in _MARKS:
            spans, start = [], 0
            for label in style:
                pattern = rf"(?:^|(?<=\s)){re.escape(open_ + label + close)}[ \t]*"
                hit = re.compile(pattern).search(prompt, start)
                if hit is None:
                    break
                spans.append((hit.start(), hit.end()))
                start = hit.end()
            if len(spans) >= 2 and len(spans) > len(best):
                best = spans
    if not best:
        return None
    last = len(prompt)
    if "\n" in prompt[best[0][1]: best[1][0]]:  # one option per line: the last one ends with its line
        newline = prompt.find("\n", best[-1][1])
        last = newline if newline >= 0 else last
    ends = [s for s, _ in best[1:]] + [last]
    return [prompt[e:end].strip() for (_, e), end in zip(best, ends)]


def _parse(prompt: str, choices: Sequence[str]) -> tuple[str, McqTemplate, str] | None:
    """(text before the first option's label, the options' format, text after the last option)."""
    if len(choices) < 2:
        return None
    positions, end, low = [], len(prompt), prompt.lower()
    for choice in reversed(choices):  # from the end: the question may use an option's words too
        text = choice.strip().lower()
        at = low.rfind(text, 0, end) if text else -1
        if at < 0:
            return None
        positions.insert(0, (at, at + len(text)))
        end = at
    before = [prompt[: positions[0][0]]] + [prompt[positions[k - 1][1]: positions[k][0]]
                                           for k in range(1, len(positions))]
    marks = [_LABEL_BEFORE.search(text) for text in before]
    if all(m is not None for m in marks):
        styles = [_label_style(m["label"]) for m in marks]
        shapes = {(m["open"], m["close"], m["space"]) for m in marks}
        if any(s is None for s in styles) or len(shapes) != 1 or len({s[0] for s in styles}) != 1:
            return None
        if [s[1] for s in styles] != list(range(len(choices))):
            return None
        open_, close, space = shapes.pop()
        choice = f"{open_}{{label}}{close}{space}{{choice}}"
        separators = {text[: m.start()] for text, m in zip(before[1:], marks[1:])}
        head = before[0][: marks[0].start()]
        labels = styles[0][0]
    elif not any(marks):
        choice, labels = "{choice}", "upper"
        separators, head = set(before[1:]), before[0]
    else:
        return None
    if len(separators) != 1:
        return None
    separator = separators.pop()
    if not separator:
        return None
    return head, McqTemplate(choice=choice, labels=labels, separator=separator), prompt[positions[-1][1]:]


def _word_prefix(texts: list[str]) -> str:
    """The common prefix of ``texts``, cut back to end at whitespace (never inside a word)."""
    common = os.path.commonprefix(texts)
    while common and not all(len(t) == len(common) or t[len(common)].isspace() or common[-1].isspace()
                              for t in texts):
        common = common[:-1]
    return common


def _word_suffix(texts: list[str]) -> str:
    """The common suffix of ``texts``, cut back to start at whitespace (a question's own "?" stays
    with the question)."""
    return _word_prefix([t[::-1] for t in texts])[::-1]


def template_from_prompts(records: Iterable[tuple[str, Sequence[str] | None]], *,
                          least_share: float = 0.8) -> McqTemplate | None:
    """The template that wrote ``records``' prompts (``(prompt, options or None)`` pairs), or None when
    fewer than ``least_share`` of the multiple-choice prompts follow one pattern.

    Options given with a record are located in its prompt; otherwise they are found after labels
    (``(a) ... (b) ...``, ``A. ... B. ...``, ...). The label style, the option format and the separator
    must agree; the text every prompt has before its question and between question and options
    (``Choose one:``) and after the last option becomes the template's fixed text.
    """
    parsed = []
    for prompt, choices in records:
        choices = list(choices) if choices else _find_options(prompt)
        result = _parse(prompt, choices) if choices else None
        if result is not None:
            parsed.append(result)
    if not parsed:
        return None
    shape, count = Counter(fmt for _, fmt, _ in parsed).most_common(1)[0]
    if count < least_share * len(parsed) or count < 2:
        return None
    mine = [(head, tail) for head, fmt, tail in parsed if fmt == shape]
    heads, tails = [h for h, _ in mine], [t for _, t in mine]
    if len(set(tails)) != 1:
        return None
    lead = _word_prefix(heads)
    rest = [h[len(lead):] for h in heads]
    intro = _word_suffix(rest)
    if any(len(r) <= len(intro) for r in rest):  # no question left between them
        return None
    prompt = lead.replace("{", "{{").replace("}", "}}") + "{question}" + intro.replace("{", "{{").replace("}", "}}")
    prompt += "{choices}" + tails[0].replace("{", "{{").replace("}", "}}")
    return McqTemplate(prompt=prompt, choice=shape.choice, labels=shape.labels, separator=shape.separator)
