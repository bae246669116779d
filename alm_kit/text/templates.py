"""Response templates: build each training example's response text from fields of its manifest record.

``data.response_template`` in a recipe is either a built-in name or a format string:

* ``cota``: the CoTA answer (``alm_kit.text.thinking.format_cota``) from the fields ``plan``,
  ``analysis``, ``logic``, ``summary`` and ``answer``;
* ``thinking``: ``<think>{thought}</think>`` then ``{answer}`` (Qwen3's layout);
* any other string is a format string over the record's fields, e.g. ``"Answer: {answer}"``;
  only plain ``{name}`` placeholders are allowed (no attribute or index access).

Fields are the record's keys (``prompt``, ``response`` when present, and every extra key of the
JSON object). A missing field is an error that names the manifest line.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping
from typing import Any

from alm_kit.errors import ManifestError
from alm_kit.text.thinking import COTA_SECTIONS, format_cota, format_thinking

#: built-in templates: (fields they read, how they render)
BUILTIN_TEMPLATES: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "cota": (tuple(name for name, _ in COTA_SECTIONS) + ("answer",), format_cota),
    "thinking": (("thought", "answer"), format_thinking),
}


def template_fields(template: str) -> tuple[str, ...]:
    """The record fields a template reads; ValueError for a malformed format string."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template][0]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"response_template {template!r} is not a valid format string: {exc}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"response_template {template!r}: placeholder {{{name}}} must be a plain field name "
                             f"(built-in templates: {', '.join(BUILTIN_TEMPLATES)})")
        names.append(name)
    if not names:
        raise ValueError(f"response_template {template!r} is neither a built-in template "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor a format string with {{field}} placeholders")
    return tuple(dict.fromkeys(names))


def render_response(template: str, fields: Mapping[str, Any], where: str = "") -> str:
    """The response text for one record."""
    needed = template_fields(template)
    missing = [name for name in needed if fields.get(name) is None]
    if missing:
        prefix = f"{where}: " if where else ""
        raise ManifestError(f"{prefix}response_template {template!r} needs field(s) {', '.join(missing)} "
                            f"(the record has: {', '.join(k for k, v in fields.items() if v is not None)})")
    values = {name: str(fields[name]) for name in needed}
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template][1](**values)
    return template.format(**values)


def apply_response_template(examples: list, template: str | None) -> list:
    """Examples (``alm_kit.data.manifest.Example``) with ``response`` built by ``template`` (None: unchanged)."""
    if template is None:
        return examples
    out = []
    for example in examples:
        fields = {"prompt": example.prompt, "response": example.response, **example.meta}
        out.append(dataclasses.replace(example, response=render_response(template, fields,
                                                                          example.source or example.id)))
    return out
