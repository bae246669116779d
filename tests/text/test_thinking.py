"""Thinking blocks and the CoTA answer format: rendering, splitting, reading sections back, response templates."""

from __future__ import annotations

import pytest

from alm_kit.data.manifest import Example
from alm_kit.errors import ManifestError
from alm_kit.text.templates import apply_response_template, render_response, template_fields
from alm_kit.text.thinking import cota_sections, format_cota, split_thinking

COTA = {"plan": "Count the beeps.", "analysis": "Three short\nbeeps at 1 kHz.", "logic": "Three is option b.",
        "summary": "There are three beeps.", "answer": "three"}


def test_cota_renders_sections_inside_one_thinking_block_and_reads_back():
    text = format_cota(**COTA)
    assert text.startswith("<think>\nPlan: Count the beeps.\nAudio Analysis: Three short beeps at 1 kHz.\n")
    assert text.endswith("</think>\n\nthree")
    thought, answer = split_thinking(text)
    assert answer == "three"
    sections = cota_sections(thought)
    assert list(sections) == ["plan", "analysis", "logic", "summary"]
    assert sections["analysis"] == "Three short beeps at 1 kHz."  # newlines inside a section are folded
    assert sections["logic"] == "Three is option b."


@pytest.mark.parametrize("text, expected", [
    ("<think>\nhmm\n</think>\n\nthe answer", ("hmm", "the answer")),
    ("hmm</think>answer", ("hmm", "answer")),                      # opening tag in the prompt
    ("<think>\n\n</think>\n\nyes", ("", "yes")),                    # Qwen3 with thinking off
    ("<think>a</think>b</think>c", ("a</think>b", "c")),            # the last closing tag counts
    ("<think>still thinking when the budget ran out", ("still thinking when the budget ran out", "")),
    ("  plain answer ", ("", "plain answer")),
])
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_cota_sections_ignore_headings_inside_lines_and_missing_sections():
    thought = "preamble\nPlan: look. Logic: not a heading here\nSummary: done"
    assert cota_sections(thought) == {"plan": "look. Logic: not a heading here", "summary": "done"}


def test_response_templates_builtin_and_format_strings():
    assert render_response("cota", COTA) == format_cota(**COTA)
    assert render_response("thinking", {"thought": "t", "answer": "a"}) == "<think>\nt\n</think>\n\na"
    assert render_response("Answer: {answer} ({plan})", COTA) == "Answer: three (Count the beeps.)"
    assert template_fields("{a} and {b} and {a}") == ("a", "b")
    for bad in ("{answer.__class__}", "{0}", "no placeholders", "{unclosed"):
        with pytest.raises(ValueError, match="response_template"):
            template_fields(bad)


def test_apply_response_template_names_the_record_that_lacks_a_field():
    good = Example(id="a", audio=[], prompt="q", response=None, source="m.jsonl:1", meta=dict(COTA))
    [out] = apply_response_template([good], "cota")
    assert out.response == format_cota(**COTA) and good.response is None
    assert apply_response_template([good], None) == [good]
    bad = Example(id="b", audio=[], prompt="q", source="m.jsonl:7", meta={"answer": "x", "plan": "p"})
    with pytest.raises(ManifestError, match=r"m.jsonl:7: .*needs field\(s\) analysis, logic, summary"):
        apply_response_template([good, bad], "cota")
