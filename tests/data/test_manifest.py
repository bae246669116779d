"""Manifests: alm-kit JSON Lines and Mellow's ReasonAQA; errors give file and line; bad audio skipping."""

from __future__ import annotations

import json

import pytest

from alm_kit.data.manifest import ManifestError, check_audio_files, read_manifest
from tests.conftest import write_tone


def test_jsonl_paths_relative_to_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.jsonl"
    manifest.write_text(json.dumps({"audio": ["a.wav", "b.wav"], "prompt": "p", "response": "r", "task": "t"})
                        + "\n\n" + json.dumps({"id": "x", "audio": "c.wav", "prompt": "q", "response": "s"}) + "\n")
    first, second = read_manifest(manifest)
    assert first.audio == [tmp_path / "sub" / "a.wav", tmp_path / "sub" / "b.wav"]
    assert first.id == "m-1" and first.meta == {"task": "t"} and first.source.endswith("m.jsonl:1")
    assert second.id == "x" and second.source.endswith("m.jsonl:3")


@pytest.mark.parametrize("content,message", [
    ("", "manifest is empty"),
    ('{"audio": "a.wav", "prompt": "p", "response": "r"}\n{not json\n', r"m.jsonl:2: not valid JSON"),
    ('{"audio": "a.wav", "response": "r"}\n', r"m.jsonl:1: missing field 'prompt'"),
    ('{"audio": 3, "prompt": "p", "response": "r"}\n', r"m.jsonl:1: field 'audio' must be str or list"),
    ('[1, 2]\n', r"m.jsonl:1: expected a JSON object"),
])
def test_bad_manifests_name_file_and_line(tmp_path, content, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)


def test_reads_mellow_reasonaqa_records(tmp_path):
    records = [
        {"taskname": "aqa", "filepath1": "x.wav", "filepath2": "y.wav", "caption1": "c1", "caption2": "c2",
         "input": "what differs?", "answer": "the pitch", "subtype": "difference"},
        {"taskname": "aqa", "filepath1": "z.wav", "filepath2": "", "caption1": "c", "caption2": "",
         "input": "what is it?", "answer": "a dog", "subtype": "open"},
    ]
    path = tmp_path / "reasonaqa.json"
    path.write_text(json.dumps(records))
    a, b = read_manifest(path)
    assert a.audio == [tmp_path / "x.wav", tmp_path / "y.wav"] and a.prompt == "what differs?"
    assert a.response == "the pitch" and a.meta["subtype"] == "difference"
    assert b.audio == [tmp_path / "z.wav"]


def test_bad_audio_fails_with_line_and_file_or_is_skipped_and_counted(tmp_path):
    write_tone(tmp_path / "good.wav")
    (tmp_path / "broken.wav").write_bytes(b"nope")
    rows = [{"audio": "good.wav", "prompt": "p", "response": "r"},
            {"audio": "missing.wav", "prompt": "p", "response": "r"},
            {"audio": ["good.wav", "broken.wav"], "prompt": "p", "response": "r"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_manifest(manifest)
    with pytest.raises(ManifestError, match=r"m.jsonl:2: audio file not found: .*missing.wav.*skip_bad_audio"):
        check_audio_files(examples, skip_bad=False)
    kept, problems = check_audio_files(examples, skip_bad=True)
    assert [e.source.rsplit(":", 1)[1] for e in kept] == ["1"]
    assert len(problems) == 2 and "broken.wav" in problems[1]


def test_mcq_file_errors_name_file_and_item(tmp_path):
    from alm_kit.evaluation.formats import read_benchmark

    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"id": "a", "audio_id": "x.wav", "question": "q", "choices": ["a", "b"],
                                 "answer": "a"}, {"id": "b", "audio_id": "x.wav", "question": "q"}]))
    with pytest.raises(ManifestError, match=r"test.json: item 2: missing field\(s\) choices, answer"):
        read_benchmark(path)
    path.write_text(json.dumps([{"audio_id": "x.wav", "question": "q", "choices": ["a", "b"], "answer": "c"}]))
    with pytest.raises(ManifestError, match="is not one of its choices"):
        read_benchmark(path)


def test_skip_bad_audio_also_skips_nan_samples_folders_and_empty_files(tmp_path):
    """Float files are the ones that can hold NaN/inf: they are read in full up front; the rest is the header."""
    import numpy as np
    import soundfile as sf

    write_tone(tmp_path / "good.wav")
    sf.write(str(tmp_path / "nan.wav"), np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "inf.flac"), np.zeros(100, dtype=np.float32), 16000)  # FLAC is integer: header only
    sf.write(str(tmp_path / "fine.wav"), np.full(100, 0.5, dtype=np.float64), 16000, subtype="DOUBLE")
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "zero.wav").write_bytes(b"")
    names = ["good.wav", "nan.wav", "inf.flac", "fine.wav", "folder.wav", "zero.wav"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": n, "prompt": "p", "response": "r"}) + "\n" for n in names))
    examples = read_manifest(manifest)
    with pytest.raises(ManifestError, match=r"m.jsonl:2: audio contains NaN or infinite samples: .*nan.wav "
                                            r"\(set data.skip_bad_audio=true"):
        check_audio_files(examples, skip_bad=False)
    kept, problems = check_audio_files(examples, skip_bad=True)
    assert [e.audio[0].name for e in kept] == ["good.wav", "inf.flac", "fine.wav"]
    assert problems[0].endswith("nan.wav") and "NaN" in problems[0]
    assert f"m.jsonl:5: {tmp_path / 'folder.wav'} is a folder, not an audio file" in problems[1]
    assert f"m.jsonl:6: audio file is empty (0 bytes): {tmp_path / 'zero.wav'}" in problems[2]


def test_training_with_skip_bad_audio_runs_past_a_nan_clip(tone_dataset, tmp_path):
    import numpy as np
    import soundfile as sf

    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.training.engine import train
    from tests.conftest import tiny_recipe_dict

    sf.write(str(tone_dataset.parent / "audio" / "nan.wav"), np.full(16000, np.nan, dtype=np.float32), 16000,
             subtype="FLOAT")
    rows = tone_dataset.read_text() + json.dumps({"id": "nan", "audio": "audio/nan.wav", "prompt": "p",
                                                  "response": "high"}) + "\n"
    tone_dataset.write_text(rows)
    recipe = tiny_recipe_dict(**{"training.max_steps": 2, "training.batch_size": 9})
    recipe["data"] = {"train": str(tone_dataset), "skip_bad_audio": True}
    recipe["training"]["output_dir"] = str(tmp_path / "run")
    result = train(recipe_from_dict(recipe), progress=False)
    assert result.skipped_examples == 1 and result.steps == 2


def test_repeated_ids_in_a_training_manifest_are_warned_about(tone_dataset):
    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.data.loading import load_examples
    from alm_kit.errors import AlmKitWarning
    from tests.conftest import tiny_recipe_dict

    rows = [json.loads(line) for line in tone_dataset.read_text().splitlines()]
    for row in rows[4:]:
        row["id"] = "ex1"
    rows[3]["id"] = "ex2"
    tone_dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe_dict()
    recipe["data"] = {"train": str(tone_dataset)}
    with pytest.warns(AlmKitWarning, match=r"train.jsonl: repeated ids: ex1, ex2$"):
        examples, _ = load_examples(recipe_from_dict(recipe), str(tone_dataset), None)
    assert len(examples) == 8
