"""Scoring rules (MMAU/MMAR string match, MMSU/AIR-Bench option match), accuracy tables, MCQ prompts."""

from __future__ import annotations

import json

import pytest

from alm_kit.evaluation.scoring import (
    accuracy_table,
    chosen_option,
    format_table,
    names_a_choice,
    option_match,
    string_match,
)
from alm_kit.text.mcq import check_template, mcq_prompt, resolve_template

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


def test_mcq_templates_set_the_label_style_the_separator_and_inline_or_one_per_line():
    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.config.parse import ConfigError
    from alm_kit.text.mcq import McqTemplate
    from tests.conftest import tiny_recipe_dict

    inline = McqTemplate(prompt="{question} Choose one: {choices}", choice="({label}) {choice}", labels="lower",
                         separator=" ")
    assert mcq_prompt(inline, "How many beeps?", ["two", "one"]) == "How many beeps? Choose one: (a) two (b) one"
    numbered = McqTemplate(prompt="{question}\n{choices}\nAnswer {letters}.", choice="{label}) {choice}",
                           labels="number")
    assert mcq_prompt(numbered, "Which?", ["x", "y", "z"]) == "Which?\n1) x\n2) y\n3) z\nAnswer 1, 2 or 3."
    assert mcq_prompt(McqTemplate(prompt="{question} [{choices}]", choice="{choice}", separator=" / "), "Q?",
                      ["x", "y"]) == "Q? [x / y]"
    # a recipe sets it as a mapping; mistakes name the key
    recipe = recipe_from_dict(tiny_recipe_dict(**{"generation.mcq_template": {
        "prompt": "{question} Choose one: {choices}", "choice": "({label}) {choice}", "labels": "lower",
        "separator": " "}}))
    assert recipe.generation.mcq_template == inline
    with pytest.raises(ConfigError, match=r"generation.mcq_template.labels: invalid value 'roman'"):
        recipe_from_dict(tiny_recipe_dict(**{"generation.mcq_template": {"prompt": "{question} {choices}",
                                                                         "labels": "roman"}}))
    with pytest.raises(ConfigError, match=r"mcq_template.choice: .*must contain \{choice\}"):
        recipe_from_dict(tiny_recipe_dict(**{"generation.mcq_template": {"prompt": "{question} {choices}",
                                                                         "choice": "{label}"}}))


def test_templates_are_recovered_from_training_prompts(tmp_path):
    from alm_kit.data.synth import synthesize
    from alm_kit.text.mcq import NAMED, McqTemplate, template_from_prompts

    choose = [("How many beeps? Choose one: (a) two (b) one (c) three", ["two", "one", "three"]),
              ("Is the second clip louder than the first? Choose one: (a) yes (b) no", ["yes", "no"]),
              ("Which of two sounds is a dog? Choose one: (a) first (b) two (c) neither", None)]  # options not given
    template = template_from_prompts(choose)
    assert template == McqTemplate(prompt="{question} Choose one: {choices}", choice="({label}) {choice}",
                                   labels="lower", separator=" ")
    assert mcq_prompt(template, "How loud?", ["very", "not"]) == "How loud? Choose one: (a) very (b) not"
    lines = [("Q: how many beeps?\nA. two\nB. one\nAnswer:", None), ("Q: which one?\nA. x y\nB. z\nAnswer:", None)]
    assert template_from_prompts(lines) == McqTemplate(prompt="Q: {question}\n{choices}\nAnswer:")
    # alm-kit's synthetic training set is written in Mellow's style
    report = synthesize(tmp_path / "synth", n_train=12, n_test=2, seed=0, speech=False, progress=False)
    rows = [json.loads(line) for line in report.train_manifest.read_text().splitlines()]
    assert template_from_prompts((r["prompt"], r["choices"]) for r in rows) == NAMED["mellow"]
    # no pattern, or no single one
    assert template_from_prompts([("describe the sound", None), ("what is it?", None)]) is None
    mixed = [choose[0], lines[0], ("Which? A. x B. y", None), ("Where? 1. here 2. there", None)]
    assert template_from_prompts(mixed) is None


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
