"""How a multiple-choice item becomes a prompt: the recipe's ``generation.mcq_template``.

Built in:

* ``mellow``: ``question a) x b) y c) z`` on one line, the style Mellow was trained on (ReasonAQA).
* ``chat``: the question, the options one per line as ``A. x``, and an instruction to answer with the
  option's text (a text answer scores under MMAU/MMAR's string match as well as under option match).
* ``auto`` (default): ``mellow`` for the ``prefix`` layout (plain-text prompts), ``chat`` for any
  other layout (chat-template decoders).

Any other value is a template of its own with ``{question}`` and ``{choices}`` (the options one per
line, ``A. x``) and optionally ``{letters}`` (``A, B, C or D``).
"""

from __future__ import annotations

from collections.abc import Sequence

BUILTIN = ("auto", "mellow", "chat")
CHAT = "{question}\nChoices:\n{choices}\nAnswer with the text of the correct choice."


def check_template(template: str) -> None:
    """Raise ValueError for a template that is neither built in nor has the needed fields."""
    if template in BUILTIN:
        return
    missing = [f for f in ("{question}", "{choices}") if f not in template]
    if missing:
        raise ValueError(f"mcq_template must be one of {', '.join(BUILTIN)} or a template containing "
                         f"{{question}} and {{choices}} (missing {', '.join(missing)})")
    try:
        template.format(question="q", choices="c", letters="l")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"mcq_template: bad template ({exc}); only {{question}}, {{choices}} and {{letters}} "
                         "are filled in (write {{ and }} for literal braces)") from None


def resolve_template(template: str, layout_name: str) -> str:
    """``auto`` -> ``mellow`` for the prefix layout, else ``chat``."""
    if template == "auto":
        return "mellow" if layout_name == "prefix" else "chat"
    return template


def mcq_prompt(template: str, question: str, choices: Sequence[str]) -> str:
    """The prompt for one item (``template`` already resolved, i.e. not ``auto``)."""
    question = question.strip()
    if template == "mellow":
        return " ".join([question] + [f"{chr(97 + i)}) {c}" for i, c in enumerate(choices)])
    letters = [chr(65 + i) for i in range(len(choices))]
    lines = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, choices))
    spoken = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else "".join(letters)
    return (CHAT if template == "chat" else template).format(question=question, choices=lines, letters=spoken)
