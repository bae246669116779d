"""The engine around the loop: checkpoints and exact resume, crashes, bad loss, export, evaluation, watching."""

from __future__ import annotations

import json
import signal

import pytest
import safetensors
import torch
import yaml

from alm_kit.checkpoint import CheckpointError, export_checkpoint, load_checkpoint, resolve_checkpoint
from alm_kit.config.loader import recipe_from_dict
from alm_kit.data.batch import AudioTextDataset, collate
from alm_kit.data.manifest import read_manifest
from alm_kit.training.data import epoch_batches, padding_fraction
from alm_kit.training.engine import Trainer, TrainingError, train
from tests.conftest import assert_differs, tiny_recipe_dict

#: 8 examples in batches of 2: an epoch is 4 steps, so 6 steps cross an epoch boundary
RUN = {"training.max_steps": 6, "training.batch_size": 2, "training.lr": 1e-2, "training.warmup_steps": 1}


def recipe_dict(manifest, run_dir, **changes):
    data_keys = {k.removeprefix("data."): v for k, v in changes.items() if k.startswith("data.")}
    data = tiny_recipe_dict(**{**RUN, **{k: v for k, v in changes.items() if not k.startswith("data.")}})
    data["data"] = {"train": str(manifest), **data_keys}
    data["training"]["output_dir"] = str(run_dir)
    # dropout draws from the torch RNG, so exact resume also checks that the RNG state is restored
    data["model"]["projector"]["params"]["dropout"] = 0.1
    return data


def run(manifest, run_dir, *, resume=False, **changes):
    return train(recipe_from_dict(recipe_dict(manifest, run_dir, **changes)), progress=False, resume=resume)


def interrupt_at(monkeypatch, step):
    """Send SIGINT (Ctrl-C) to ourselves while the metrics of ``step`` are written."""
    from alm_kit.training.monitor import RunLog

    write = RunLog.write

    def write_and_interrupt(self, record, **kw):
        write(self, record, **kw)
        if record["step"] == step and "loss" in record:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(RunLog, "write", write_and_interrupt)


def test_ctrl_c_saves_and_resume_gives_the_losses_of_an_uninterrupted_run(tone_dataset, tmp_path, monkeypatch):
    whole = run(tone_dataset, tmp_path / "whole")
    assert len(whole.losses) == 6

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        first = run(tone_dataset, tmp_path / "split")
    # the signal arrives during step 2; step 3 finishes, is saved, and the run stops
    assert first.interrupted and first.steps == 3
    assert resolve_checkpoint(tmp_path / "split") == tmp_path / "split" / "checkpoints" / "step-3"
    assert signal.getsignal(signal.SIGINT) == before  # handler restored
    second = run(tone_dataset, tmp_path / "split", resume=True)
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert first.losses + second.losses == pytest.approx(whole.losses, abs=1e-6, rel=0)

    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    # and the weights match too
    a, _ = load_checkpoint(tmp_path / "whole")
    b, _ = load_checkpoint(tmp_path / "split")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_crash_while_saving_keeps_latest_on_a_whole_checkpoint_and_the_cli_resumes(tone_dataset, tmp_path,
                                                                                   monkeypatch, capsys):
    import safetensors.torch

    from alm_kit.cli import main

    whole = run(tone_dataset, tmp_path / "whole", **{"training.save_every": 2})
    real_save, calls = safetensors.torch.save_file, []

    def crash_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", crash_on_second_save)
        with pytest.raises(OSError, match="simulated"):
            run(tone_dataset, tmp_path / "crash", **{"training.save_every": 2})
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    assert not (checkpoints / "step-4").exists() and not (checkpoints / "step-4.tmp").exists()  # partial removed
    (checkpoints / "step-4.tmp").mkdir()  # what a killed process leaves: the next save replaces it
    load_checkpoint(tmp_path / "crash")  # the latest is whole

    recipe = tmp_path / "crash.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "crash", **{"training.save_every": 2})))
    assert main(["train", str(recipe), "--quiet"]) == 2  # not without --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(recipe), "--quiet", "--resume"]) == 0
    assert "checkpoint: " + str(checkpoints / "step-6") in capsys.readouterr().out
    metrics = [json.loads(line) for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in metrics] == pytest.approx(whole.losses, abs=1e-6, rel=0)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2", "step-4", "step-6"]


KILLED_AFTER_A_CHECKPOINT = """
import os, sys
import yaml
from alm_kit.config.loader import recipe_from_dict
from alm_kit.training.engine import train
from alm_kit.training.resume import RunCheckpoints

mark = RunCheckpoints.mark_latest

def mark_and_die(self, checkpoint):
    mark(self, checkpoint)
    if checkpoint.name == "step-4":
        os._exit(9)  # like kill -9: no cleanup, no flush of Python's buffers

RunCheckpoints.mark_latest = mark_and_die
train(recipe_from_dict(yaml.safe_load(open(sys.argv[1]))), progress=False)
"""


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_has_every_metric_up_to_it(tone_dataset, tmp_path):
    """Metrics reach the disk at every checkpoint, not only every log_every steps: a run killed
    (kill -9) after one and resumed has a record for every step."""
    import os
    import subprocess
    import sys

    changes = {"training.save_every": 2, "training.log_every": 100}
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "run", **changes)))
    (tmp_path / "worker.py").write_text(KILLED_AFTER_A_CHECKPOINT)
    out = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(recipe)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 9, out.stderr[-3000:]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    second = run(tone_dataset, tmp_path / "run", resume=True, **changes)
    assert second.resumed_from.name == "step-4"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[4:]] == second.losses


@pytest.mark.parametrize("writer, error", [
    ("safetensors.torch.save_file", lambda: safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")),
    ("torch.save", lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")),
    ("pathlib.Path.write_text", lambda: OSError(28, "No space left on device")),
], ids=["safetensors", "torch.save", "write_text"])
def test_a_full_disk_is_named_with_the_last_good_checkpoint_and_leaves_no_partial(tone_dataset, tmp_path,
                                                                                  monkeypatch, writer, error):
    """What each writer raised on a full 64 KiB tmpfs (os error 28; torch.save only sees a short write)."""
    import pkgutil

    real, calls = pkgutil.resolve_name(writer), []

    def fill_the_disk_on_the_second_checkpoint(*args, **kwargs):
        calls.append(args)
        if len([c for c in calls if "step-4.tmp" in str(c)]) == 1:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, fill_the_disk_on_the_second_checkpoint)
    with pytest.raises(CheckpointError) as failure:
        run(tone_dataset, tmp_path / "run", **{"training.save_every": 2})
    checkpoints = tmp_path / "run" / "checkpoints"
    message = str(failure.value)
    assert message.startswith(f"cannot write checkpoint {checkpoints / 'step-4'}: no space left on device (")
    assert f"the partial step-4.tmp was removed. The last good checkpoint is {checkpoints / 'step-2'}" in message
    assert "\n" not in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    load_checkpoint(tmp_path / "run")


def test_a_full_disk_before_the_first_checkpoint_is_one_line_from_the_cli(tone_dataset, tmp_path, monkeypatch,
                                                                         capsys):
    import errno

    from alm_kit.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "run", **{"training.max_steps": 1})))
    assert main(["train", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write checkpoint ") and "no space left on device" in err
    assert "No checkpoint of this run was written before; free some space and train again." in err
    assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_checkpoint_files_and_folders_reach_the_disk_before_the_renames_that_publish_them(tone_dataset, tmp_path,
                                                                                         monkeypatch):
    import os

    from alm_kit.training.resume import RunCheckpoints

    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return replace(src, dst)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the file descriptors")
    trainer = Trainer(recipe_from_dict(recipe_dict(tone_dataset, tmp_path / "run", **{"training.max_steps": 1})),
                      progress=False)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    trainer.fit()
    checkpoints = RunCheckpoints(tmp_path / "run", None).dir
    tmp, final = checkpoints / "step-1.tmp", checkpoints / "step-1"
    publish = events.index(("rename", str(tmp), str(final)))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = {str(p).replace(str(final), str(tmp)) for p in final.rglob("*")} | {str(tmp)}
    assert written <= synced_before, sorted(written - synced_before)
    latest = events.index(("rename", str(checkpoints / "latest.tmp"), str(checkpoints / "latest")))
    # the checkpoint's own rename is durable before `latest` names it, and `latest` after its rename
    assert ("fsync", str(checkpoints)) in events[publish:latest]
    assert ("fsync", str(checkpoints / "latest.tmp")) in events[publish:latest]
    assert ("fsync", str(checkpoints)) in events[latest:]


def test_a_malicious_trainer_state_or_recipe_is_refused_in_one_line(tone_dataset, tmp_path, capsys):
    """weights_only loading and the safe YAML loader refuse code; the CLI says so without a traceback."""
    import os

    from alm_kit.cli import main

    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tone_dataset, tmp_path / "run", **{"training.max_steps": 1})))
    assert main(["train", str(recipe), "--quiet"]) == 0
    checkpoint = resolve_checkpoint(tmp_path / "run")
    capsys.readouterr()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"step": 1, "optimizer": Payload()}, checkpoint / "trainer_state.pt")
    assert main(["train", str(recipe), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint / 'trainer_state.pt'}: refused: it holds Python objects other than "
                          "tensors") and "system" in err and len(err.strip().splitlines()) == 1

    (checkpoint / "recipe.yaml").write_text("name: x\nmodel: !!python/object/apply:os.system ['touch pwned']\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"audio": "audio/t0.wav", "question": "?", "choices": ["a", "b"], "answer": "a"}))
    for args in (["train", str(recipe), "--quiet", "--resume"],
                 ["generate", "--checkpoint", str(tmp_path / "run"), "--audio", "x.wav", "--prompt", "?"],
                 ["eval", str(checkpoint), str(bench)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"error: {checkpoint / 'recipe.yaml'}: refused: could not determine a constructor for "
                              "the tag 'tag:yaml.org,2002:python/object/apply:os.system' (line 2)"), err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_only_the_last_k_checkpoints_are_kept(tone_dataset, tmp_path):
    result = run(tone_dataset, tmp_path / "run", **{"training.max_steps": 5, "training.save_every": 1,
                                                    "training.keep_checkpoints": 2})
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-4", "step-5"]
    assert result.checkpoint == checkpoints / "step-5" == resolve_checkpoint(tmp_path / "run")
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and state["data"] == {"epoch": 1, "index": 1}
    assert {"python", "numpy", "torch"} <= set(state["rng"][0]) and state["optimizer"]["state"]


def test_resuming_with_a_changed_model_names_the_difference(tone_dataset, tmp_path):
    run(tone_dataset, tmp_path / "run", **{"training.max_steps": 1})
    changed = recipe_dict(tone_dataset, tmp_path / "run", **{"training.max_steps": 2})
    changed["model"]["projector"]["params"]["dropout"] = 0.2
    with pytest.raises(CheckpointError, match=r"model\.projector\.params\.dropout: 0\.1 != 0\.2"):
        train(recipe_from_dict(changed), progress=False, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(tone_dataset, tmp_path / "fresh", resume=True)


def test_non_finite_loss_stops_with_step_and_example_ids_and_keeps_the_last_checkpoint(tone_dataset, tmp_path,
                                                                                       monkeypatch):
    from alm_kit.model import AudioLanguageModel

    forward, calls, seen = AudioLanguageModel.forward, [], []

    def nan_on_third_batch(self, batch, **kw):
        out = forward(self, batch, **kw)
        calls.append(1)
        if len(calls) == 4:  # call 1 is the engine's probe of which parameters the loss reaches
            seen.extend(batch.ids)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(AudioLanguageModel, "forward", nan_on_third_batch)
    with pytest.raises(TrainingError) as error:
        run(tone_dataset, tmp_path / "run", **{"training.save_every": 1})
    message = str(error.value)
    assert "loss is nan at step 3" in message and ", ".join(seen) in message and "step-2" in message
    assert resolve_checkpoint(tmp_path / "run").name == "step-2"
    model, _ = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_export_merges_lora_into_a_model_that_loads_without_adapters(tone_dataset, tmp_path):
    changes = {"training.max_steps": 2, "model.decoder.train": "lora",
               "model.decoder.lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    result = run(tone_dataset, tmp_path / "run", **changes)
    lora, _ = load_checkpoint(result.checkpoint)
    assert any("lora_B" in k for k in lora.state_dict())
    out = export_checkpoint(tmp_path / "run", tmp_path / "export")
    merged, recipe = load_checkpoint(out)
    assert recipe.model.decoder.train == "full" and not any("lora_" in k for k in merged.state_dict())
    ds = AudioTextDataset(read_manifest(tone_dataset)[:4], lora.audio_specs)
    batch = collate([ds[i] for i in range(4)])
    with torch.no_grad():
        expected, got = lora.logits(batch), merged.logits(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the adapters did change the weights they were merged into
    lora_state, merged_state = lora.state_dict(), merged.state_dict()
    base = next(k for k in lora_state if k.endswith("q_proj.base_layer.weight"))
    assert_differs(merged_state[base.replace(".base_layer", "")], lora_state[base], atol=1e-6)


def test_length_bucketing_pads_less_than_random_batches_and_is_deterministic():
    import numpy as np

    lengths = np.random.default_rng(0).integers(5, 200, size=300).tolist()
    shuffled = epoch_batches(300, 8, seed=1, epoch=0)
    bucketed = epoch_batches(300, 8, seed=1, epoch=0, lengths=lengths, bucket_batches=8)
    assert sorted(i for b in bucketed for i in b) == list(range(300))
    assert padding_fraction(bucketed, lengths) < 0.5 * padding_fraction(shuffled, lengths)
    assert bucketed == epoch_batches(300, 8, seed=1, epoch=0, lengths=lengths, bucket_batches=8)
    assert bucketed != epoch_batches(300, 8, seed=1, epoch=1, lengths=lengths, bucket_batches=8)


def test_bucketed_training_runs_batches_of_similar_length(tone_dataset, tmp_path, monkeypatch):
    from alm_kit.model import AudioLanguageModel

    forward, clip_counts = AudioLanguageModel.forward, []

    def record(self, batch, **kw):
        clip_counts.append(sorted(batch.clips_per_example))
        return forward(self, batch, **kw)

    monkeypatch.setattr(AudioLanguageModel, "forward", record)
    run(tone_dataset, tmp_path / "run", **{"training.max_steps": 4, "training.bucket_by_length": True})
    # examples 0-3 have one clip, 4-7 two: bucketed batches never mix them (call 1 probes the first batch)
    assert len(clip_counts) == 5 and clip_counts[0] == clip_counts[1]
    assert all(len(set(c)) == 1 for c in clip_counts)


def test_too_long_responses_are_truncated_or_rejected(tone_dataset, tmp_path):
    rows = [json.loads(line) for line in tone_dataset.read_text().splitlines()]
    rows[1]["response"] = "low " * 40
    tone_dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cut = run(tone_dataset, tmp_path / "a", **{"training.max_steps": 4, "training.max_response_tokens": 8})
    assert cut.truncated == 1 and cut.rejected_examples == 0  # one epoch: the long example seen once
    kept = run(tone_dataset, tmp_path / "b", **{"training.max_steps": 4, "training.max_response_tokens": 8,
                                                "data.too_long": "reject"})
    assert kept.truncated == 0 and kept.rejected_examples == 1


def test_periodic_evaluation_logs_held_out_loss_and_accuracy(tone_dataset, tmp_path):
    test = [{"audio_id": f"audio/t{i}.wav", "question": "is the tone high or low?", "choices": ["high", "low"],
             "answer": "high" if i % 2 == 0 else "low"} for i in range(4)]
    (tone_dataset.parent / "test.json").write_text(json.dumps(test))
    data = recipe_dict(tone_dataset, tmp_path / "run", **{"training.max_steps": 4, "training.eval_every": 2,
                                                          "training.save_every": 2, "training.eval_max_items": 3})
    data["data"].update(valid=str(tone_dataset), eval=str(tone_dataset.parent / "test.json"))
    train(recipe_from_dict(data), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    # the held-out loss is the step-2 model's mean token loss on the first 3 examples
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-2")
    ds = AudioTextDataset(read_manifest(tone_dataset)[:3], model.audio_specs)
    with torch.no_grad():
        out = model(collate([ds[i] for i in range(3)]), max_response_tokens=256)
    assert evals[0]["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_metrics_go_to_tensorboard_when_it_is_installed(tone_dataset, tmp_path, monkeypatch):
    from alm_kit.training import monitor

    scalars = []

    class FakeWriter:
        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setattr(monitor, "tensorboard_writer", lambda log_dir: FakeWriter())
    run(tone_dataset, tmp_path / "run", **{"training.max_steps": 2})
    assert ("loss", 1) in scalars and ("lr", 2) in scalars and scalars[-1] == ("closed", None)
    scalars.clear()
    run(tone_dataset, tmp_path / "off", **{"training.max_steps": 1, "training.tensorboard": False})
    assert scalars == []


def test_plot_writes_a_png_of_the_curves(tone_dataset, tmp_path):
    pytest.importorskip("matplotlib")
    from alm_kit.cli import main

    run(tone_dataset, tmp_path / "run", **{"training.max_steps": 3})
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_compile_switch_compiles_the_decoder(tone_dataset, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    trainer = Trainer(recipe_from_dict(recipe_dict(tone_dataset, tmp_path / "run", **{
        "training.max_steps": 1, "training.compile": True})), progress=False)
    trainer.fit()
    assert compiled == [type(trainer.model.decoder).__name__]


# --------------------------------------------------------------------------- the shipped demo recipe
#: the demo recipe at toy length: its own model (HTS-AT trained with `output: sed`, whose classifier
#: head the loss never reaches), 32 synthetic examples, 4 steps of 4
DEMO_SHORT = ["training.max_steps=4", "training.batch_size=4", "training.warmup_steps=1", "training.log_every=1",
              "data.synth.n_train=32", "data.synth.n_test=4", "data.eval=null", "training.device=cpu"]


def demo_recipe(tmp_path, run_dir, *extra):
    from alm_kit.config import load_recipe

    data = tmp_path / "data"
    return load_recipe("recipes/demo.yaml", [*DEMO_SHORT, f"data.synth.out_dir={data}",
                                             f"data.train={data}/train.jsonl", f"training.output_dir={run_dir}",
                                             *extra])


def test_demo_recipe_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """The parameters the loss never reaches are left out of the optimizer, so the optimizer state of
    a checkpoint is complete and --resume continues the run exactly."""
    whole_trainer = Trainer(demo_recipe(tmp_path, tmp_path / "whole"), progress=False)
    whole = whole_trainer.fit()
    assert "encoders.htsat.htsat.head.weight" in whole_trainer.left_out
    assert not whole_trainer.model.get_parameter("encoders.htsat.htsat.head.weight").requires_grad
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        first = train(demo_recipe(tmp_path, tmp_path / "split"), progress=False)
    assert first.interrupted and first.steps == 2
    second = train(demo_recipe(tmp_path, tmp_path / "split"), progress=False, resume=True)
    assert second.resumed_from.name == "step-2" and second.steps == 4
    assert first.losses + second.losses == pytest.approx(whole.losses, abs=1e-6, rel=0)
    state = torch.load(tmp_path / "split" / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    assert state["left_out"] == whole_trainer.left_out


def test_training_steps_read_nothing_back_between_sync_points(tone_dataset, tmp_path, monkeypatch):
    """No alm-kit code reads a tensor on the host inside a training step (``.item()``, ``.tolist()``,
    ``bool``/``int``/``float`` of a tensor, a boolean-mask index): losses are read every ``log_every``
    steps, and the metrics are those of a run that reads them every step."""
    import inspect

    every = run(tone_dataset, tmp_path / "every", **{"training.log_every": 1})
    reads: list[str] = []
    in_step = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if in_step:
                caller = inspect.stack()[1]
                if "/alm_kit/" in caller.filename:
                    reads.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    step = Trainer._train_step

    def watched(self, *args):
        in_step.append(1)
        try:
            return step(self, *args)
        finally:
            in_step.clear()

    monkeypatch.setattr(Trainer, "_train_step", watched)
    sparse = run(tone_dataset, tmp_path / "sparse", **{"training.log_every": 3})
    assert reads == []
    assert sparse.losses == pytest.approx(every.losses, abs=1e-6)
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == pytest.approx(every.losses, abs=1e-6)


def test_mfu_is_reported_from_the_counted_flops_of_a_step(tone_dataset, tmp_path):
    """MFU = FLOPs of a step (counted by PyTorch's FlopCounterMode on the first micro-batch, times the
    accumulation steps) x steps / seconds / peak; with no peak known (the CPU) there is none."""
    flops = {}
    for batch in (2, 4):
        trainer = Trainer(recipe_from_dict(recipe_dict(tone_dataset, tmp_path / f"b{batch}", **{
            "training.batch_size": batch, "training.max_steps": 3, "training.peak_tflops": 0.001,
            "training.grad_accum_steps": 2})), progress=False)
        trainer.fit()
        flops[batch] = trainer.step_flops
        records = [json.loads(line) for line in (tmp_path / f"b{batch}" / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            assert r["mfu"] == pytest.approx(trainer.step_flops * r["step"] / r["elapsed_s"] / 1e9, rel=1e-6)
    assert 1.6 < flops[4] / flops[2] < 2.4  # twice the examples, about twice the work
    plain = run(tone_dataset, tmp_path / "cpu", **{"training.max_steps": 1})
    assert "mfu" not in json.loads((plain.run_dir / "metrics.jsonl").read_text().splitlines()[0])
