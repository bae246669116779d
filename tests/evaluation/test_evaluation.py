"""alm-kit eval: answers, scores, failed items, the answer cache, output files and plots.

A scripted stand-in for the engine tests the bookkeeping (what is asked, cached, failed, scored);
the CLI test at the end runs a real toy checkpoint saved here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from alm_kit.config.schema import GenerationConfig
from alm_kit.evaluation.runner import evaluate_benchmark
from alm_kit.inference.engine import GenerationError
from tests.conftest import write_tone

ITEMS = [  # MMAU records; "say" is what the scripted model answers
    {"id": "q1", "audio_id": "a/1.wav", "question": "Which animal?", "choices": ["dog", "hot dog", "cat"],
     "answer": "dog", "task": "sound", "difficulty": "easy", "say": "A dog."},
    {"id": "q2", "audio_id": "a/2.wav", "question": "Which animal now?", "choices": ["dog", "hot dog", "cat"],
     "answer": "dog", "task": "sound", "difficulty": "hard", "say": "a hot dog"},     # word of a wrong option
    {"id": "q3", "audio_id": "a/3.wav", "question": "Which key?", "choices": ["C major", "A minor"],
     "answer": "A minor", "task": "music", "difficulty": "easy", "say": "a minor."},  # case, punctuation
    {"id": "q4", "audio_id": "a/missing.wav", "question": "Gone?", "choices": ["yes", "no"], "answer": "yes",
     "task": "music", "difficulty": "hard", "say": "yes"},
    {"id": "q5", "audio_id": "a/corrupt.wav", "question": "Broken?", "choices": ["yes", "no"], "answer": "no",
     "task": "speech", "difficulty": "easy", "say": "no"},
]


class ScriptedEngine:
    """Stands in for alm_kit.inference.engine.generate: answers by question, fails on 'corrupt' audio."""

    def __init__(self):
        self.asked: list[str] = []
        self.say = {r["question"]: r["say"] for r in ITEMS}

    def __call__(self, model, requests, gen):
        for r in requests:
            if any("corrupt" in str(a) for a in r.audio):
                raise GenerationError(f"example {r.id}: cannot decode audio file {r.audio[0]}")
        self.asked += [r.id for r in requests]
        return [self.say[r.prompt.split("\n")[0].split(" a) ")[0]] for r in requests]  # mellow or chat prompt


@pytest.fixture
def bench(tmp_path):
    (tmp_path / "a").mkdir()
    for i in (1, 2, 3):
        write_tone(tmp_path / "a" / f"{i}.wav", 300.0 * i, 0.5)
    (tmp_path / "a" / "corrupt.wav").write_bytes(b"not audio")
    path = tmp_path / "mini.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "say"} for r in ITEMS]))
    return path


@pytest.fixture
def engine(monkeypatch):
    scripted = ScriptedEngine()
    monkeypatch.setattr("alm_kit.inference.engine.generate", scripted)
    return scripted


FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(layout=SimpleNamespace(name="prefix")),
                             device=torch.device("cpu"))


def test_scores_lists_failures_and_writes_files(bench, engine, tmp_path):
    out = tmp_path / "out"
    result = evaluate_benchmark(FAKE_MODEL, GenerationConfig(batch_size=4), bench, checkpoint="ck1", out_dir=out,
                                progress=False)
    assert result.correct == [True, False, True, False, False]
    assert sorted(engine.asked) == ["q1", "q2", "q3"]  # q5 failed inside its batch, q4 was never asked
    assert [f["id"] for f in result.failed] == ["q4", "q5"]
    assert "audio file not found" in result.failed[0]["error"] and "cannot decode" in result.failed[1]["error"]
    table = result.table
    # "A dog." and "a hot dog" are not exactly an option ("a minor." is: case and punctuation aside)
    assert table["overall"] == {"correct": 2, "total": 5, "accuracy": 0.4, "failed": 2, "not_a_choice": 2}
    assert table["task"]["music"] == {"correct": 1, "total": 2, "accuracy": 0.5, "failed": 1, "not_a_choice": 0}
    assert table["task"]["sound"]["not_a_choice"] == 2
    assert [k for k in table if k != "overall"] == ["task", "difficulty"]
    # the annotated file: every item asked, MMAU's official key, "" for failed items (the official script counts
    # them wrong too); re-scoring it with the rule gives the same table
    rows = json.loads((out / "mini.predictions.json").read_text())
    assert [r["model_output"] for r in rows] == ["A dog.", "a hot dog", "a minor.", "", ""]
    assert all(r["model_prediction"] == r["model_output"] for r in rows)
    summary = json.loads((out / "results.json").read_text())
    assert summary["table"] == table and summary["format"] == "mmau" and summary["template"] == "mellow"
    assert [p["correct"] for p in summary["predictions"]] == result.correct
    assert [p["is_choice"] for p in summary["predictions"]] == [False, False, True, False, False]
    assert "**overall: 40.00%** (2 / 5, 2 failed, 2 not a choice)" in result.markdown


def test_rerun_reuses_answers_of_the_same_checkpoint_and_settings(bench, engine, tmp_path):
    out = tmp_path / "out"
    gen = GenerationConfig(batch_size=2)
    evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False)
    engine.asked.clear()
    again = evaluate_benchmark(FAKE_MODEL, dataclasses.replace(gen, batch_size=8, encoder_batch=1), bench, checkpoint="ck1",
                               out_dir=out, progress=False)
    assert engine.asked == [] and again.reused == 3 and again.correct == [True, False, True, False, False]
    # failed items are retried: the missing file appears
    write_tone(bench.parent / "a" / "missing.wav", 500.0, 0.5)
    evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False)
    assert engine.asked == ["q4"]
    # another checkpoint, another setting or another template: asked again
    for checkpoint, changed in (("ck2", gen), ("ck1", dataclasses.replace(gen, max_new_tokens=5)),
                                ("ck1", dataclasses.replace(gen, mcq_template="chat"))):
        engine.asked.clear()
        evaluate_benchmark(FAKE_MODEL, changed, bench, checkpoint=checkpoint, out_dir=out, progress=False, limit=2)
        assert sorted(engine.asked) == ["q1", "q2"], (checkpoint, changed)
    # --fresh (reuse=False) asks everything again
    engine.asked.clear()
    evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False, reuse=False, limit=3)
    assert sorted(engine.asked) == ["q1", "q2", "q3"]


def test_answers_are_keyed_on_the_audio_content_not_its_path(bench, engine, tmp_path):
    out = tmp_path / "out"
    gen = GenerationConfig(batch_size=2)
    evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False, limit=3)
    # new bytes under the same names: those two items are answered again, the third is reused
    write_tone(bench.parent / "a" / "1.wav", 1234.0, 0.5)
    write_tone(bench.parent / "a" / "3.wav", 777.0, 0.7)
    engine.asked.clear()
    again = evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False, limit=3)
    assert sorted(engine.asked) == ["q1", "q3"] and again.reused == 1
    # the same bytes again: everything reused
    engine.asked.clear()
    assert evaluate_benchmark(FAKE_MODEL, gen, bench, checkpoint="ck1", out_dir=out, progress=False,
                              limit=3).reused == 3 and engine.asked == []


def test_option_match_formats_score_exact_options(tmp_path, engine):
    (tmp_path / "question").mkdir()
    (tmp_path / "audio").mkdir()
    rows = []
    for i, say in enumerate(["B", "happy.", "A. happy", "(b) Happy", "happy and sad"]):
        write_tone(tmp_path / "audio" / f"{i}.wav", 400.0, 0.3)
        rows.append({"id": f"s{i}", "audio_path": f"./audio/{i}.wav", "question": f"Emotion {i}?", "choice_a": "sad",
                     "choice_b": "happy", "answer_gt": "happy", "category": "para", "sub-category": "emotion"})
        engine.say[f"Emotion {i}?"] = say
    path = tmp_path / "question" / "mmsu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_benchmark(FAKE_MODEL, GenerationConfig(), path, out_dir=tmp_path / "out", progress=False)
    assert result.correct == [True, True, False, True, False]
    annotated = [json.loads(line) for line in (tmp_path / "out" / "mmsu.predictions.jsonl").read_text().splitlines()]
    assert [r["response"] for r in annotated] == ["B", "happy.", "A. happy", "(b) Happy", "happy and sad"]


def test_bar_charts_per_grouping(tmp_path):
    pytest.importorskip("matplotlib")
    from alm_kit.evaluation.plots import plot_table
    from alm_kit.evaluation.scoring import accuracy_table

    table = accuracy_table([{"task": "a", "difficulty": "easy"}, {"task": "b", "difficulty": "hard"}],
                           [True, False], [False, False])
    paths = plot_table(table, tmp_path / "plots", "mmau")
    assert [p.name for p in paths] == ["difficulty.png", "task.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ---------------------------------------------------------------- the CLI with a real toy checkpoint
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from alm_kit.checkpoint import save_checkpoint
    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.model import build_model
    from tests.conftest import tiny_recipe_dict

    recipe = recipe_from_dict(tiny_recipe_dict(**{"generation.max_new_tokens": 3}))
    return save_checkpoint(build_model(recipe.model), recipe, tmp_path_factory.mktemp("eval") / "ckpt")


def test_cli_eval_on_two_audio_jsonl(checkpoint, tmp_path, capsys):
    from alm_kit.cli import EXIT_FAILED_ITEMS, main

    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(3):
        write_tone(tmp_path / "clips" / f"{i}.wav", 300.0 + 200 * i, 0.8)
        rows.append({"id": f"p{i}", "audio": [f"clips/{i}.wav", f"clips/{(i + 1) % 3}.wav"],
                     "question": "which tone is higher?", "choices": ["first", "second"],
                     "answer": "first" if i == 2 else "second", "task": "pitch" if i else "other"})
    rows.append({"id": "gone", "audio": ["clips/none.wav", "clips/0.wav"], "question": "which tone is higher?",
                 "choices": ["first", "second"], "answer": "first", "task": "pitch"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(checkpoint), str(path), "--quiet"]) == EXIT_FAILED_ITEMS  # finished, one item failed
    captured = capsys.readouterr()
    assert "### jsonl: pairs.jsonl (4 items, string_match)" in captured.out
    assert "| pitch |" in captured.out and "1 item(s) failed" in captured.err and "gone: audio file not found" in captured.err
    out = checkpoint / "eval" / "pairs"  # default output folder
    summary = json.loads((out / "results.json").read_text())
    assert summary["items"] == 4 and summary["table"]["overall"]["failed"] == 1 and summary["template"] == "mellow"
    # answers of the random model that are not exactly an option are counted as such (the failed item apart)
    strays = [p for p in summary["predictions"] if p["id"] != "gone" and not p["is_choice"]]
    assert strays and summary["table"]["overall"]["not_a_choice"] == len(strays)
    assert f"{len(strays)} not a choice" in captured.out
    annotated = [json.loads(line) for line in (out / "pairs.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in annotated] == ["p0", "p1", "p2", "gone"]
    assert all(isinstance(r["model_prediction"], str) for r in annotated) and annotated[3]["model_prediction"] == ""
    # the same run again: nothing is generated
    plot = ["--plot"] if importlib.util.find_spec("matplotlib") else []
    assert main(["eval", str(checkpoint), str(path), "--quiet", *plot]) == EXIT_FAILED_ITEMS
    assert "3 answer(s) reused" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["predictions"] == summary["predictions"]
    if plot:
        assert (out / "plots" / "task.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_plot_without_matplotlib_fails_before_the_run(checkpoint, tmp_path, capsys, monkeypatch):
    from alm_kit.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"audio": "x.wav", "question": "q", "choices": ["a", "b"], "answer": "a"}) + "\n")
    assert main(["eval", str(checkpoint), str(path), "--plot", "--out", str(tmp_path / "out")]) == 2
    assert "--plot needs matplotlib: pip install 'alm-kit[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_eval_errors_are_one_line(checkpoint, tmp_path, capsys):
    from alm_kit.cli import main

    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"wav": "x.wav"}]))
    assert main(["eval", str(checkpoint), str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: unknown benchmark format")
    path.write_text(json.dumps([{"audio": "x.wav", "question": "q", "choices": ["a", "b"], "answer": "a"}]))
    assert main(["eval", str(checkpoint), str(path), "--template", "{question}"]) == 2
    assert "mcq_template must be one of" in capsys.readouterr().err


def test_cli_eval_asks_in_the_style_of_the_training_prompts(checkpoint, tmp_path, capsys):
    """--template-from-data recovers the template from a training manifest; --template takes a mapping."""
    from alm_kit.cli import main

    (tmp_path / "clips").mkdir()
    write_tone(tmp_path / "clips" / "0.wav", 400.0, 0.5)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"audio": "clips/0.wav", "prompt": f"{q} Choose one: (a) {a} (b) {b}",
                                         "response": a}) + "\n"
                             for q, a, b in [("How many beeps?", "two", "one"), ("Which is louder?", "first",
                                                                                 "second")]))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "x", "audio": "clips/0.wav", "question": "Is it a tone?",
                                 "choices": ["yes", "no"], "answer": "yes"}) + "\n")
    out = tmp_path / "out"
    args = ["eval", str(checkpoint), str(bench), "--quiet", "--out", str(out)]
    assert main([*args, "--template-from-data", str(train)]) == 0
    assert f"template from {train}" in capsys.readouterr().err
    expected = {"prompt": "{question} Choose one: {choices}", "choice": "({label}) {choice}", "labels": "lower",
                "separator": " "}
    assert json.loads((out / "results.json").read_text())["template"] == expected
    # the same template given by hand: the same run (answers reused)
    assert main([*args, "--template", json.dumps(expected)]) == 0
    assert "1 answer(s) reused" in capsys.readouterr().out
    # the checkpoint's recipe names no training data, and a file of free-form prompts has no pattern
    assert main([*args, "--template-from-data"]) == 2
    assert "names no data.train; give the training manifest" in capsys.readouterr().err
    free = tmp_path / "free.jsonl"
    free.write_text(json.dumps({"audio": "clips/0.wav", "prompt": "describe it", "response": "a tone"}) + "\n")
    assert main([*args, "--template-from-data", str(free)]) == 2
    assert "follow no multiple-choice pattern" in capsys.readouterr().err
