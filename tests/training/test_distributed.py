"""Two CPU processes under torchrun (gloo): DDP and FSDP2 train exactly like one process with the same global batch.

One process with batch 2 and 2 accumulation steps averages the losses of micro-batches 2s and
2s+1 at step s; with 2 ranks of batch 2, rank r takes micro-batch 2s+r and DDP (or FSDP's
reduce-scatter) averages the two ranks' gradients: the same update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from alm_kit.checkpoint import load_checkpoint
from alm_kit.config.loader import recipe_from_dict
from alm_kit.training.engine import train
from tests.conftest import tiny_recipe_dict

WORKER = """
import json, os, sys
import torch
from alm_kit.config import load_recipe
from alm_kit.training.engine import Trainer

trainer = Trainer(load_recipe(sys.argv[1]), progress=False)
result = trainer.fit()
rank = os.environ["RANK"]
torch.save(trainer.model.state_dict(), os.path.join(sys.argv[2], f"rank{rank}.pt"))
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"losses": result.losses, "world": trainer.world.size}, f)
"""


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def recipe_dict(manifest, run_dir, **changes):
    data = tiny_recipe_dict(**{"training.max_steps": 3, "training.lr": 1e-2, "training.batch_size": 2,
                               "training.num_threads": 1, **changes})
    data["data"] = {"train": str(manifest)}
    data["training"]["output_dir"] = str(run_dir)
    return data


@pytest.fixture
def single_process(tone_dataset, tmp_path):
    """The reference: one process, batch 2, accumulating 2 micro-batches per step."""
    result = train(recipe_from_dict(recipe_dict(tone_dataset, tmp_path / "single", **{
        "training.grad_accum_steps": 2})), progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    return result.losses, model.state_dict()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tone_dataset, tmp_path,
                                                                                 single_process):
    losses, weights = single_process
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "ddp")))
    (tmp_path / "worker.py").write_text(WORKER)
    out = torchrun(str(tmp_path / "worker.py"), str(recipe), str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    for name, tensor in ranks[0].items():  # both ranks end with the same weights
        torch.testing.assert_close(ranks[1][name], tensor, rtol=0, atol=0, msg=name)
    for name, tensor in weights.items():  # ... which are the single process's
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert reports[0]["losses"] == reports[1]["losses"] == pytest.approx(losses, abs=1e-5)
    # only rank 0 wrote the run folder
    assert (tmp_path / "ddp" / "checkpoints" / "step-3").is_dir()
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_fsdp_through_the_cli_matches_one_process(tone_dataset, tmp_path, single_process):
    losses, weights = single_process
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "fsdp", **{"training.strategy": "fsdp"})))
    out = torchrun("-m", "alm_kit", "train", str(recipe), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("checkpoint: ") == 1  # rank 0 reports
    model, _ = load_checkpoint(tmp_path / "fsdp")
    for name, tensor in weights.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(losses, abs=1e-5)


@pytest.mark.slow
def test_the_demo_recipe_under_torchrun_matches_one_process(tmp_path):
    """README's `torchrun --nproc_per_node 2 -m alm_kit train recipes/demo.yaml`, at toy length: the demo
    trains its HTS-AT with `output: sed`, whose classifier head the loss never reaches; the engine
    leaves it out, so DDP needs no find_unused_parameters and the ranks train like one process."""
    from tests.training.test_training_run import demo_recipe

    # dropout off: each rank draws from its own RNG stream, one process from one
    single = train(demo_recipe(tmp_path, tmp_path / "single", "training.batch_size=2", "training.grad_accum_steps=2",
                               "training.max_steps=3", "model.projector.params.dropout=0.0"), progress=False)
    data = tmp_path / "data"
    overrides = ["model.projector.params.dropout=0.0", "training.max_steps=3", "training.batch_size=2", "training.warmup_steps=1", "training.log_every=1",
                 "training.num_threads=1", "data.eval=null", "training.device=cpu", f"data.synth.out_dir={data}",
                 "data.synth.n_train=32", "data.synth.n_test=4",  # as the single run's: its data is reused
                 f"data.train={data}/train.jsonl", f"training.output_dir={tmp_path / 'ddp'}"]
    recipe = os.path.join(os.getcwd(), "recipes", "demo.yaml")
    out = torchrun("-m", "alm_kit", "train", recipe, *overrides, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "left out of training" in out.stdout + out.stderr and "head.weight" in out.stdout + out.stderr
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(single.losses, abs=1e-4)
    ddp, _ = load_checkpoint(tmp_path / "ddp")
    reference, _ = load_checkpoint(single.checkpoint)
    mine = dict(ddp.named_parameters())  # parameters; BatchNorm statistics are each rank's own under DDP
    for name, tensor in reference.named_parameters():
        torch.testing.assert_close(mine[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


# --------------------------------------------------------------------------- data-parallel inference
@pytest.fixture
def inference_inputs(tmp_path):
    """A toy checkpoint, a generate input (a missing clip and a malformed line among 9) and an MCQ file."""
    from alm_kit.checkpoint import save_checkpoint
    from alm_kit.model import build_model
    from tests.conftest import write_tone

    recipe = recipe_from_dict(tiny_recipe_dict(**{"generation.max_new_tokens": 4, "generation.batch_size": 2}))
    checkpoint = save_checkpoint(build_model(recipe.model, seed=0).eval(), recipe, tmp_path / "ckpt")
    (tmp_path / "clips").mkdir()
    tones = [write_tone(tmp_path / "clips" / f"{i}.wav", 250.0 * (i + 1), 0.5 + 0.25 * i) for i in range(4)]
    rows = [json.dumps({"id": f"q{i}", "audio": [tones[i % 4], tones[(i + 1) % 4]][: 1 + i % 2],
                        "prompt": "which tone is higher? " * (1 + i % 3)}) for i in range(7)]
    rows.insert(4, json.dumps({"id": "gone", "audio": "clips/none.wav", "prompt": "?"}))
    rows.insert(6, '{"id": "cut", "audio": ')
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(rows) + "\n")
    items = [{"id": f"p{i}", "audio": [f"clips/{i % 4}.wav", f"clips/{(i + 1) % 4}.wav"],
              "question": f"which tone is higher ({i})?", "choices": ["first", "second"], "answer": "second"}
             for i in range(7)]
    items.insert(3, {"id": "gone", "audio": ["clips/none.wav"], "question": "?", "choices": ["a", "b"], "answer": "a"})
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(item) + "\n" for item in items))
    return checkpoint, source, bench


@pytest.mark.slow
def test_generate_and_eval_under_torchrun_equal_a_one_process_run(tmp_path, inference_inputs, capsys):
    """Each rank answers a share, rank 0 merges in input order; the resume state (answered rows, a
    part file of an interrupted torchrun run, the answer cache) is picked up as in one process."""
    from alm_kit.cli import EXIT_FAILED_ITEMS, main

    checkpoint, source, bench = inference_inputs
    common = ["--checkpoint", str(checkpoint), "--input", str(source), "--quiet", "--device", "cpu"]
    assert main(["generate", *common, "--output", str(tmp_path / "one.jsonl")]) == EXIT_FAILED_ITEMS
    assert main(["eval", str(checkpoint), str(bench), "--out", str(tmp_path / "eval-one"), "--quiet",
                 "--device", "cpu"]) == EXIT_FAILED_ITEMS
    capsys.readouterr()
    one = (tmp_path / "one.jsonl").read_text().splitlines()
    assert len(one) == 9 and [json.loads(line)["id"] for line in one][4:7] == ["gone", "q4", "in-7"]

    # an interrupted earlier run: two rows in the output, one (and a cut line) in rank 1's part file
    (tmp_path / "two.jsonl").write_text(one[0] + "\n" + one[5] + "\n")
    (tmp_path / "two.jsonl.part1").write_text(one[2] + "\n" + one[3][:20])
    (tmp_path / "eval-two").mkdir()
    cached = (tmp_path / "eval-one" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "eval-two" / "predictions.jsonl.part1").write_text("\n".join(cached[:2]) + "\n")

    out = torchrun("-m", "alm_kit", "generate", *common, "--output", str(tmp_path / "two.jsonl"), cwd=tmp_path)
    assert "(of 9)" in out.stdout and out.stdout.count("answered") == 1, out.stdout + out.stderr[-3000:]
    # q0, q4 and (from the part file) q2 were there; of the other six, "gone" and "cut" fail
    assert "4 answered, 2 failed, 3 already there" in out.stdout
    assert (tmp_path / "two.jsonl").read_text().splitlines() == one
    assert not list(tmp_path.glob("two.jsonl.part*"))

    out = torchrun("-m", "alm_kit", "eval", str(checkpoint), str(bench), "--out", str(tmp_path / "eval-two"),
                   "--quiet", "--device", "cpu", cwd=tmp_path)
    assert "2 answer(s) reused" in out.stdout and out.stdout.count("### jsonl") == 1, out.stdout + out.stderr[-3000:]
    mine, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("eval-one", "eval-two"))
    assert theirs["predictions"] == mine["predictions"] and theirs["table"] == mine["table"]
    assert theirs["failed"] == mine["failed"] and [f["id"] for f in mine["failed"]] == ["gone"]
    assert ((tmp_path / "eval-two" / "bench.predictions.jsonl").read_text()
            == (tmp_path / "eval-one" / "bench.predictions.jsonl").read_text())
    cache = (tmp_path / "eval-two" / "predictions.jsonl").read_text().splitlines()
    assert sorted(cache) == sorted(cached) and not list((tmp_path / "eval-two").glob("*.part*"))
    # rank 0 exits like one process, "finished with failed items"; torchrun reports it as a failure
    assert out.returncode != 0 and f"rank      : 0 (local_rank: 0)\n  exitcode  : {EXIT_FAILED_ITEMS}" in out.stderr
