"""alm-kit compare: train two tiny recipes (and reuse a run), one test file, table + CSV + plot."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from alm_kit.cli import main
from alm_kit.config.loader import load_recipe
from alm_kit.model import build_model
from alm_kit.workflows.compare import CompareResult, format_markdown, group_columns
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
    code = main(["compare", *map(str, recipes), "--eval", str(root / "test.json"), "--steps", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return root, recipes, out


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_writes_table_csv_and_plot(compared, capsys):
    root, recipes, out = compared
    rows = read_csv(out / "compare.csv")
    assert [r["name"] for r in rows] == list(PROJECTORS)
    assert list(rows[0]) == ["name", "source", "params_trainable", "params_total", "audio_tokens_per_clip",
                             "train_samples_per_s", "peak_memory_mib", "memory_kind", "accuracy",
                             "accuracy[sub-category=pitch]", "accuracy[sub-category=tone]"]  # one task: no column
    for row, recipe_path in zip(rows, recipes):
        model = build_model(load_recipe(recipe_path).model)
        assert int(row["params_total"]) == sum(p.numel() for p in model.parameters())
        assert int(row["params_trainable"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert int(row["params_trainable"]) < int(row["params_total"])  # the encoder is frozen
        frames = model.encoders["htsat"].info.num_frames
        expected = {"tiny-mlp": 1 + frames // 8, "tiny-perceiver": 3}[row["name"]]
        assert float(row["audio_tokens_per_clip"]) == expected
        assert float(row["train_samples_per_s"]) > 0
        evaluation = json.loads((out / "runs" / row["name"] / "compare_eval.json").read_text())
        table = evaluation["table"]
        assert float(row["accuracy"]) == pytest.approx(table["overall"]["accuracy"], abs=1e-4)
        assert float(row["accuracy[sub-category=tone]"]) == pytest.approx(
            table["sub-category"]["tone"]["accuracy"], abs=1e-4)
        assert len(evaluation["predictions"]) == 6
        metrics = [json.loads(x) for x in (out / "runs" / row["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # --steps 2 reached every recipe
    if Path("/proc/self/clear_refs").exists():
        assert all(float(r["peak_memory_mib"]) > 0 and r["memory_kind"] == "process RSS" for r in rows)
    markdown = (out / "compare.md").read_text()
    assert "| model | params trainable / total | audio tokens / clip |" in markdown
    assert all(f"| {name} |" in markdown for name in PROJECTORS)
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "compare.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    else:
        assert not (out / "compare.png").exists()


@pytest.mark.slow
def test_compare_reuses_an_existing_run(compared, tmp_path):
    root, _, out = compared
    first = read_csv(out / "compare.csv")[0]
    again = tmp_path / "again"
    assert main(["compare", str(out / "runs" / "tiny-mlp"), str(out / "runs" / "tiny-mlp"),
                 "--eval", str(root / "test.json"), "--out", str(again), "--quiet"]) == 0
    rows = read_csv(again / "compare.csv")
    assert [r["name"] for r in rows] == ["tiny-mlp", "tiny-mlp-2"]  # same recipe name twice: made unique
    for row in rows:
        for key in ("params_trainable", "params_total", "audio_tokens_per_clip", "accuracy", "train_samples_per_s"):
            assert row[key] == first[key], key  # loaded weights, greedy decoding: the same numbers
        assert row["peak_memory_mib"] == ""  # not trained here


def test_compare_names_a_missing_source(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.yaml"), "--eval", "x.json", "--out", str(tmp_path)]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


def result(name, accuracy, groups) -> CompareResult:
    return CompareResult(name=name, source=name, checkpoint=Path(name), params_trainable=10, params_total=20,
                         audio_tokens_per_clip=12.5, accuracy=accuracy, groups=groups)


def test_markdown_marks_the_best_and_fills_missing_groups():
    same = {"category": {"a": 0.5}, "sub-category": {"a": 0.5}}
    rows = [result("x", 0.5, same), result("y", 0.75, {"category": {"a": 1.0, "b": 0.5},
                                                       "sub-category": {"a": 1.0, "b": 0.5}})]
    assert group_columns(rows) == [("category", "a"), ("category", "b")]  # sub-category repeats category
    text = format_markdown(rows)
    assert "| y | 10 / 20 | 12.5 | — | — | **75.0%** | 100.0% | 50.0% |" in text
    assert "| x | 10 / 20 | 12.5 | — | — | 50.0% | 50.0% | — |" in text
    assert "**" not in format_markdown([result("x", 0.5, {}), result("y", 0.5, {})])
