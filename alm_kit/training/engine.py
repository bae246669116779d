"""The training engine: one loop for every recipe (docs/training.md lists every key it reads).

A step: ``grad_accum_steps`` micro-batches of this rank's :class:`~alm_kit.training.data.TrainingData`
(a resumable stream: manifests, or shards), each under bf16 autocast on CUDA (fp32 on the CPU),
loss on response tokens only; then a check that every loss was finite, gradient clipping, AdamW
(one group per component, its own learning rate, no decay on norms and biases; fused on CUDA) and
the warm-up + cosine schedule. Around it: checkpoints every ``save_every`` steps and at the end
with everything an exact resume needs, Ctrl-C/SIGTERM saving, periodic evaluation, metrics, and
the same code under torchrun (distributed.py). The pieces live next to this module: data.py,
checkpointing.py, distributed.py, monitor.py, feature_cache.py, objectives.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alm_kit.checkpoint import (
    CheckpointError,
    checkpoint_keys,
    differences,
    load_weights,
    read_recipe,
    read_trainer_state,
    save_checkpoint,
)
from alm_kit.config.loader import dump_recipe, origin_of, recipe_to_dict
from alm_kit.config.schema import Recipe
from alm_kit.data.batch import AudioTextDataset, collate
from alm_kit.data.manifest import Example, check_audio_files, read_manifest
from alm_kit.data.shards import ShardData, shard_paths
from alm_kit.errors import AlmKitError
from alm_kit.model import AudioLanguageModel, build_model
from alm_kit.text.templates import apply_response_template
from alm_kit.training import distributed
from alm_kit.training.checkpointing import RunCheckpoints, rng_state, set_rng_state
from alm_kit.training.data import ManifestData, TrainingData
from alm_kit.training.distributed import resolve_device  # noqa: F401  (alm_kit.cli imports it from here)
from alm_kit.training.feature_cache import FeatureCache, open_cache, random_crop_encoders
from alm_kit.training.monitor import RunLog
from alm_kit.training.objectives import build_objective
from alm_kit.training.warm_start import init_from_checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    #: the last checkpoint written (RUN_DIR/checkpoints/step-N)
    checkpoint: Path | None
    steps: int
    #: mean loss of each optimizer step this process ran (after the resumed step, when resuming)
    losses: list[float] = field(default_factory=list)
    skipped_examples: int = 0
    evaluation: dict[str, Any] | None = None
    resumed_from: Path | None = None
    #: stopped by Ctrl-C / SIGTERM (a checkpoint of the last step was saved)
    interrupted: bool = False
    #: responses cut to training.max_response_tokens
    truncated: int = 0
    #: examples dropped for a too long response (data.too_long: reject)
    rejected_examples: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def ensure_training_data(recipe: Recipe, progress: bool = True) -> dict | None:
    """Make the synthetic data set when the recipe asks for it and the manifest is missing (or, in
    data.synth.out_dir, was made with other settings); its metadata, or None without data.synth."""
    synth = recipe.data.synth
    if synth is None or not isinstance(recipe.data.train, str):
        return None
    train = Path(recipe.data.train)
    if train.exists() and train.resolve().parent != Path(synth.out_dir).resolve():
        return None
    from alm_kit.data.synth import ensure_synth

    return ensure_synth(synth.out_dir, n_train=synth.n_train, n_test=synth.n_test, seed=synth.seed,
                        speech=synth.speech, tasks=synth.tasks, progress=progress,
                        log=tqdm.write if progress else lambda _message: None)


def load_examples(recipe: Recipe, path: str, limit: int | None) -> tuple[list[Example], list[str]]:
    template = recipe.data.response_template
    examples = apply_response_template(read_manifest(path, recipe.data.format, require_response=template is None),
                                       template)
    if limit is not None:
        examples = examples[:limit]
    return check_audio_files(examples, skip_bad=recipe.data.skip_bad_audio)


def param_groups(model: AudioLanguageModel, recipe: Recipe) -> list[dict[str, Any]]:
    """One group per (component, decay or not): norms, biases and 1-d weights get no weight decay."""
    groups = []
    for path, (module, spec) in model.components().items():
        lr = spec.lr or recipe.training.lr
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        for params, wd in ((decay, recipe.training.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": path})
    if not groups:
        raise ValueError("nothing to train: every component is frozen")
    return groups


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def unreached_parameters(model: AudioLanguageModel, objective, batch, cfg, device: torch.device) -> list[str]:
    """Names of the trainable parameters that ``objective``'s loss on ``batch`` does not depend on.

    One forward pass in training mode and ``torch.autograd.grad(allow_unused=True)``; buffers (BatchNorm
    statistics) and RNG streams are put back, so the run continues as if it had not happened.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    saved_rng = rng_state()
    model.train()
    try:
        with autocast_for(device, cfg.precision):
            loss = objective(model, batch, max_response_tokens=cfg.max_response_tokens).loss
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        set_rng_state(saved_rng)
    return [name for (name, _), grad in zip(trainable, grads) if grad is None]


class TrainingError(AlmKitError):
    """A run cannot go on (non-finite loss, no data); the message says where and what is intact."""


class Trainer:
    """One run: ``Trainer(recipe).fit()``. Under torchrun every rank builds one (see distributed.py)."""

    def __init__(self, recipe: Recipe, *, progress: bool = True, run_dir: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.recipe = recipe
        cfg = recipe.training
        self.world, self.device = distributed.setup(cfg.device, cfg.strategy)
        self.progress = progress and self.world.is_main
        self.run_dir = Path(run_dir or recipe.output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.checkpoints = RunCheckpoints(self.run_dir, cfg.keep_checkpoints)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (bf16 autocast covers the rest)
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed)
        self.model = build_model(recipe.model, origin=lambda key: origin_of(recipe, key), seed=cfg.seed).to(self.device)
        self.objective = build_objective(self.model, recipe, world_size=self.world.size).to(self.device)
        if cfg.init_from:
            loaded = init_from_checkpoint(self.model, cfg.init_from, cfg.init_components)
            self.log(f"initialised {len(loaded)} tensors from {cfg.init_from}")
        self.wrapped: torch.nn.Module = self.model
        self.cache: FeatureCache | None = None
        self._stop_requested = False
        #: trainable parameters the loss never reaches, frozen before training (see _leave_out_unreached)
        self.left_out: list[str] = []

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def _feature_cache(self, sources, total: int | None = None) -> FeatureCache | None:
        """Open the cache ``training.cache_features`` asks for and encode the clips it lacks."""
        cache = open_cache(self.model, self.recipe.training)
        if cache is not None:
            crops = random_crop_encoders(self.model)
            if crops:
                self.log(f"feature cache: encoder(s) {', '.join(crops)} crop at random in training; cached "
                         "features use the evaluation crop (training.cache_features=off for random crops)")
            report = cache.fill(self.model, sources, total=total, progress=self.progress)
            where = getattr(cache.store, "root", "memory")
            self.log(f"feature cache ({where}): {report}")
        return cache

    # ------------------------------------------------------------------ data
    def _training_data(self, examples: list[Example], valid: list[Example]) -> ManifestData:
        """The training batches of this rank (any :class:`~alm_kit.training.data.TrainingData` fits the loop)."""
        cfg = self.recipe.training
        clips = list(dict.fromkeys(p for e in examples + valid for p in e.audio))
        with self._main_first():
            self.cache = self._feature_cache(clips, total=len(clips))
        dataset = AudioTextDataset(examples, self.model.audio_specs, train=True, seed=cfg.seed, cache=self.cache)
        lengths = self._lengths(examples) if cfg.bucket_by_length else None
        return ManifestData(dataset, cfg.batch_size, seed=cfg.seed, rank=self.world.rank, world=self.world.size,
                            lengths=lengths, num_workers=cfg.num_workers)

    def _shard_data(self, shards: list[str], valid: list[Example]) -> ShardData:
        """Training batches streamed from this rank's WebDataset shards (alm_kit/data/shards.py)."""
        recipe, cfg = self.recipe, self.recipe.training
        if recipe.data.too_long == "reject":
            raise TrainingError("data.too_long: reject needs a manifest (shards are streamed, not checked ahead); "
                             "use truncate")
        data = ShardData(shards, self.model.audio_specs, cfg.batch_size, seed=cfg.seed, rank=self.world.rank,
                         world=self.world.size, shuffle_buffer=recipe.data.shuffle_buffer,
                         limit=recipe.data.max_train_examples, response_template=recipe.data.response_template,
                         num_workers=cfg.num_workers)
        # every rank encodes the clips of its own shards (a disk cache takes concurrent writers)
        self.cache = data.cache = self._feature_cache(
            itertools.chain(data.clips(), dict.fromkeys(p for e in valid for p in e.audio)))
        return data

    def _lengths(self, examples: list[Example]) -> list[tuple[int, int]]:
        """Bucketing key of each example: (clips, prompt + response tokens as trained)."""
        text = self.model.layout.tokenize([e.prompt for e in examples], [e.response for e in examples])
        limit = self.recipe.training.max_response_tokens
        return [(len(e.audio), len(p) + min(len(r), limit))
                for e, p, r in zip(examples, text.prompt_ids, text.response_ids)]

    def _apply_too_long(self, examples: list[Example]) -> list[Example]:
        """``data.too_long: reject`` drops examples whose response is longer than training.max_response_tokens."""
        if self.recipe.data.too_long != "reject":
            return examples
        limit = self.recipe.training.max_response_tokens
        responses = self.model.layout.tokenize([e.prompt for e in examples], [e.response for e in examples])
        kept = [e for e, r in zip(examples, responses.response_ids) if len(r) <= limit]
        rejected = [e.id for e, r in zip(examples, responses.response_ids) if len(r) > limit]
        if rejected:
            self.log(f"rejected {len(rejected)} example(s) with a response longer than training.max_response_tokens"
                     f"={limit} (data.too_long: reject): {', '.join(rejected[:5])}{' ...' if len(rejected) > 5 else ''}")
        if not kept:
            raise TrainingError(f"{self.recipe.data.train}: every example has a response longer than "
                                f"training.max_response_tokens={limit} (data.too_long: reject)")
        return kept

    @contextmanager
    def _main_first(self):
        """Rank 0 runs the block first (it may write shared files), then the other ranks."""
        if self.world.enabled and not self.world.is_main:
            torch.distributed.barrier()
        yield
        if self.world.enabled and self.world.is_main:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ unreached parameters
    def _leave_out_unreached(self, batch, state: dict[str, Any] | None) -> None:
        """Freeze every trainable parameter that the loss does not depend on (HTS-AT's classifier head
        when its SED posteriors are the output, say), so that it is in neither the optimizer nor
        DDP's gradient reduction: AdamW would keep no state for it (a checkpoint then lacks its
        state) and DDP would wait for its gradient forever.

        Which parameters those are is read off the autograd graph of one forward pass on the first
        batch, united over the ranks; model, RNG streams and data position are left as they were.
        A resumed run takes the list its checkpoint recorded, so it trains exactly what the
        interrupted run trained.
        """
        params = dict(self.model.named_parameters())
        if state is not None and "left_out" in state:
            names = list(state["left_out"])
        else:
            names = unreached_parameters(self.model, self.objective, batch, self.recipe.training, self.device)
            if self.world.enabled:  # a parameter reached on any rank stays
                reached = torch.tensor([n not in names for n in params if params[n].requires_grad],
                                       dtype=torch.float32, device=self.device)
                torch.distributed.all_reduce(reached, op=torch.distributed.ReduceOp.MAX)
                trainable = [n for n in params if params[n].requires_grad]
                names = [n for n, hit in zip(trainable, reached.tolist()) if not hit]
        for name in names:
            params[name].requires_grad_(False)
        self.left_out = names
        if names:
            count = sum(params[n].numel() for n in names)
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            self.log(f"left out of training {count:,} parameters that the loss never reaches: {shown}")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_to_resume(self) -> Path | None:
        latest = self.checkpoints.latest()
        if self.resume:
            if latest is None:
                raise CheckpointError(f"nothing to resume: {self.checkpoints.dir / 'latest'} not found "
                                      "(train without --resume to start the run)")
            return latest
        if latest is not None or self.checkpoints.steps():
            if not self.overwrite:
                raise TrainingError(f"{self.run_dir} holds checkpoints of an earlier run: pass --resume to "
                                    "continue it, or --overwrite to delete them and start again")
            if self.world.is_main:
                self.checkpoints.clear()
        return None

    def _restore_weights(self, checkpoint: Path) -> dict[str, Any]:
        """Check the checkpoint was made for this recipe's model, load its weights; its trainer state."""
        saved = recipe_to_dict(read_recipe(checkpoint))
        ours = recipe_to_dict(self.recipe)
        model_diff = differences(saved["model"], ours["model"], "model")
        if model_diff:
            raise CheckpointError(
                f"{checkpoint} was trained with a different model than this recipe; differences "
                "(checkpoint != recipe): " + "; ".join(model_diff[:8]) + (" ..." if len(model_diff) > 8 else ""))
        changed = [d for section in ("data", "training") for d in differences(saved[section], ours[section], section)
                   if not d.startswith("training.output_dir")]
        if changed:
            self.log("resuming with changed settings (checkpoint != recipe): " + "; ".join(changed))
        load_weights(self.model, checkpoint)
        return read_trainer_state(checkpoint)

    def _save(self, step: int, optimizer, scheduler, data: TrainingData) -> Path | None:
        """A complete checkpoint of this step; a collective under torchrun, written by rank 0."""
        state = distributed.model_state(self.model, checkpoint_keys(self.model), self.world)
        optim = distributed.optimizer_state(self.model, optimizer, self.world)
        rngs = distributed.gather(rng_state(), self.world)
        if not self.world.is_main:
            return None
        trainer_state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                         "data": data.state_dict(), "rng": rngs, "world_size": self.world.size,
                         "left_out": list(self.left_out)}
        path = save_checkpoint(self.model, self.recipe, self.checkpoints.path(step), {"step": step},
                               state=state, trainer_state=trainer_state)
        self.checkpoints.mark_latest(path)
        return path

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, valid: list[Example]) -> dict[str, float]:
        """Held-out loss on data.valid and multiple-choice accuracy on data.eval, RNG streams untouched."""
        recipe, cfg = self.recipe, self.recipe.training
        out: dict[str, float] = {}
        runs_here = self.world.is_main or self.world.sharded  # sharded weights: every rank takes part
        if not runs_here:
            return out
        saved_rng = rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                if valid:
                    out["eval_loss"] = self._held_out_loss(valid[: cfg.eval_max_items])
                if recipe.data.eval and not self.world.sharded:
                    from alm_kit.evaluation.mcq import evaluate_file

                    result = evaluate_file(self.model, recipe.data.eval, recipe.generation,
                                           limit=cfg.eval_max_items, progress=False)
                    out["eval_accuracy"] = result["table"]["overall"]["accuracy"]
        finally:
            self.model.train()
            set_rng_state(saved_rng)
        return out

    def _held_out_loss(self, examples: list[Example]) -> float:
        """Mean loss per response token over the examples."""
        cfg = self.recipe.training
        dataset = AudioTextDataset(examples, self.model.audio_specs, cache=self.cache)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate)
        total = tokens = 0.0
        for batch in loader:
            with autocast_for(self.device, cfg.precision):
                out = self.model(batch, max_response_tokens=cfg.max_response_tokens)
            total += out.loss.item() * out.num_tokens
            tokens += out.num_tokens
        return total / max(tokens, 1)

    # ------------------------------------------------------------------ the loop
    @contextmanager
    def _stop_on_signal(self):
        """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop (a second Ctrl-C aborts).

        Signals within 2 s of the first count as the same request: under torchrun a worker gets the
        terminal's SIGINT and, right after, the one the launcher forwards.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        first = []

        def request_stop(signum, frame):
            if self._stop_requested:
                if signum == signal.SIGINT and time.monotonic() - first[0] > 2.0:
                    raise KeyboardInterrupt
                return
            first.append(time.monotonic())
            self._stop_requested = True
            self.log(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                     "(press Ctrl-C again to abort without saving)")

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def fit(self) -> TrainResult:
        try:
            with self._stop_on_signal():
                return self._fit()
        finally:
            distributed.teardown(self.world)

    def _fit(self) -> TrainResult:
        recipe, cfg, world = self.recipe, self.recipe.training, self.world
        if not recipe.data.train:
            raise ValueError("the recipe names no training data: set data.train "
                             "(and data.synth to generate the synthetic set there)")
        with self._main_first():
            made = ensure_training_data(recipe, self.progress)
        if made:
            self.log(f"data: synthetic set {recipe.data.synth.out_dir} (seed {made['seed']}, {made['n_train']} "
                     f"training / {made['n_test']} test items), tasks: {', '.join(made['tasks'])}")
        shards = shard_paths(recipe.data.train)  # None: a manifest
        examples, problems = ([], []) if shards else load_examples(recipe, recipe.data.train,
                                                                    recipe.data.max_train_examples)
        for problem in problems:
            self.log(f"skipped: {problem}")
        if problems:
            self.log(f"skipped {len(problems)} example(s) with bad audio (data.skip_bad_audio)")
        if not examples and not shards:
            raise ValueError(f"{recipe.data.train}: no usable training examples")
        before = len(examples)
        examples = examples if shards else self._apply_too_long(examples)
        valid = load_examples(recipe, recipe.data.valid, cfg.eval_max_items)[0] if recipe.data.valid else []
        with self._main_first():
            resume_from = self._checkpoint_to_resume()
            if world.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "recipe.yaml").write_text(dump_recipe(recipe))

        data = self._shard_data(shards, valid) if shards else self._training_data(examples, valid)
        state = self._restore_weights(resume_from) if resume_from else None
        if state is not None:
            data.load_state_dict(state["data"])
        batches = iter(data)
        first = next(batches)
        self._leave_out_unreached(first, state)
        batches = itertools.chain([first], batches)
        if cfg.compile:
            self.model.decoder.compile()
        self.wrapped = distributed.wrap(self.model, world)
        if data.batches_per_epoch is None and cfg.max_steps is None:
            raise TrainingError("the training data cannot say how long an epoch is: set training.max_steps")
        steps_per_epoch = math.ceil((data.batches_per_epoch or 1) / cfg.grad_accum_steps)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        optimizer = torch.optim.AdamW(param_groups(self.model, recipe), lr=cfg.lr,
                                      fused=True if self.device.type == "cuda" else None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
        self.objective.configure_optimizer(recipe, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        step = 0
        if state is not None:
            distributed.load_optimizer_state(self.model, optimizer, state["optimizer"], world)
            scheduler.load_state_dict(state["scheduler"])
            rngs = state["rng"]
            set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
            step = int(state["step"])
            self.log(f"resuming {resume_from} at step {step} (epoch {data.state_dict().get('epoch')})")
        self.log(f"training {sum(p.numel() for p in trainable):,} of "
                 f"{sum(p.numel() for p in self.model.parameters()):,} parameters for {total} steps on "
                 f"{self.device}" + (f" x {world.size} ranks ({world.strategy})" if world.enabled else ""))

        run_log = RunLog(self.run_dir, enabled=world.is_main, resume_step=step if state else None,
                         tensorboard=cfg.tensorboard, flush_every=cfg.log_every)
        result = TrainResult(self.run_dir, None, step, skipped_examples=len(problems), resumed_from=resume_from,
                             rejected_examples=before - len(examples))
        self.model.train()
        accum = cfg.grad_accum_steps
        saved_step = step if state else None
        samples, truncated, started = 0, 0, time.perf_counter()
        bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not self.progress)
        try:
            while step < total:
                micro_losses, micro_ids = [], []
                for k in range(accum):
                    batch = next(batches)
                    with distributed.gradient_sync(self.wrapped, world, sync=k == accum - 1):
                        with autocast_for(self.device, cfg.precision):
                            out = self.objective(self.wrapped, batch, max_response_tokens=cfg.max_response_tokens)
                        (out.loss / accum).backward()
                    micro_losses.append(out.loss.detach().float())
                    micro_ids.append(batch.ids)
                    truncated += out.truncated
                    samples += len(batch)
                losses = torch.stack(micro_losses)
                finite = torch.isfinite(losses)
                loss_sum, n_micro, bad, n_samples, stop = distributed.all_sum(
                    torch.stack([torch.where(finite, losses, 0).sum(), torch.tensor(float(accum), device=losses.device),
                                 (~finite).sum().float(), torch.tensor(float(samples), device=losses.device),
                                 torch.tensor(float(self._stop_requested), device=losses.device)]), world, self.device)
                if bad:
                    self._fail_on_nonfinite(step + 1, losses, micro_ids)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.objective.step()
                step += 1
                mean = loss_sum / n_micro
                result.losses.append(mean)
                elapsed = time.perf_counter() - started
                record = {"step": step, "epoch": data.state_dict().get("epoch"), "loss": mean,
                          "lr": scheduler.get_last_lr()[0], "samples_per_s": n_samples / elapsed,
                          "elapsed_s": elapsed}
                run_log.write(record, flush=step == total)
                if step % cfg.log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{mean:.3f}", lr=f"{record['lr']:.2e}",
                                    samples_s=f"{record['samples_per_s']:.1f}")
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and (recipe.data.eval or valid):
                    scores = self._evaluate(valid)
                    if scores:
                        run_log.write({"step": step, **scores}, flush=True)
                        self.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                if stop:
                    result.interrupted = True
                    break
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    self._save(step, optimizer, scheduler, data)
                    saved_step = step
        finally:
            bar.close()
            run_log.close()
        if truncated:
            self.log(f"truncated {truncated} response(s) longer than training.max_response_tokens="
                     f"{cfg.max_response_tokens}")
        result.truncated, result.steps = truncated, step
        if saved_step != step:
            self._save(step, optimizer, scheduler, data)
        result.checkpoint = self.checkpoints.path(step)
        self.log(f"saved {result.checkpoint}" + (" (interrupted; continue with --resume)" if result.interrupted else ""))
        if recipe.data.eval and not result.interrupted and world.is_main and not world.sharded:
            from alm_kit.evaluation.mcq import evaluate_file

            result.evaluation = evaluate_file(self.model, recipe.data.eval, recipe.generation,
                                              limit=recipe.data.max_eval_examples, progress=self.progress)
            (self.run_dir / "eval.json").write_text(json.dumps(result.evaluation, indent=2))
        return result

    def _fail_on_nonfinite(self, step: int, losses: torch.Tensor, ids: list[list[str]]) -> None:
        """Stop every rank before the update; name the step and the examples of the bad micro-batches."""
        mine = [i for loss, batch_ids in zip(losses.tolist(), ids) if not math.isfinite(loss) for i in batch_ids]
        values = sorted({str(v) for v in losses.tolist() if not math.isfinite(v)})
        everyone = [i for rank_ids in distributed.gather(mine, self.world) for i in rank_ids]
        latest = self.checkpoints.latest()
        raise TrainingError(
            f"loss is {'/'.join(values) or 'not finite'} at step {step}, batch example ids: {', '.join(everyone)}; "
            "stopped before updating the weights. "
            + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written yet."))


def train(recipe: Recipe, *, progress: bool = True, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    return Trainer(recipe, progress=progress, run_dir=run_dir, resume=resume, overwrite=overwrite).fit()
