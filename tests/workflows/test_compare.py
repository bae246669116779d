"""alm-kit compare: train two tiny recipes with two seeds each (and reuse the runs), one test file,
table + per-seed CSV + plot; the statistics on synthetic correctness matrices (no training)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from alm_kit.cli import main
from alm_kit.config.loader import load_recipe
from alm_kit.evaluation.statistics import bootstrap_interval, paired_bootstrap_p
from alm_kit.model import build_model
from alm_kit.workflows.compare import format_markdown
from alm_kit.workflows.comparison import CompareResult, Comparison, SeedRun, group_columns
from tests.conftest import tiny_recipe_dict, write_tone

PROJECTORS = {
    "tiny-mlp": tiny_recipe_dict()["model"]["projector"],  # T frames + latent -> 1 + T / 8 tokens (keep_first)
    "tiny-perceiver": {"name": "perceiver", "params": {"num_latents": 3, "hidden_dim": 16, "num_layers": 1,
                                                       "num_heads": 2, "dropout": 0.0}},
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    rows, items = [], []
    for i in range(6):
        high = i % 2 == 0
        write_tone(root / f"t{i}.wav", 1500.0 if high else 300.0, 2.0)  # full 2 s: every frame valid
        rows.append({"audio": f"t{i}.wav", "prompt": "is the tone high or low?", "response": "high" if high else "low"})
        items.append({"id": f"q{i}", "audio_id": f"t{i}.wav", "question": "is the tone high or low?",
                      "choices": ["high", "low"], "answer": "high" if high else "low",
                      "task": "sound", "sub-category": "pitch" if i < 4 else "tone"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.json").write_text(json.dumps(items))
    recipes = []
    for name, projector in PROJECTORS.items():
        data = tiny_recipe_dict(**{"name": name, "model.projector": projector, "training.max_steps": 50})
        data["data"] = {"train": str(root / "train.jsonl")}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        recipes.append(path)
    out = root / "out"
    code = main(["compare", *map(str, recipes), "--eval", str(root / "test.json"), "--steps", "2", "--seeds", "2",
                 "--set", "training.eval_every=1", "--out", str(out), "--quiet"])
    assert code == 0
    return root, recipes, out


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_writes_table_csv_and_plot(compared, capsys):
    root, recipes, out = compared
    rows = read_csv(out / "compare.csv")
    assert [(r["name"], r["seed"]) for r in rows] == [(n, s) for n in PROJECTORS for s in ("0", "1")]  # every seed
    assert list(rows[0]) == ["name", "seed", "source", "checkpoint", "params_trainable", "params_total",
                             "audio_tokens_per_clip", "train_samples_per_s", "peak_memory_mib", "memory_kind",
                             "accuracy", "accuracy[sub-category=pitch]", "accuracy[sub-category=tone]"]  # one task
    for row in rows:
        recipe_path = recipes[list(PROJECTORS).index(row["name"])]
        model = build_model(load_recipe(recipe_path).model)
        assert int(row["params_total"]) == sum(p.numel() for p in model.parameters())
        assert int(row["params_trainable"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert int(row["params_trainable"]) < int(row["params_total"])  # the encoder is frozen
        frames = model.encoders["htsat"].info.num_frames
        expected = {"tiny-mlp": 1 + frames // 8, "tiny-perceiver": 3}[row["name"]]
        assert float(row["audio_tokens_per_clip"]) == expected
        assert float(row["train_samples_per_s"]) > 0
        run = out / "runs" / row["name"] / f"seed-{row['seed']}"
        assert Path(row["checkpoint"]).is_relative_to(run)
        assert yaml.safe_load((Path(row["checkpoint"]) / "recipe.yaml").read_text())["training"]["seed"] == int(
            row["seed"])  # trained with its own seed
        evaluation = json.loads((run / "compare_eval.json").read_text())
        correct = [p["correct"] for p in evaluation["predictions"]]
        assert len(correct) == 6
        assert float(row["accuracy"]) == pytest.approx(evaluation["table"]["overall"]["accuracy"])
        assert float(row["accuracy[sub-category=tone]"]) == pytest.approx(
            evaluation["table"]["sub-category"]["tone"]["accuracy"])
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # --steps 2 reached every run
        assert [m["step"] for m in metrics if "eval_accuracy" in m] == [1, 2]  # the test file, during training
    for name in PROJECTORS:  # the two seeds are two trainings, not one run counted twice
        records = [[json.loads(x) for x in (out / "runs" / name / f"seed-{s}" / "metrics.jsonl").read_text()
                    .splitlines()] for s in (0, 1)]
        losses = [[r["loss"] for r in seed if "loss" in r] for seed in records]
        assert losses[0] != losses[1]
    if Path("/proc/self/clear_refs").exists():
        assert all(float(r["peak_memory_mib"]) > 0 and r["memory_kind"] == "process RSS" for r in rows)
    summary = read_csv(out / "compare_summary.csv")
    assert [(r["name"], r["column"]) for r in summary] == [
        (n, c) for n in PROJECTORS for c in ("accuracy", "accuracy[sub-category=pitch]", "accuracy[sub-category=tone]")]
    for r in summary:
        seeds = [float(x[r["column"]]) for x in rows if x["name"] == r["name"]]
        assert float(r["mean"]) == pytest.approx(np.mean(seeds)) and r["seeds"] == "2"
        assert float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
    markdown = (out / "compare.md").read_text()
    assert "| model | params trainable / total | audio tokens / clip |" in markdown
    assert "95% bootstrap interval over test items and 2 seeds" in markdown
    assert all(f"| {name} |" in markdown for name in PROJECTORS)
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "compare.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    else:
        assert not (out / "compare.png").exists()


@pytest.mark.slow
def test_compare_reuses_existing_runs(compared, tmp_path):
    root, _, out = compared
    first = read_csv(out / "compare.csv")
    again = tmp_path / "again"
    assert main(["compare", str(out / "runs" / "tiny-mlp"), str(out / "runs" / "tiny-mlp" / "seed-1"),
                 "--eval", str(root / "test.json"), "--out", str(again), "--quiet"]) == 0
    rows = read_csv(again / "compare.csv")
    # compare's own folder of seed-N runs is one model with those seeds; the same recipe again is made unique
    assert [(r["name"], r["seed"]) for r in rows] == [("tiny-mlp", "0"), ("tiny-mlp", "1"), ("tiny-mlp-2", "1")]
    trained = {r["seed"]: r for r in first if r["name"] == "tiny-mlp"}
    for row in rows:
        for key in ("params_trainable", "params_total", "audio_tokens_per_clip", "accuracy", "train_samples_per_s"):
            assert row[key] == trained[row["seed"]][key], key  # loaded weights, greedy decoding: the same numbers
        assert row["peak_memory_mib"] == ""  # not trained here


def test_compare_names_a_missing_source(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.yaml"), "--eval", "x.json", "--out", str(tmp_path)]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


def test_compare_refuses_zero_seeds(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
    assert main(["compare", str(recipe), "--eval", "x.json", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- statistics, no training
def comparison(matrices: dict[str, np.ndarray], groups: list[dict] | None = None) -> Comparison:
    """A comparison of models given by their (seeds, items) correctness, on items with 4 choices."""
    items = next(iter(matrices.values())).shape[1]
    results = [CompareResult(name=name, source=name, params_trainable=10, params_total=20, audio_tokens_per_clip=12.5,
                             runs=[SeedRun(seed=s, checkpoint=Path(name), correct=list(row)) for s, row in
                                   enumerate(matrix.astype(bool))])
               for name, matrix in matrices.items()]
    return Comparison(results, groups or [{} for _ in range(items)], chance=0.25)


def guessing(rng, seeds: int = 3, items: int = 400, chance: float = 0.25) -> np.ndarray:
    return (rng.random((seeds, items)) < chance).astype(float)


def test_interval_of_a_model_answering_at_random_covers_chance():
    rng = np.random.default_rng(0)
    trials = [bootstrap_interval(guessing(rng), seed=k) for k in range(40)]
    covered = sum(t.low <= 0.25 <= t.high for t in trials)
    assert covered >= 34  # a 95% interval: ~38 of 40 expected, 34 or fewer has probability < 5%
    assert all(t.high - t.low < 0.1 for t in trials)  # and not by being uselessly wide (1200 answers)


def test_two_identical_models_are_never_significantly_different():
    rng = np.random.default_rng(1)
    for trial in range(20):
        matrix = (rng.random((1 + trial % 3, 200)) < rng.uniform(0.2, 0.9)).astype(float)  # 1 to 3 seeds
        assert paired_bootstrap_p(matrix, matrix.copy(), seed=trial) >= 0.05
        cells = comparison({"a": matrix, "b": matrix.copy()}).cells
        assert not any(cell.significant or cell.best for model in cells.values() for cell in model.values())


def test_a_model_always_right_is_better_than_one_at_chance():
    rng = np.random.default_rng(2)
    groups = [{"task": "x" if i % 2 else "y"} for i in range(400)]
    result = comparison({"guess": guessing(rng), "right": np.ones((3, 400))}, groups)
    assert paired_bootstrap_p(np.ones((3, 400)), guessing(rng)) < 0.01
    for column in result.columns:  # overall and each task
        assert result.cells["right"][column].best and result.cells["right"][column].p_vs_best is None
        assert result.cells["guess"][column].significant
    assert "↓" in format_markdown(result)


def test_statistics_are_deterministic_and_count_the_spread_of_seeds():
    rng = np.random.default_rng(3)
    a, b = guessing(rng, chance=0.6), guessing(rng, chance=0.5)
    assert bootstrap_interval(a, seed=7) == bootstrap_interval(a, seed=7)
    assert paired_bootstrap_p(a, b, seed=7) == paired_bootstrap_p(a, b, seed=7)
    # one item set, many seeds that agree: the seeds add no spread, so the interval is that of the items alone
    agreeing = np.repeat(a[:1], 3, axis=0)
    assert bootstrap_interval(agreeing) == bootstrap_interval(a[:1])
    # seeds that disagree: resampling the items alone would give a zero-width interval around 1/3
    disagreeing = bootstrap_interval(np.stack([np.ones(400), np.zeros(400), np.zeros(400)]))
    assert disagreeing.low < 0.1 and disagreeing.high > 0.6


def test_the_paired_test_sees_a_difference_that_overlapping_intervals_hide():
    rng = np.random.default_rng(4)
    # B is A with 60 of its 2000 answers (3%) turned wrong: the intervals overlap, the paired test sees it
    one = guessing(rng, seeds=1, items=2000, chance=0.6)
    worse = one.copy()
    worse[0, np.flatnonzero(one[0])[:60]] = 0
    first, second = bootstrap_interval(one), bootstrap_interval(worse)
    assert second.high > first.low  # the intervals overlap
    assert paired_bootstrap_p(one, worse) < 0.05


def test_markdown_marks_the_best_and_the_significant():
    groups = [{"category": "a", "sub-category": "a"} if i < 60 else {"category": "b", "sub-category": "b"}
              for i in range(100)]
    assert [(c.key, c.name) for c in group_columns(groups)] == [(None, "overall"), ("category", "a"),
                                                                ("category", "b")]  # sub-category repeats category
    x = np.zeros((1, 100))
    y = np.ones((1, 100))
    text = format_markdown(comparison({"x": x, "y": y}, groups))
    assert "| y | 10 / 20 | 12.5 | — | — | **100.0%** (100.0–100.0) | best | **100.0%** (100.0–100.0) |" in text
    assert "| x | 10 / 20 | 12.5 | — | — | 0.0% (0.0–0.0) ↓ | <0.001 |" in text
    assert "**" not in format_markdown(comparison({"x": x, "y": x.copy()}, groups)).split("\n", 1)[1]


def test_models_of_equal_size_are_drawn_side_by_side():
    from alm_kit.workflows.compare_plot import dodge

    moved = dodge([1.59e6, 1.60e6, 1.1e6], 0.9e6, 1.8e6, log=False)
    assert moved[2] == 1.1e6  # far from the others: where it is
    assert moved[1] - moved[0] >= 0.025 * 0.9e6 * 0.999 and (moved[0] + moved[1]) / 2 == pytest.approx(1.595e6)
