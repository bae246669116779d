"""ALM.logits and ALM.score: the candidates' log-likelihoods agree with the model's own logits and loss,
do not depend on what else is scored with them, and drive likelihood-based multiple-choice evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.inference.api import ALM
from alm_kit.model import build_model
from tests.conftest import tiny_recipe_dict, write_tone

CANDIDATES = ["two", "three beeps", "a dog barking loudly", "no"]


@pytest.fixture(scope="module", params=["prefix", "placeholder"])
def alm(request):
    recipe = tiny_recipe_dict()
    if request.param == "placeholder":
        recipe["model"]["layout"] = {"name": "placeholder", "params": {}}
    recipe = recipe_from_dict(recipe)
    return ALM(build_model(recipe.model).eval(), recipe)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(24000).astype(np.float32), 16000)


def test_score_is_the_models_own_log_likelihood(alm, clip):
    """Each candidate's first token is scored with the logits ALM.logits gives for the generation
    prefix; the sum over its tokens is minus the training loss of that answer."""
    from alm_kit.data.batch import Batch
    from alm_kit.inference.engine import Request, make_batch

    prompt = "how many beeps?"
    logits = alm.logits([clip], prompt)
    assert logits.dim() == 2 and logits.shape[1] >= len(alm.model.decoder.tokenizer) - 1
    first = torch.log_softmax(logits[-1], -1)
    scores = alm.score([clip], prompt, CANDIDATES)
    assert [s.text for s in scores] == CANDIDATES
    for s in scores:
        assert s.token_logprobs[0] == pytest.approx(float(first[s.token_ids[0]]), abs=1e-4)
        assert s.logprob == pytest.approx(sum(s.token_logprobs), abs=1e-4) and s.logprob < 0
        assert s.token_ids[-1] == alm.model.layout.end_token_id()
        batch = make_batch(alm.model, [Request(audio=[clip], prompt=prompt)])
        batch = Batch(ids=["x"], prompts=[prompt], responses=[s.text], clips_per_example=[1],
                      clip_keys=batch.clip_keys, waveforms=batch.waveforms, lengths=batch.lengths)
        with torch.no_grad():
            loss = alm.model(batch)
        assert loss.num_tokens == len(s.token_ids)
        assert s.logprob == pytest.approx(-float(loss.loss) * int(loss.num_tokens), rel=1e-4)


def test_scores_do_not_depend_on_the_other_candidates_or_examples(alm, clip):
    """Candidates of different lengths and examples with different clips share one padded pass;
    each row scores as if alone, with its own clips in their order (the toy model's audio moves the
    scores by ~1e-4, the tolerance is 1e-5)."""
    from alm_kit.inference.engine import Request
    from alm_kit.inference.likelihood import score_candidates

    t = np.arange(32000) / 16000
    tone = ((0.9 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32), 16000)
    together = score_candidates(alm.model, [Request([clip], "how many beeps?"), Request([tone, clip], "which one?")],
                                [CANDIDATES, CANDIDATES[:2]], alm.engine.defaults)
    alone = [alm.score([clip], "how many beeps?", [c])[0] for c in CANDIDATES]
    assert [s.logprob for s in together[0]] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    second = alm.score([tone, clip], "which one?", CANDIDATES[:2])
    assert [s.logprob for s in together[1]] == pytest.approx([s.logprob for s in second], abs=1e-5)
    swapped = alm.score([clip, tone], "which one?", CANDIDATES[:2])
    assert abs(swapped[0].logprob - second[0].logprob) > 5e-5  # the clips and their order matter


def test_score_ranks_like_greedy_decoding_when_the_model_is_sure(alm, clip, monkeypatch):
    """A model rigged to prefer one token ranks the candidate that starts with it first and generates
    it; a model rigged to stop at once finds the empty answer greedy and best."""
    from alm_kit.decoders.causal_lm import CausalLMDecoder

    tok = alm.model.decoder.tokenizer
    logits = CausalLMDecoder.logits
    boost: dict[int, float] = {}

    def rigged(self, hidden):
        out = logits(self, hidden).clone()
        for token, value in boost.items():
            out[..., token] += value
        return out

    monkeypatch.setattr(CausalLMDecoder, "logits", rigged)
    favourite = tok.encode("e", add_special_tokens=False)
    assert len(favourite) == 1
    boost[favourite[0]] = 30.0
    candidates = [*CANDIDATES, "e"]
    scores = alm.score([clip], "which?", candidates)
    assert max(scores, key=lambda s: s.logprob).text == "e"
    assert alm.generate([clip], "which?", max_new_tokens=1).text == "e"
    boost.clear()
    boost[alm.model.layout.end_token_id()] = 100.0
    scores = alm.score([clip], "which?", ["", *CANDIDATES])
    assert [s.greedy for s in scores] == [True] + [False] * len(CANDIDATES)
    assert max(scores, key=lambda s: s.logprob).text == ""


def test_likelihood_evaluation_picks_the_most_likely_option_of_every_item(tmp_path, capsys):
    """alm-kit eval --scoring likelihood on a toy checkpoint: each prediction is the option ALM.score
    ranks first for the item's prompt; a missing clip fails only its item; the answers are cached
    apart from generated ones."""
    from alm_kit.checkpoint import save_checkpoint
    from alm_kit.cli import main
    from alm_kit.text.mcq import mcq_prompt

    recipe = recipe_from_dict(tiny_recipe_dict())
    checkpoint = save_checkpoint(build_model(recipe.model), recipe, tmp_path / "ckpt")
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(4):
        write_tone(tmp_path / "clips" / f"{i}.wav", 300.0 + 400 * i, 0.5 + 0.25 * i)
        rows.append({"id": f"q{i}", "audio": f"clips/{i}.wav", "question": "how many beeps?",
                     "choices": ["one", "two beeps", "three", "none at all"], "answer": "two beeps"})
    rows.append({"id": "gone", "audio": "clips/none.wav", "question": "?", "choices": ["a", "b"], "answer": "a"})
    path = tmp_path / "beeps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["eval", str(checkpoint), str(path), "--scoring", "likelihood", "--quiet", "--out", str(out)]) == 3  # one item failed
    captured = capsys.readouterr()
    assert "(5 items, most likely option, string_match)" in captured.out and "gone: audio file not found" in captured.err
    summary = json.loads((out / "results.json").read_text())
    assert summary["method"] == "likelihood"
    alm = ALM.from_pretrained(checkpoint, device="cpu")
    for row, result in zip(rows[:4], summary["predictions"]):
        scores = alm.score([str(tmp_path / row["audio"])], mcq_prompt("mellow", row["question"], row["choices"]),
                           row["choices"])
        assert result["prediction"] == max(scores, key=lambda s: s.logprob).text
        assert result["correct"] == (result["prediction"] == "two beeps")
    assert summary["predictions"][4]["prediction"] == "" and not summary["predictions"][4]["correct"]
    # a generating run over the same folder does not take the chosen options for its answers
    assert main(["eval", str(checkpoint), str(path), "--quiet", "--out", str(out)]) == 3  # the missing clip again
    assert "reused" not in capsys.readouterr().out
