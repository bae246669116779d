"""Scoring rules (MMAU/MMAR string match, MMSU/AIR-Bench option match), accuracy tables, MCQ prompts."""

from __future__ import annotations

import pytest

from alm_kit.evaluation.prompts import check_template, mcq_prompt, resolve_template
from alm_kit.evaluation.scoring import (
    accuracy_table,
    chosen_option,
    format_table,
    names_a_choice,
    option_match,
    string_match,
)

PEOPLE = ["man", "woman", "man and woman", "child"]


@pytest.mark.parametrize("prediction, expected", [
    ("man", True),
    ("A MAN.", True),                       # case and punctuation do not matter
    ("the speaker is a man!", True),        # extra words are fine unless they belong to a wrong option
    ("woman", False),                       # "man" is a word of its own, not a substring of "woman"
    ("a man and a woman", False),           # contains "woman" (and "and"), words only wrong options have
    ("man, or maybe a child", False),
    ("", False),
    ("!!!", False),                         # no word tokens at all
])
def test_string_match_answer_words_inside_wrong_options(prediction, expected):
    assert string_match("man", prediction, PEOPLE) is expected


def test_string_match_wrong_options_sharing_the_answers_words():
    choices = ["two", "three", "two or three"]
    assert string_match("two or three", "Two or three.", choices)
    assert not string_match("two or three", "two", choices)          # answer token "or", "three" missing
    assert string_match("two or three", "three or two", choices)     # word order is not checked
    # the official rule's quirk: an option letter in the answer text is a word like any other
    assert not string_match("dog barking", "a) dog barking", ["dog barking", "a car"])
    assert string_match("dog barking", "a) dog barking", ["dog barking", "car engine"])
    # an option whose words equal the answer's (a duplicate) is not a wrong option
    assert string_match("Dog!", "dog", ["dog", "Dog!", "cat"])
    # underscores and digits are word characters (\w)
    assert not string_match("1_000", "1 000", ["1_000", "2_000"])


@pytest.mark.parametrize("prediction, expected", [
    ("Happy", True), ("happy.", True), ("  HAPPY!  ", True), ('"happy"', True),
    ("B", True), ("b.", True), ("(B)", True), ("[b]", True), ("B:", True),
    ("B. Happy", True), ("b) happy", True),
    ("B. Sad", False),                      # letter and text disagree
    ("A", False), ("sad", False),
    ("happy or sad", False), ("The answer is B.", False), ("I think happy", False),
    ("E", False),                           # no option E
    ("", False),
])
def test_option_match(prediction, expected):
    assert option_match("Happy", prediction, ["Sad", "Happy", "Angry", "Neutral"]) is expected


def test_chosen_option_prefers_an_options_full_text_over_a_letter():
    choices = ["a", "b", "c"]  # options that are single letters themselves
    assert chosen_option("c", choices) == 2
    assert chosen_option("(a)", choices) == 0
    assert chosen_option("B. b", choices) == 1
    assert chosen_option("A. b", choices) is None


def test_accuracy_table_groups_and_failed_items():
    groups = [{"task": "sound", "difficulty": "easy"}, {"task": "sound", "difficulty": "hard"},
              {"task": "music", "difficulty": "easy"}, {"task": "music"}]
    table = accuracy_table(groups, [True, False, True, False], [False, False, False, True], order=("task",))
    assert table["overall"] == {"correct": 2, "total": 4, "accuracy": 0.5, "failed": 1, "not_a_choice": 0}
    assert [k for k in table if k != "overall"] == ["task", "difficulty"]
    assert table["task"]["music"] == {"correct": 1, "total": 2, "accuracy": 0.5, "failed": 1, "not_a_choice": 0}
    assert table["difficulty"] == {"easy": {"correct": 2, "total": 2, "accuracy": 1.0, "failed": 0, "not_a_choice": 0},
                                   "hard": {"correct": 0, "total": 1, "accuracy": 0.0, "failed": 0, "not_a_choice": 0}}
    text = format_table(table, "mmau: x.json")
    assert text.startswith("### mmau: x.json\n\n**overall: 50.00%** (2 / 4, 1 failed)")
    assert "| music | 50.00% | 1 / 2 (1 failed) |" in text and "| hard | 0.00% | 0 / 1 |" in text


def test_run_on_answers_are_counted_as_not_a_choice():
    choices = ["one", "two", "three", "four"]
    answers = ["one", "oneone", "one one", "", "Two.", "b", "it is three"]
    flags = [not names_a_choice(a, choices) for a in answers]
    assert flags == [False, True, True, True, False, False, True]
    # string_match scores "one one" correct: the table still says that it is not a choice
    correct = [string_match("one", a, choices) for a in answers]
    assert correct[:3] == [True, False, True]
    groups = [{"task": "count"}] * 5 + [{"task": "pitch"}] * 2
    table = accuracy_table(groups, correct, [False] * 7, order=("task",), not_a_choice=flags)
    assert table["overall"]["not_a_choice"] == 4
    assert table["task"]["count"]["not_a_choice"] == 3 and table["task"]["pitch"]["not_a_choice"] == 1
    text = format_table(table)
    assert text.splitlines()[0] == "**overall: 28.57%** (2 / 7, 4 not a choice)"
    assert "| count | 40.00% | 2 / 5 (3 not a choice) |" in text


def test_mcq_prompts():
    assert mcq_prompt("mellow", " Which bird? ", ["owl", "crow"]) == "Which bird? a) owl b) crow"
    chat = mcq_prompt("chat", "Which bird?", ["owl", "crow", "jay"])
    assert chat == "Which bird?\nChoices:\nA. owl\nB. crow\nC. jay\nAnswer with the text of the correct choice."
    own = mcq_prompt("Q: {question}\n{choices}\nPick {letters}.", "Which?", ["x", "y", "z"])
    assert own == "Q: Which?\nA. x\nB. y\nC. z\nPick A, B or C."
    assert resolve_template("auto", "prefix") == "mellow" and resolve_template("auto", "placeholder") == "chat"
    assert resolve_template("mellow", "placeholder") == "mellow"


def test_bad_templates_are_config_errors():
    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.config.parse import ConfigError
    from tests.conftest import tiny_recipe_dict

    with pytest.raises(ValueError, match=r"one of auto, mellow, chat or a template containing .*missing \{choices\}"):
        check_template("{question} only")
    with pytest.raises(ValueError, match="bad template"):
        check_template("{question} {choices} {answer}")
    with pytest.raises(ConfigError, match="generation.*mcq_template"):
        recipe_from_dict(tiny_recipe_dict(**{"generation.mcq_template": "melow"}))


def test_thinking_answers_are_scored_on_the_answer_not_the_reasoning():
    from alm_kit.evaluation.runner import _answer_part

    text = "<think>\nIt could be a dog or a car; the rhythm says dog.\n</think>\n\ncar engine"
    assert _answer_part(text) == "car engine"
    assert _answer_part("<think>\nstill thinking about the dog") == ""  # never closed: no answer
    assert _answer_part("plain answer") == "plain answer"
