"""Benchmark files as published (MMAU, MMAR, MMSU, AIR-Bench, alm-kit MCQ JSONL), written here in miniature."""

from __future__ import annotations

import json

import pytest

from alm_kit.errors import ManifestError
from alm_kit.evaluation.formats import read_benchmark, write_annotated


def mmau(root):
    """MMAU test-mini: a JSON list; audio_id relative to the JSON's folder; answer = option text."""
    records = [
        {"id": "m1", "audio_id": "./test-mini-audios/a.wav", "question": "What animal is heard?",
         "choices": ["Dog", "Cat", "Cow", "Owl"], "answer": "Dog", "dataset": "x", "task": "sound", "split": "test-mini",
         "category": "Sound", "sub-category": "Animal", "difficulty": "easy"},
        {"id": "m2", "audio_id": "./test-mini-audios/b.wav", "question": "Which instrument?",
         "choices": ["piano", "violin"], "answer": "violin", "dataset": "y", "task": "music", "split": "test-mini",
         "category": "Music", "sub-category": "Instrument", "difficulty": "hard"},
    ]
    path = root / "mmau-test-mini.json"
    path.write_text(json.dumps(records, indent=4))
    return path


def mmar(root):
    """MMAR-meta.jsonl: audio_path relative to the file; modality and the layer category."""
    records = [
        {"id": "r1", "audio_path": "./audio/r1.wav", "question": "Where was this recorded?",
         "choices": ["Mountain Canyon", "Open Grassland"], "answer": "Open Grassland", "modality": "music",
         "category": "Cultural Layer", "sub-category": "Professional Knowledge", "language": None,
         "source": "youtube", "url": "https://example.invalid", "timestamp": "00:01:32,00:02:02"},
        {"id": "r2", "audio_path": "./audio/r2.wav", "question": "How many speakers?", "choices": ["1", "2", "3"],
         "answer": "2", "modality": "mix-sound-speech", "category": "Perception Layer", "sub-category": "Counting",
         "language": "en", "source": "x", "url": "", "timestamp": ""},
    ]
    path = root / "MMAR-meta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mmsu(root):
    """MMSU question/mmsu.jsonl; audio/ sits beside question/ in the published layout."""
    (root / "question").mkdir()
    (root / "audio").mkdir()
    (root / "audio" / "s1.wav").write_bytes(b"RIFF")
    records = [{"id": "s1", "audio_path": "./audio/s1.wav", "question": "What is the speaker's emotion?",
                "choice_a": "sad", "choice_b": "happy", "choice_c": "angry", "choice_d": "calm", "answer_gt": "happy",
                "task_name": "emotion_recognition", "category": "Paralinguistics", "sub-category": "Perception"}]
    path = root / "question" / "mmsu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def airbench(root):
    """AIR-Bench Foundation_meta.json: audio at {task_name}_{dataset_name}/{path}; choice_c/d optional."""
    (root / "Foundation").mkdir()
    records = [
        {"path": "id10001.wav", "question": "What is the gender of the speaker?", "choice_a": "male",
         "choice_b": "female", "answer_gt": "female", "task_name": "Speaker_Gender_Recognition",
         "dataset_name": "VoxCeleb1", "uniq_id": 17},
        {"path": "x.wav", "question": "When is the dog barking?", "choice_a": "[0.0, 1.5]", "choice_b": "[2.0, 3.1]",
         "choice_c": None, "choice_d": None, "answer_gt": "[2.0, 3.1]", "task_name": "Audio_Grounding",
         "dataset_name": "AudioGrounding", "uniq_id": 18},
    ]
    path = root / "Foundation" / "Foundation_meta.json"
    path.write_text(json.dumps(records))
    return path


def own_jsonl(root):
    path = root / "pairs.jsonl"
    path.write_text(json.dumps({"id": "p1", "audio": ["clips/a.wav", "clips/b.wav"], "question": "Which is louder?",
                                "choices": ["first", "second"], "answer": "second", "task": "loudness"}) + "\n")
    return path


@pytest.mark.parametrize("writer, name, scoring, groups", [
    (mmau, "mmau", "string_match", {"task": "sound", "difficulty": "easy", "category": "Sound", "sub-category": "Animal"}),
    (mmar, "mmar", "string_match", {"modality": "music", "category": "Cultural Layer",
                                    "sub-category": "Professional Knowledge"}),
    (mmsu, "mmsu", "option_match", {"category": "Paralinguistics", "sub-category": "Perception",
                                    "task_name": "emotion_recognition"}),
    (airbench, "airbench", "option_match", {"task": "Speaker_Gender_Recognition_VoxCeleb1"}),
    (own_jsonl, "jsonl", "string_match", {"task": "loudness"}),
])
def test_formats_are_detected_and_read(tmp_path, writer, name, scoring, groups):
    bench = read_benchmark(writer(tmp_path))
    assert bench.format.name == name and bench.format.scoring == scoring
    assert bench.items[0].groups == groups
    assert all(item.answer in item.choices for item in bench.items)
    assert all(a.is_absolute() for item in bench.items for a in item.audio)


def test_audio_paths_resolve_as_each_benchmark_lays_them_out(tmp_path):
    a = read_benchmark(mmau(tmp_path)).items[0]
    assert a.audio == [tmp_path / "test-mini-audios" / "a.wav"] and a.choices == ["Dog", "Cat", "Cow", "Owl"]
    assert read_benchmark(mmar(tmp_path)).items[1].audio == [tmp_path / "audio" / "r2.wav"]
    s = read_benchmark(mmsu(tmp_path)).items[0]  # found beside question/, not inside it
    assert s.audio == [tmp_path / "audio" / "s1.wav"] and s.choices == ["sad", "happy", "angry", "calm"]
    g, ground = read_benchmark(airbench(tmp_path)).items
    assert g.audio == [tmp_path / "Foundation" / "Speaker_Gender_Recognition_VoxCeleb1" / "id10001.wav"]
    assert g.id == "17" and g.choices == ["male", "female"]
    assert ground.audio[0].name == "x.flac" and ground.choices == ["[0.0, 1.5]", "[2.0, 3.1]"]
    p = read_benchmark(own_jsonl(tmp_path)).items[0]
    assert p.audio == [tmp_path / "clips" / "a.wav", tmp_path / "clips" / "b.wav"]
    root = tmp_path / "elsewhere"
    assert read_benchmark(mmau(tmp_path), audio_root=root).items[0].audio == [root / "test-mini-audios" / "a.wav"]


def test_unknown_format_names_the_file_and_the_known_ones(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"wav": "a.wav", "q": "?", "options": ["x"]}]))
    with pytest.raises(ManifestError, match=r"odd.json: unknown benchmark format .*keys options, q, wav.*"
                                            r"mmau: audio_id, choices.*--format"):
        read_benchmark(path)
    with pytest.raises(ManifestError, match=r"odd.json: item 1: missing field\(s\) audio_id, question, choices, answer "
                                            r"\(format mmau\)"):
        read_benchmark(path, "mmau")
    with pytest.raises(ManifestError, match="unknown benchmark format 'mmlu'; choose one of airbench, mmsu"):
        read_benchmark(path, "mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav", "question": "q", "choices": ["x"], "answer": "x"}\n{"audio": \n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: not valid JSON"):
        read_benchmark(bad)
    with pytest.raises(ManifestError, match="benchmark file not found"):
        read_benchmark(tmp_path / "nope.json")


def test_annotated_file_keeps_the_structure_and_adds_the_official_keys(tmp_path):
    for writer, keys in ((mmau, ("model_prediction", "model_output")), (mmar, ("model_prediction", "answer_prediction")),
                         (mmsu, ("model_prediction", "response")), (airbench, ("model_prediction", "response"))):
        root = tmp_path / writer.__name__
        root.mkdir()
        bench = read_benchmark(writer(root))
        out = write_annotated(bench, {0: "some answer"}, root / ("out" + bench.path.suffix))
        text = out.read_text()
        rows = json.loads(text) if bench.container == "json" else [json.loads(line) for line in text.splitlines()]
        assert bench.container == ("jsonl" if bench.path.suffix == ".jsonl" else "json")
        assert len(rows) == 1  # only the items asked
        assert rows[0] == {**bench.records[0], **{k: "some answer" for k in keys}}


@pytest.mark.parametrize("change, message", [
    ({"choices": "ABCD"}, r"item 2 \(id m2\): choices must be a non-empty list of strings, got str \"ABCD\""),
    ({"choices": [["a"], "b"]}, r"item 2 \(id m2\): choices must be a non-empty list of strings, got list"),
    ({"choices": []}, r"item 2 \(id m2\): choices must be a non-empty list"),
    ({"question": None}, r"item 2 \(id m2\): question must be a string, got null"),
    ({"question": {"text": "?"}}, r"item 2 \(id m2\): question must be a string, got \{\"text\": \"\?\"\}"),
], ids=["choices-string", "choices-nested", "choices-empty", "question-null", "question-object"])
def test_items_with_a_string_of_choices_or_no_question_are_refused_by_name(tmp_path, change, message):
    records = json.loads(mmau(tmp_path).read_text())
    records[1].update(change)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ManifestError, match=message):
        read_benchmark(path)


def test_repeated_item_ids_are_warned_about(tmp_path):
    from alm_kit.errors import AlmKitWarning

    records = json.loads(mmau(tmp_path).read_text())
    records[1]["id"] = records[0]["id"]
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(records))
    with pytest.warns(AlmKitWarning, match=r"twice.json: repeated ids: m1$"):
        assert len(read_benchmark(path).items) == 2
