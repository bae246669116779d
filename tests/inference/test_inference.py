"""The inference engine: batching equality, masks, sampling, beam search, stop strings, thinking budget,
per-example errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.inference.engine import InferenceEngine, Request, make_batch
from alm_kit.model import build_model
from tests.conftest import tiny_recipe_dict, write_tone

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 2048}


def _engine(layout: str = "prefix", decoder: dict | None = None, **layout_params):
    recipe = tiny_recipe_dict()
    if decoder is not None:
        recipe["model"]["decoder"]["params"]["config"] = dict(decoder)
    if layout == "placeholder":
        recipe["model"]["layout"] = {"name": "placeholder", "params": layout_params}
    elif layout_params:
        recipe["model"]["layout"]["params"].update(layout_params)
    recipe = recipe_from_dict(recipe)
    model = build_model(recipe.model).eval()
    return InferenceEngine(model, recipe.generation)


def _requests(n: int = 5, seed: int = 0) -> list[Request]:
    """Mixed clip counts, clip lengths and prompt lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        clips = [(0.1 * rng.standard_normal(16000 * (1 + (i + j) % 3)).astype(np.float32), 16000)
                 for j in range(1 + i % 2)]
        out.append(Request(audio=clips, prompt="what is " + "this sound " * (3 * i), id=f"r{i}"))
    return out


def _hf_greedy(model, request: Request, new_tokens: int) -> list[int]:
    """transformers' own generate on the same prefix: the reference for one example."""
    inputs = model.decoder_inputs(make_batch(model, [request]), for_generation=True)
    mask = inputs.attention_mask
    if mask is None:
        mask = torch.ones(inputs.inputs_embeds.shape[:2], dtype=torch.long)
    ends = sorted({model.layout.end_token_id(), model.decoder.tokenizer.eos_token_id})
    with torch.no_grad():
        out = model.decoder.language_model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=mask,
                                                    max_new_tokens=new_tokens, do_sample=False,
                                                    eos_token_id=ends, pad_token_id=ends[0])
    tokens = out[0].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in ends), len(tokens))]


@pytest.mark.parametrize("layout, decoder", [("prefix", None), ("placeholder", None), ("placeholder", TINY_GPT2)],
                         ids=["prefix-llama", "placeholder-llama", "placeholder-gpt2"])
def test_batched_greedy_equals_one_at_a_time_and_transformers(layout, decoder):
    """GPT-2's absolute positions also check that left padding does not shift position ids
    (Llama's rotary positions are relative, so a shift would go unnoticed there)."""
    engine = _engine(layout, decoder)
    requests = _requests()
    params = engine.params(max_new_tokens=10, batch_size=5)
    batched = engine.run(requests, params)
    assert all(g.ok for g in batched)
    # the batch really mixed lengths: left padding was needed
    inputs = engine.model.decoder_inputs(make_batch(engine.model, requests), for_generation=True)
    assert (inputs.attention_mask == 0).any()
    for request, together in zip(requests, batched):
        alone = engine.run([request], params)[0]
        assert together.tokens == alone.tokens
        assert together.tokens == _hf_greedy(engine.model, request, 10)


def test_mellow_compat_layout_without_mask_batches_rows_of_equal_length():
    engine = _engine(prompt_length=12, attention_mask=False)
    requests = _requests(4)
    requests = [Request(audio=[r.audio[0]] * 2, prompt=r.prompt[:30], id=r.id) for r in requests]
    params = engine.params(max_new_tokens=8)
    batched = engine.run(requests, params)
    for request, together in zip(requests, batched):
        assert together.tokens == engine.run([request], params)[0].tokens
        assert together.tokens == _hf_greedy(engine.model, request, 8)


def test_a_clip_used_twice_in_a_batch_is_encoded_once():
    engine = _engine()
    passes = []
    engine.model.encoders["htsat"].register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    clip = (np.sin(np.arange(16000) / 10).astype(np.float32), 16000)
    other = (np.cos(np.arange(16000) / 7).astype(np.float32), 16000)
    third = (np.cos(np.arange(16000) / 3).astype(np.float32), 16000)
    requests = [Request([clip, other], "a"), Request([clip], "b"), Request([other, clip], "c"), Request([third], "d")]
    whole = engine.run(requests, engine.params(max_new_tokens=4, encoder_batch="all"))
    assert passes == [3]  # one pass, three distinct clips
    passes.clear()
    sliced = engine.run(requests, engine.params(max_new_tokens=4, encoder_batch=2))
    assert passes == [2, 1]  # the same three clips in passes of two
    assert [g.tokens for g in sliced] == [g.tokens for g in whole]


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    engine = _engine()
    requests = _requests(3)
    greedy = engine.run(requests, engine.params(max_new_tokens=8))
    top1 = engine.run(requests, engine.params(max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7))
    assert [g.tokens for g in greedy] == [g.tokens for g in top1]
    hot = dict(max_new_tokens=12, do_sample=True, temperature=5.0, min_new_tokens=12)
    first = engine.run(requests, engine.params(seed=1, **hot))
    again = engine.run(requests, engine.params(seed=1, **hot))
    other = engine.run(requests, engine.params(seed=2, **hot))
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    assert [g.tokens for g in first] != [g.tokens for g in greedy]


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    from alm_kit.config.schema import GenerationConfig
    from alm_kit.inference.sampling import TokenChooser

    chooser = TokenChooser(GenerationConfig(do_sample=True, top_p=0.7), 1, 4, torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    kept = torch.isfinite(chooser.filter(logits))[0].tolist()
    assert kept == [False, True, True, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


def test_repetition_penalty_changes_greedy_output_and_avoids_repeats():
    engine = _engine()
    requests = _requests(2)
    plain = engine.run(requests, engine.params(max_new_tokens=16, min_new_tokens=16))
    penalised = engine.run(requests, engine.params(max_new_tokens=16, min_new_tokens=16, repetition_penalty=50.0))
    assert [g.tokens for g in plain] != [g.tokens for g in penalised]
    for g in penalised:
        assert len(set(g.tokens)) > len(g.tokens) * 0.8


def test_beam_search_matches_transformers_and_one_beam_is_greedy():
    engine = _engine("placeholder")
    requests = _requests(3)
    greedy = engine.run(requests, engine.params(max_new_tokens=8))
    one_beam = engine.run(requests, engine.params(max_new_tokens=8, num_beams=1))
    assert [g.tokens for g in greedy] == [g.tokens for g in one_beam]
    beams = engine.run(requests, engine.params(max_new_tokens=8, num_beams=3, length_penalty=0.0))
    model = engine.model
    ends = sorted({model.layout.end_token_id(), model.decoder.tokenizer.eos_token_id})
    for request, ours in zip(requests, beams):
        inputs = model.decoder_inputs(make_batch(model, [request]), for_generation=True)
        with torch.no_grad():
            out = model.decoder.language_model.generate(
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, max_new_tokens=8,
                num_beams=3, length_penalty=0.0, early_stopping=True, do_sample=False,
                eos_token_id=ends, pad_token_id=ends[0])
        theirs = [t for t in out[0].tolist() if t not in ends]
        assert ours.tokens == theirs


def test_stop_strings_end_the_row_and_are_cut_from_the_text():
    engine = _engine()
    request = _requests(1)[0]
    free = engine.run([request], engine.params(max_new_tokens=16, min_new_tokens=16))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]  # a string the model will produce
    stopped = engine.run([request], engine.params(max_new_tokens=16, stop=[stop]))[0]
    assert stopped.finish_reason == "stop_string"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert len(stopped.tokens) < len(free.tokens)


def _thinking_engine():
    """A tiny decoder rigged to open a thought at once and never close it by itself."""
    engine = _engine("placeholder")
    tok = engine.tokenizer
    open_id, close_id = tok.convert_tokens_to_ids(["<think>", "</think>"])
    original = engine.model.decoder.logits
    state = {"step": 0}

    def rigged(hidden):
        logits = original(hidden).clone()
        state["step"] += 1
        logits[..., close_id] = -1e4
        logits[..., open_id] = 50.0 if state["step"] == 1 else -1e4
        return logits

    engine.model.decoder.logits = rigged
    return engine, state, open_id, close_id


def test_thinking_budget_closes_the_thought_and_the_answer_follows():
    engine, state, open_id, close_id = _thinking_engine()
    request = _requests(1)[0]
    params = engine.params(max_new_tokens=30, min_new_tokens=30, thinking_budget=5, thinking_close="</think>")
    result = engine.run([request], params)[0]
    tokens = result.tokens
    assert tokens[0] == open_id and tokens.index(close_id) == 6  # <think>, 5 thought tokens, </think>
    assert result.budget_hit and len(tokens) == 30
    assert result.thought == engine.tokenizer.decode(tokens[1:6], skip_special_tokens=True).strip()
    assert result.answer == engine.tokenizer.decode(tokens[7:], skip_special_tokens=True).strip()
    assert result.answer
    # without a budget the thought never closes: everything is thought, no answer
    state["step"] = 0
    unbounded = engine.run([request], engine.params(max_new_tokens=30))[0]
    assert close_id not in unbounded.tokens and unbounded.answer == "" and unbounded.thought
    assert not unbounded.budget_hit


class _Collect:
    """A TextStream that keeps what it receives."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[str]] = {"thought": [], "answer": []}
        self.results: list = []

    def piece(self, part: str, text: str) -> None:
        assert not self.results, "a piece after finished"
        self.pieces[part].append(text)

    def finished(self, result) -> None:
        self.results.append(result)

    def joined(self, part: str) -> str:
        return "".join(self.pieces[part])


def test_streamed_pieces_arrive_one_by_one_and_add_up_to_thought_and_answer():
    engine, state, open_id, close_id = _thinking_engine()
    streamed, plain = _requests(2)
    sink = _Collect()
    streamed.stream = sink
    params = engine.params(max_new_tokens=30, min_new_tokens=30, thinking_budget=5, thinking_close="</think>")
    results = engine.generate_batch([streamed, plain], params)
    assert results[0].thought and results[0].answer
    assert sink.joined("thought") == results[0].thought and sink.joined("answer") == results[0].answer
    assert len(sink.pieces["thought"]) > 1 and len(sink.pieces["answer"]) > 1  # as generated, not at the end
    assert sink.results == [results[0]]
    # streaming one row changes nothing for it or its neighbour
    state["step"] = 0
    assert engine.generate_batch(_requests(2), params) == results


def test_streamed_text_never_contains_what_a_stop_string_cuts():
    engine = _engine()
    request = _requests(1)[0]
    free = engine.run([request], engine.params(max_new_tokens=16, min_new_tokens=16))[0]
    stop = free.text[3:6]
    sink = _Collect()
    request.stream = sink
    stopped = engine.run([request], engine.params(max_new_tokens=16, stop=[stop]))[0]
    assert stopped.finish_reason == "stop_string"
    assert sink.joined("answer") == stopped.answer and stop not in sink.joined("answer")
    assert sink.pieces["thought"] == []


@pytest.mark.parametrize("layout", ["prefix", "placeholder"])
def test_prompt_tokens_count_the_real_prefix_positions(layout):
    engine = _engine(layout)
    requests = _requests(3)
    together = engine.generate_batch(requests, engine.params(max_new_tokens=2))
    alone = [engine.generate_batch([r], engine.params(max_new_tokens=2))[0] for r in requests]
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]  # padding is not counted
    assert all(r.prompt_tokens > len(engine.tokenizer.encode(q.prompt)) for r, q in zip(alone, requests))


def test_thinking_switch_is_ignored_by_a_layout_without_thinking(checkpoint, tones, capsys):
    """--no-thinking on a prefix-layout model (Mellow) answers as without it and says it was ignored."""
    import json

    from alm_kit.cli import main

    engine = _engine("prefix")
    assert not engine.thinking_switch and _engine("placeholder").thinking_switch
    request = _requests(1)[0]
    assert (engine.run([request], engine.params(thinking=False, max_new_tokens=3))[0].tokens
            == engine.run([request], engine.params(max_new_tokens=3))[0].tokens)
    args = ["generate", "--checkpoint", str(checkpoint), "--audio", tones[0], "--prompt", "which?", "--json",
            "--device", "cpu", "--max-new-tokens", "3"]
    assert main(args + ["--no-thinking"]) == 0
    captured = capsys.readouterr()
    assert "--no-thinking is ignored" in captured.err and "prefix" in captured.err
    assert main(args) == 0
    assert json.loads(captured.out) == json.loads(capsys.readouterr().out)


def test_thinking_switch_reaches_the_chat_template():
    engine = _engine("placeholder")
    layout = engine.model.layout
    tok = engine.tokenizer
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n"
                         "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    on = layout.tokenize(["hi"], thinking=True).prompt_ids[0]
    off = layout.tokenize(["hi"], thinking=False).prompt_ids[0]
    close_id = tok.convert_tokens_to_ids("</think>")
    assert close_id in off and close_id not in on


def test_bad_examples_get_their_own_error_and_the_rest_completes(tmp_path):
    engine = _engine()
    good = _requests(2)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    bad = [
        Request([str(tmp_path / "missing.wav")], "q", id="missing"),
        Request([str(broken)], "q", id="unreadable"),
        Request([(np.zeros(0, dtype=np.float32), 16000)], "q", id="empty"),
        Request([(np.array([0.0, np.nan] * 100, dtype=np.float32), 16000)], "q", id="nan"),
        Request([good[0].audio[0]] * 3, "q", id="three clips"),
        Request([good[0].audio[0]], "word " * 5000, id="long prompt"),
    ]
    results = engine.run(bad[:3] + good + bad[3:], engine.params(max_new_tokens=4))
    by_id = {r.id: r for r in results}
    assert "not found" in by_id["missing"].error
    assert "unreadable" in by_id["unreadable"].error or "broken.wav" in by_id["unreadable"].error
    assert "empty" in by_id["empty"].error
    assert "NaN" in by_id["nan"].error
    assert "at most 2" in by_id["three clips"].error
    assert "context" in by_id["long prompt"].error
    for request in good:
        assert by_id[request.id].ok
        assert by_id[request.id].tokens == engine.run([request], engine.params(max_new_tokens=4))[0].tokens


def test_unknown_generation_setting_is_named():
    engine = _engine()
    with pytest.raises(Exception, match="top_q"):
        engine.params(top_q=0.5)
    with pytest.raises(Exception, match="top_p"):
        engine.params(top_p=1.5)
    with pytest.raises(Exception, match="encoder_batch must be > 0"):
        engine.params(encoder_batch=0)


def test_where_the_time_went_is_reported_per_batch():
    engine = _engine()
    engine.run(_requests(3), engine.params(max_new_tokens=5, min_new_tokens=5))
    timings = engine.last_timings
    assert set(timings) == {"audio", "layout", "prefill", "decode", "steps"}
    assert timings["steps"] == 4  # 5 tokens: the prefill gives the first, 4 decode steps the rest
    assert all(timings[k] > 0 for k in ("audio", "layout", "prefill", "decode"))


def test_audio_from_file_array_and_tensor_give_the_same_answer(tmp_path):
    engine = _engine()
    path = write_tone(tmp_path / "a.wav", 800.0, 1.0)
    import soundfile as sf

    wave, rate = sf.read(path, dtype="float32")
    params = engine.params(max_new_tokens=6)
    outs = [engine.run([Request([audio], "what is it?")], params)[0].tokens
            for audio in (path, (wave, rate), (torch.from_numpy(wave), rate))]
    assert outs[0] == outs[1] == outs[2]


# ---------------------------------------------------------------- Python API, Mellow wrapper, CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mellow-compatible model (fixed 12-token prompt, no mask) saved as a checkpoint."""
    from alm_kit.checkpoint import save_checkpoint

    recipe = tiny_recipe_dict()
    recipe["model"]["layout"]["params"].update(prompt_length=12, attention_mask=False)
    recipe["generation"] = {"max_new_tokens": 6, "batch_size": 4}
    recipe = recipe_from_dict(recipe)
    model = build_model(recipe.model).eval()
    return save_checkpoint(model, recipe, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    return [write_tone(folder / f"t{i}.wav", 300.0 * (i + 1), 1.0 + 0.25 * i) for i in range(4)]


def test_alm_api_takes_paths_arrays_tensors_and_dicts(checkpoint, tones):
    import soundfile as sf

    from alm_kit import ALM

    alm = ALM.from_pretrained(checkpoint, device="cpu")
    wave, rate = sf.read(tones[1], dtype="float32")
    one = alm.generate(audio=[tones[0], tones[1]], prompt="which is higher?")
    assert one.ok and one.tokens
    same = alm.generate(audio=[tones[0], {"array": torch.from_numpy(wave), "sampling_rate": rate}],
                        prompt="which is higher?")
    assert same.tokens == one.tokens
    batch = alm.generate_batch([{"audio": [tones[0], (wave, rate)], "prompt": "which is higher?", "id": "x"},
                                ([tones[2], tones[3]], "describe"), {"audio": [tones[0]]}, 42])
    assert batch[0].id == "x" and batch[0].tokens == one.tokens
    assert batch[1].ok and batch[1].tokens == alm.generate([tones[2], tones[3]], "describe").tokens
    assert "missing prompt" in batch[2].error and "expected a dict" in batch[3].error
    with pytest.raises(Exception, match="sample rate"):
        alm.generate(audio=[wave], prompt="no rate")
    assert alm.generate([tones[0], tones[1]], "which is higher?", max_new_tokens=2).tokens == one.tokens[:2]


def test_mellow_wrapper_has_the_reference_call_shape_and_is_greedy(checkpoint, tones):
    from alm_kit import ALM
    from alm_kit.inference.mellow_wrapper import MellowWrapper

    with pytest.raises(FileNotFoundError, match="alm-kit import mellow"):
        MellowWrapper(config="v0", model="v0", device="cpu", use_cuda=False)
    with pytest.raises(ValueError, match="v0_s"):
        MellowWrapper(model="v1", checkpoint=checkpoint)
    mellow = MellowWrapper(config="v0", model="v0", device="cpu", use_cuda=False, checkpoint=checkpoint)
    examples = [[tones[0], tones[1], "what is the primary sound event? a) dog b) tone"],
                [tones[2], tones[3], "which is louder?"]]
    answers = mellow.generate(examples=examples, max_len=5, top_p=0.8, temperature=1.0)
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    alm = ALM.from_pretrained(checkpoint, device="cpu")
    for (a, b, prompt), answer in zip(examples, answers):
        assert answer.strip() == alm.generate([a, b], prompt, max_new_tokens=5).text
    # like the reference, top_p and temperature do not change greedy decoding
    assert mellow.generate(examples=examples, max_len=5, top_p=0.1, temperature=3.0) == answers


def test_mellow_wrapper_returns_the_reference_string_with_its_spaces(checkpoint, tones, monkeypatch):
    """The reference decodes the tokens as they are and cuts at the stop token: no stripping."""
    import dataclasses

    from alm_kit.decoders.causal_lm import CausalLMDecoder
    from alm_kit.inference.mellow_wrapper import MellowWrapper

    logits = CausalLMDecoder.logits

    def space_word_then_end(self, hidden):
        out = logits(self, hidden).clone()
        out[..., self.tokenizer.encode(" do", add_special_tokens=False)[0]] += 50.0
        out[..., self.tokenizer.eos_token_id] += 100.0
        return out

    monkeypatch.setattr(CausalLMDecoder, "logits", space_word_then_end)
    mellow = MellowWrapper(checkpoint=checkpoint)
    mellow.alm.engine.defaults = dataclasses.replace(mellow.alm.engine.defaults, min_new_tokens=2)
    answers = mellow.generate(examples=[[tones[0], tones[1], "what is it?"]], max_len=5, top_p=0.8, temperature=1.0)
    assert answers == [" do do"]
    assert mellow.alm.generate([tones[0], tones[1]], "what is it?", min_new_tokens=2).text == "do do"


def test_generate_cli_answers_a_jsonl_file_and_resumes(checkpoint, tones, tmp_path, capsys):
    import json

    from alm_kit.cli import EXIT_FAILED_ITEMS, main

    source = tmp_path / "in.jsonl"
    rows = [{"id": f"q{i}", "audio": [tones[i % 4], tones[(i + 1) % 4]], "prompt": f"question {i}"} for i in range(5)]
    rows.insert(3, {"id": "bad", "audio": str(tmp_path / "missing.wav"), "prompt": "?"})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    # a first run that was interrupted after two answers (and a half-written line)
    first = [{"id": "q1", "text": "kept", "error": None}, {"id": "q0", "text": "kept", "error": None}]
    out.write_text("".join(json.dumps(r) + "\n" for r in first) + '{"id": "q2", "te')
    code = main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out),
                 "--quiet", "--max-new-tokens", "4", "--device", "cpu"])
    assert code == EXIT_FAILED_ITEMS  # finished, but one example failed
    assert "3 answered, 1 failed, 2 already there (of 6)\n" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]  # the cut line is gone
    assert [r["id"] for r in records] == [r["id"] for r in rows]  # in input order
    by_id = {r["id"]: r for r in records}
    assert by_id["q0"]["text"] == "kept"  # not answered again
    assert "not found" in by_id["bad"]["error"]
    for i in (2, 3, 4):
        assert by_id[f"q{i}"]["error"] is None and by_id[f"q{i}"]["finish_reason"] in ("stop", "length")
    # a second run has nothing left to do, but a failed row remains: still not a success
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out),
                 "--quiet", "--device", "cpu"]) == EXIT_FAILED_ITEMS
    assert ("0 answered, 0 failed, 6 already there (of 6); 1 row(s) failed in an earlier run (--retry-errors"
            in capsys.readouterr().out)
    # --retry-errors retries only the failed one
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out), "--quiet",
                 "--retry-errors", "--device", "cpu"]) == EXIT_FAILED_ITEMS
    assert "0 answered, 1 failed, 5 already there (of 6)\n" in capsys.readouterr().out
    # once the clip is there, the retry answers it and the run succeeds
    (tmp_path / "missing.wav").write_bytes(open(tones[0], "rb").read())
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out), "--quiet",
                 "--retry-errors", "--device", "cpu"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in rows]


def test_a_malformed_input_line_fails_alone(checkpoint, tones, tmp_path, capsys):
    import json

    from alm_kit.cli import EXIT_FAILED_ITEMS, main

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([
        json.dumps({"id": "q0", "audio": tones[0], "prompt": "first"}),
        '{"id": "q1", "audio": "a.wav", "prompt": ',                 # cut JSON
        json.dumps({"id": "q2", "audio": tones[1]}),                  # no prompt
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "q4", "audio": tones[2], "prompt": "last"}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out), "--quiet",
            "--max-new-tokens", "3", "--device", "cpu"]
    assert main(args) == EXIT_FAILED_ITEMS
    assert "2 answered, 3 failed, 0 already there (of 5)" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q0", "in-2", "q2", "in-4", "q4"]
    assert [r["error"] is None for r in records] == [True, False, False, False, True]
    assert records[1]["line"] == 2 and f"{source}:2: not valid JSON" in records[1]["error"]
    assert "missing field 'prompt'" in records[2]["error"] and "expected a JSON object" in records[3]["error"]
    # the fixed line is answered by the next run; the others still fail
    lines = source.read_text().splitlines()
    lines[1] = json.dumps({"id": "q1", "audio": tones[3], "prompt": "second"})
    source.write_text("\n".join(lines) + "\n")
    assert main(args) == EXIT_FAILED_ITEMS
    assert "1 answered, 0 failed, 4 already there (of 5)" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q0", "q1", "q2", "in-4", "q4", "in-2"]


def test_generate_file_results_win_over_input_fields(checkpoint, tones, tmp_path):
    """A manifest's gold answer (or any field named like a result) must never pass for the model's."""
    import json

    from alm_kit import ALM
    from alm_kit.cli import main

    source = tmp_path / "train.jsonl"
    rows = [{"id": f"q{i}", "audio": [tones[i % 4]], "prompt": f"question {i}", "response": "gold",
             "answer": "GOLD", "text": "GOLD TEXT", "thought": "gold thought", "finish_reason": "gold",
             "error": "gold error", "task": "count"} for i in range(3)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out),
                 "--quiet", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    alm = ALM.from_pretrained(checkpoint, device="cpu")
    for record, row in zip(map(json.loads, out.read_text().splitlines()), rows):
        mine = alm.generate([row["audio"][0]], row["prompt"], max_new_tokens=3)
        assert (record["answer"], record["text"]) == (mine.answer, mine.text)
        assert record["thought"] is None and record["error"] is None
        assert record["finish_reason"] in ("stop", "length")
        # the input's fields are kept under their own names, or input_<name> where they clash
        assert record["task"] == "count" and record["response"] == "gold"
        assert (record["input_answer"], record["input_text"], record["input_error"]) == (
            "GOLD", "GOLD TEXT", "gold error")


def test_generate_cli_one_example_prints_the_answer(checkpoint, tones, capsys):
    import json

    from alm_kit import ALM
    from alm_kit.cli import main

    assert main(["generate", "--checkpoint", str(checkpoint), "--audio", tones[0], "--audio", tones[1],
                 "--prompt", "which?", "--json", "--device", "cpu", "--max-new-tokens", "3", "--encoder-batch", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = ALM.from_pretrained(checkpoint, device="cpu").generate([tones[0], tones[1]], "which?", max_new_tokens=3)
    assert printed["text"] == expected.text
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "no audio"]) == 2
    assert "--audio" in capsys.readouterr().err


def test_generate_cli_says_when_the_answer_is_empty_and_min_new_tokens_prevents_it(checkpoint, tones, capsys,
                                                                                     monkeypatch, tmp_path):
    """A model that emits its end token first: the empty answer is reported on stderr;
    --min-new-tokens forbids the end token for the first tokens."""
    import json

    from alm_kit.cli import main
    from alm_kit.decoders.causal_lm import CausalLMDecoder

    logits = CausalLMDecoder.logits

    def prefers_to_stop(self, hidden):  # the end token first, then a word
        out = logits(self, hidden).clone()
        word = self.tokenizer.encode("dog", add_special_tokens=False)[0]
        out[..., word] += 50.0
        out[..., self.tokenizer.eos_token_id] += 100.0
        return out

    monkeypatch.setattr(CausalLMDecoder, "logits", prefers_to_stop)
    args = ["generate", "--checkpoint", str(checkpoint), "--audio", tones[0], "--prompt", "which?", "--device", "cpu"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "the answer is empty: the model produced its end token first" in err
    assert "--min-new-tokens" in err
    assert main([*args, "--min-new-tokens", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["text"] == "d" and "empty" not in err  # the tiny tokenizer's "dog" starts with "d"
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "audio": tones[0], "prompt": "which?"}) + "\n")
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(source), "--output",
                 str(tmp_path / "out.jsonl"), "--quiet", "--device", "cpu"]) == 0
    assert "1 of the answers are empty" in capsys.readouterr().err


def test_text_only_generation_equals_transformers_on_the_plain_decoder():
    engine = _engine("placeholder")
    tok = engine.tokenizer
    prompts = ["describe a dog", "what is the loudest sound in a city at night and why"]
    params = engine.params(max_new_tokens=8, batch_size=2)
    batched = engine.generate_text_batch(prompts, params)
    lm = engine.model.decoder.language_model
    ends = sorted({engine.model.layout.end_token_id(), tok.eos_token_id})
    for prompt, ours in zip(prompts, batched):
        assert ours.tokens == engine.generate_text_batch([prompt], params)[0].tokens
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, eos_token_id=ends, pad_token_id=ends[0])[0, ids.shape[1]:].tolist()
        assert ours.tokens == out[: next((i for i, t in enumerate(out) if t in ends), len(out))]


@pytest.mark.parametrize("layout", ["prefix", "placeholder"])
def test_without_kv_cache_the_tokens_are_the_same(layout):
    """use_cache: false re-runs the whole sequence per token (the reference Mellow way)."""
    engine = _engine(layout)
    requests = _requests(4)
    cached = engine.run(requests, engine.params(max_new_tokens=6, batch_size=4))
    uncached = engine.run(requests, engine.params(max_new_tokens=6, batch_size=4, use_cache=False))
    assert [g.tokens for g in cached] == [g.tokens for g in uncached]
    with pytest.raises(Exception, match="use_cache"):
        engine.params(num_beams=2, use_cache=False)


@pytest.mark.parametrize("layout, decoder, layout_params", [
    ("prefix", None, {}), ("prefix", None, {"attention_mask": False, "prompt_length": 12}), ("placeholder", None, {}),
    ("placeholder", TINY_GPT2, {})], ids=["prefix-llama", "prefix-nomask", "placeholder-llama", "placeholder-gpt2"])
def test_fixed_shape_steps_give_the_eager_tokens(layout, decoder, layout_params):
    """``cuda_graphs: true`` on the CPU runs the steps a CUDA graph captures (static cache, step mask,
    device-side end checks every few steps, finished rows kept): the tokens are the eager path's."""
    engine = _engine(layout, decoder, **layout_params)
    eos = engine.tokenizer.eos_token_id
    with torch.no_grad():  # make the end token likely, so rows end at different steps
        engine.model.decoder.language_model.get_output_embeddings().weight[eos] *= 4
    requests = _requests(6) if layout_params.get("attention_mask", True) else [
        Request(audio=r.audio[:1] * 2, prompt=r.prompt[:30], id=r.id) for r in _requests(6)]
    # (sampling is left out: the eager path drops finished rows, which changes what later rows draw)
    settings = [{}, {"repetition_penalty": 1.5, "min_new_tokens": 2}, {"stop": ["e"]}]
    lengths = set()
    for extra in settings:
        eager = engine.run(requests, engine.params(max_new_tokens=24, cuda_graphs=False, **extra))
        static = engine.run(requests, engine.params(max_new_tokens=24, cuda_graphs=True, **extra))
        assert [g.tokens for g in static] == [g.tokens for g in eager], extra
        assert [g.finish_reason for g in static] == [g.finish_reason for g in eager], extra
        lengths |= {len(g.tokens) for g in eager}
    assert len(lengths) > 2  # rows did end at different steps
    sampled = [engine.run(requests, engine.params(max_new_tokens=24, cuda_graphs=True, do_sample=True, top_k=k,
                                                  seed=3)) for k in (8, 8, 1)]
    assert [g.tokens for g in sampled[0]] == [g.tokens for g in sampled[1]]  # seeded
    greedy = engine.run(requests, engine.params(max_new_tokens=24, cuda_graphs=True))
    assert [g.tokens for g in sampled[2]] == [g.tokens for g in greedy]  # top_k 1 is greedy


def test_bf16_weights_on_the_cpu_keep_the_front_end_in_fp32(checkpoint, tones, tmp_path, capsys):
    """``dtype: bf16``: the model body in bf16, HTS-AT's STFT and mel matrix in fp32; the answers come from
    the same model (logits close to fp32's), and the fixed-shape steps give the eager path's tokens."""
    from alm_kit import ALM
    from alm_kit.cli import main
    from alm_kit.runtime import model_dtype

    fp32 = ALM.from_pretrained(checkpoint, device="cpu", dtype="fp32")
    bf16 = ALM.from_pretrained(checkpoint, device="cpu", dtype="bf16")
    assert ALM.from_pretrained(checkpoint, device="cpu").model.decoder.lm.dtype == torch.float32  # auto on CPU
    htsat = bf16.model.encoders["htsat"].htsat
    assert model_dtype(bf16.model) == torch.bfloat16 and htsat.patch_embed.proj.weight.dtype == torch.bfloat16
    assert htsat.logmel_extractor.melW.dtype == torch.float32
    assert htsat.spectrogram_extractor.stft.conv_real.weight.dtype == torch.float32
    from alm_kit.inference.engine import make_batch

    batch = make_batch(fp32.model, [Request(audio=[tones[0], tones[1]], prompt="which is louder?")])
    with torch.no_grad():
        want = fp32.model.logits(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = bf16.model.logits(batch).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 round-off, not another model
    requests = [Request(audio=[tones[i % 4], tones[(i + 1) % 4]], prompt=f"question {i}") for i in range(5)]
    eager = bf16.engine.run(requests, bf16.engine.params(max_new_tokens=8, cuda_graphs=False))
    static = bf16.engine.run(requests, bf16.engine.params(max_new_tokens=8, cuda_graphs=True))
    assert all(g.ok for g in eager) and [g.tokens for g in static] == [g.tokens for g in eager]
    # the command line takes it too
    assert main(["generate", "--checkpoint", str(checkpoint), "--audio", tones[0], "--prompt", "what?",
                 "--device", "cpu", "--dtype", "bf16", "--max-new-tokens", "3", "--json"]) == 0
    assert "text" in capsys.readouterr().out
