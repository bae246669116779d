"""The training engine: one loop for every recipe (docs/training.md lists every key it reads).

A step: ``grad_accum_steps`` micro-batches of this rank's :class:`~alm_kit.training.data.TrainingData`
(a resumable stream: manifests, or shards), each under bf16 autocast on CUDA (fp32 on the CPU),
loss on response tokens only; then a check that every loss was finite, gradient clipping, AdamW
(one group per component, its own learning rate, no decay on norms and biases; fused on CUDA) and
the warm-up + cosine schedule. Around it: checkpoints every ``save_every`` steps and at the end
with everything an exact resume needs, Ctrl-C/SIGTERM saving, periodic evaluation, metrics, and
the same code under torchrun (distributed.py). The pieces live next to this module: data.py,
resume.py, distributed.py, monitor.py, feature_cache.py, objectives.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    init_from_checkpoint,
    load_weights,
    read_recipe,
    read_trainer_state,
    save_checkpoint,
)
from alm_kit.config.loader import dump_recipe, origin_of, recipe_to_dict
from alm_kit.config.schema import Recipe
from alm_kit.data.batch import AudioTextDataset, Batch, collate
from alm_kit.data.loading import ensure_training_data, load_examples
from alm_kit.data.manifest import Example
from alm_kit.data.shards import shard_paths
from alm_kit.errors import AlmKitError
from alm_kit.model import AudioLanguageModel, build_model
from alm_kit.runtime import autocast
from alm_kit.training import distributed
from alm_kit.training.data import ManifestData, ShardData, TrainingData
from alm_kit.training.feature_cache import FeatureCache, open_cache, random_crop_encoders
from alm_kit.training.monitor import RunLog
from alm_kit.training.objectives import build_objective
from alm_kit.training.resume import RunCheckpoints, rng_state, set_rng_state


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


def probe_step(model: AudioLanguageModel, objective, batch, cfg, device: torch.device) -> tuple[list[str], int]:
    """One training forward and backward on ``batch`` that changes nothing: the names of the trainable
    parameters the loss does not depend on, and the FLOPs of the pass (the MFU's numerator).

    ``torch.autograd.grad(allow_unused=True)`` finds the unreached parameters; PyTorch's
    ``FlopCounterMode`` counts the matmuls, convolutions and attention of forward and backward.
    Buffers (BatchNorm statistics) and RNG streams are put back, so the run continues as if the pass
    had not happened.
    """
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return [], 0
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    saved_rng = rng_state()
    model.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter, autocast(device, cfg.precision):
            loss = objective(model, batch, max_response_tokens=cfg.max_response_tokens).loss
            grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        set_rng_state(saved_rng)
    return [name for (name, _), grad in zip(trainable, grads) if grad is None], int(counter.get_total_flops())


#: dense bf16 tensor-core peaks (TFLOP/s) of common GPUs, for the MFU; training.peak_tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10G": 125.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak for the MFU: ``training.peak_tflops``, or the table above by GPU name (None on
    the CPU or an unknown GPU: no MFU is reported)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


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
        #: what the optimizer updates (set by _setup_optimizer)
        self.trainable: list[torch.nn.Parameter] = []
        #: FLOPs of one optimizer step (forward + backward of its micro-batches, counted on the first)
        self.step_flops = 0

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def _feature_cache(self, sources, total: int | None = None) -> FeatureCache | None:
        """Open the cache ``training.cache_features`` asks for and encode the clips it lacks; on CUDA, hold
        it in GPU memory when ``training.cache_on_device`` allows (a list of ``sources`` only)."""
        cfg = self.recipe.training
        cache = open_cache(self.model, cfg)
        if cache is None:
            return None
        cached_crops, live_crops = random_crop_encoders(self.model, cache)
        if cached_crops:
            self.log(f"feature cache: encoder(s) {', '.join(cached_crops)} crop at random in training; cached "
                     "features use the evaluation crop (training.cache_features=off for random crops)")
        if live_crops:
            self.log(f"feature cache: encoder(s) {', '.join(live_crops)} run at every step and crop at random, "
                     f"the cached {', '.join(cache.keys)} use the evaluation crop: they see different parts "
                     "of long clips (training.cache_features=off to keep them together)")
        live = [name for name in self.model.encoders if name not in cache.keys]
        if live:
            self.log(f"feature cache: holds {', '.join(cache.keys)}; {', '.join(live)} train or have trainable "
                     "parameters and run at every step")
        report = cache.fill(self.model, sources, total=total, progress=self.progress)
        where = getattr(cache.store, "root", "memory")
        self.log(f"feature cache ({where}): {report}")
        # GPU-resident features only when no encoder runs live: the live ones need audio decoded in
        # DataLoader worker processes, which cannot hand CUDA tensors on
        if cfg.cache_on_device is True and live:
            self.log("feature cache: training.cache_on_device=true is not used: encoders that run at every step "
                     "need their audio decoded in worker processes, so a partial cache stays in host memory")
        if self.device.type == "cuda" and cfg.cache_on_device is not False and isinstance(sources, list) and not live:
            free = torch.cuda.mem_get_info(self.device)[0]
            budget = free if cfg.cache_on_device is True else free // 5
            resident = cache.on_device(sources, self.device, budget)
            if resident is not None:
                self.log(f"feature cache: {len(resident.store)} entries held in GPU memory")
                return resident
            self.log("feature cache: larger than a fifth of the free GPU memory; read from "
                     f"{where} each step (training.cache_on_device=true forces it)")
        return cache

    def _workers(self) -> tuple[int, bool]:
        """(DataLoader workers, pinned memory) for ``training.num_workers``: auto decodes audio in 4 worker
        processes on CUDA, none when features come from GPU memory or on the CPU (its cores train)."""
        cfg = self.recipe.training
        cuda = self.device.type == "cuda"
        on_gpu = self.cache is not None and getattr(self.cache.store, "device", torch.device("cpu")).type == "cuda"
        if cfg.num_workers != "auto":
            return cfg.num_workers, cuda and not on_gpu
        return (min(4, os.cpu_count() or 1) if cuda and not on_gpu else 0), cuda and not on_gpu

    # ------------------------------------------------------------------ data
    def _training_data(self, examples: list[Example], valid: list[Example]) -> ManifestData:
        """The training batches of this rank (any :class:`~alm_kit.training.data.TrainingData` fits the loop)."""
        cfg = self.recipe.training
        clips = list(dict.fromkeys(p for e in examples + valid for p in e.audio))
        with self._main_first():
            self.cache = self._feature_cache(clips, total=len(clips))
        dataset = AudioTextDataset(examples, self.model.audio_specs, train=True, seed=cfg.seed, cache=self.cache)
        lengths = self._lengths(examples) if cfg.bucket_by_length else None
        workers, pin = self._workers()
        return ManifestData(dataset, cfg.batch_size, seed=cfg.seed, rank=self.world.rank, world=self.world.size,
                            lengths=lengths, num_workers=workers, pin_memory=pin)

    def _shard_data(self, shards: list[str], valid: list[Example]) -> ShardData:
        """Training batches streamed from this rank's WebDataset shards (alm_kit/data/shards.py)."""
        recipe, cfg = self.recipe, self.recipe.training
        if recipe.data.too_long == "reject":
            raise TrainingError("data.too_long: reject needs a manifest (shards are streamed, not checked ahead); "
                             "use truncate")
        data = ShardData(shards, self.model.audio_specs, cfg.batch_size, seed=cfg.seed, rank=self.world.rank,
                         world=self.world.size, shuffle_buffer=recipe.data.shuffle_buffer,
                         limit=recipe.data.max_train_examples, response_template=recipe.data.response_template,
                         num_workers=self._workers()[0])
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
        names, self.step_flops = probe_step(self.model, self.objective, batch, self.recipe.training, self.device)
        self.step_flops *= self.recipe.training.grad_accum_steps
        if state is not None and "left_out" in state:
            names = list(state["left_out"])
        elif self.world.enabled:  # a parameter reached on any rank stays
            trainable = [n for n in params if params[n].requires_grad]
            reached = torch.tensor([n not in names for n in trainable], dtype=torch.float32, device=self.device)
            torch.distributed.all_reduce(reached, op=torch.distributed.ReduceOp.MAX)
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
                    from alm_kit.evaluation.runner import evaluate_file

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
            with autocast(self.device, cfg.precision):
                out = self.model(batch, max_response_tokens=cfg.max_response_tokens)
            total += out.loss.item() * int(out.num_tokens)
            tokens += int(out.num_tokens)
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
        """Set up (data, restore, reachability, optimizer), then the step loop."""
        cfg = self.recipe.training
        resume_from, data, valid, result = self._setup_data()
        state = self._restore(resume_from, data)
        batches = self._start_stream(data, state)
        if cfg.compile:
            self.model.decoder.compile()
        self.wrapped = distributed.wrap(self.model, self.world)
        total = self._total_steps(data)
        optimizer, scheduler = self._setup_optimizer(total, state)
        step = int(state["step"]) if state is not None else 0
        result.steps = step
        if state is not None:
            self.log(f"resuming {resume_from} at step {step} (epoch {data.state_dict().get('epoch')})")
        self.log(f"training {sum(p.numel() for p in self.trainable):,} of "
                 f"{sum(p.numel() for p in self.model.parameters()):,} parameters for {total} steps on "
                 f"{self.device}" + (f" x {self.world.size} ranks ({self.world.strategy})" if self.world.enabled
                                     else ""))
        self._loop(batches, data, valid, optimizer, scheduler, total, result, resumed=state is not None)
        if result.truncated:
            self.log(f"truncated {result.truncated} response(s) longer than training.max_response_tokens="
                     f"{cfg.max_response_tokens}")
        result.checkpoint = self.checkpoints.path(result.steps)
        self.log(f"saved {result.checkpoint}" + (" (interrupted; continue with --resume)" if result.interrupted else ""))
        if self.recipe.data.eval and not result.interrupted and self.world.is_main and not self.world.sharded:
            from alm_kit.evaluation.runner import evaluate_file

            result.evaluation = evaluate_file(self.model, self.recipe.data.eval, self.recipe.generation,
                                              limit=self.recipe.data.max_eval_examples, progress=self.progress)
            (self.run_dir / "eval.json").write_text(json.dumps(result.evaluation, indent=2))
        return result

    # ------------------------------------------------------------------ setup
    def _setup_data(self) -> tuple[Path | None, TrainingData, list[Example], TrainResult]:
        """Read (or make) the training and held-out examples, find the checkpoint to resume, open the stream."""
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
        if data.batches_per_epoch is None and cfg.max_steps is None:
            raise TrainingError("the training data cannot say how long an epoch is: set training.max_steps")
        result = TrainResult(self.run_dir, None, 0, skipped_examples=len(problems), resumed_from=resume_from,
                             rejected_examples=before - len(examples))
        return resume_from, data, valid, result

    def _restore(self, checkpoint: Path | None, data: TrainingData) -> dict[str, Any] | None:
        """Weights and data position of the checkpoint to resume (its optimizer comes with the optimizer)."""
        if checkpoint is None:
            return None
        state = self._restore_weights(checkpoint)
        data.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[self.world.rank] if len(rngs) == self.world.size else rngs[0])
        return state

    def _start_stream(self, data: TrainingData, state: dict[str, Any] | None) -> Iterator[Batch]:
        """The stream of micro-batches; its first batch also shows which parameters the loss reaches."""
        batches = iter(data)
        first = next(batches)
        self._leave_out_unreached(first, state)
        return itertools.chain([first], batches)

    def _total_steps(self, data: TrainingData) -> int:
        cfg = self.recipe.training
        steps_per_epoch = math.ceil((data.batches_per_epoch or 1) / cfg.grad_accum_steps)
        return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    def _setup_optimizer(self, total: int, state: dict[str, Any] | None):
        """AdamW over the trainable parameters (fused on CUDA) and the warm-up + decay schedule."""
        recipe, cfg = self.recipe, self.recipe.training
        optimizer = torch.optim.AdamW(param_groups(self.model, recipe), lr=cfg.lr,
                                      fused=True if self.device.type == "cuda" else None)
        schedule = lr_lambda(cfg.schedule, cfg.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.objective.configure_optimizer(recipe, schedule)
        self.trainable = [p for g in optimizer.param_groups for p in g["params"]]
        if state is not None:
            distributed.load_optimizer_state(self.model, optimizer, state["optimizer"], self.world)
            scheduler.load_state_dict(state["scheduler"])
        return optimizer, scheduler

    # ------------------------------------------------------------------ the loop
    def _train_step(self, batches: Iterator[Batch], optimizer, scheduler) -> tuple[torch.Tensor, list[list[str]],
                                                                                    int, int]:
        """One optimizer step over ``grad_accum_steps`` micro-batches, without waiting for the device.

        Returns the micro-batch losses as a device tensor (read at the next sync point), the
        example ids of each micro-batch, the examples and the truncated responses of the step.
        """
        cfg = self.recipe.training
        accum = cfg.grad_accum_steps
        losses, ids, samples, truncated = [], [], 0, 0
        for k in range(accum):
            batch = next(batches)
            with distributed.gradient_sync(self.wrapped, self.world, sync=k == accum - 1):
                with autocast(self.device, cfg.precision):
                    out = self.objective(self.wrapped, batch, max_response_tokens=cfg.max_response_tokens)
                (out.loss / accum).backward()
            losses.append(out.loss.detach().float())
            ids.append(batch.ids)
            samples += len(batch)
            truncated += out.truncated
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.objective.step()
        return torch.stack(losses), ids, samples, truncated

    def _loop(self, batches: Iterator[Batch], data: TrainingData, valid: list[Example], optimizer, scheduler,
              total: int, result: TrainResult, *, resumed: bool) -> None:
        """Steps until ``total``, an interruption or a non-finite loss.

        The host waits for the device only at sync points: every ``log_every`` steps, before a
        checkpoint or an evaluation, and at the end. There the pending steps' losses are read
        (summed over the ranks), checked, logged and written to metrics.jsonl. A non-finite loss
        therefore stops the run at the next sync point, naming its step and examples; the
        checkpoints written before it are good, since every save is a sync point.
        """
        recipe, cfg, world = self.recipe, self.recipe.training, self.world
        step = result.steps
        run_log = RunLog(self.run_dir, enabled=world.is_main, resume_step=step if resumed else None,
                         tensorboard=cfg.tensorboard)
        pending: list[tuple[torch.Tensor, dict[str, Any], list[list[str]]]] = []
        saved_step = step if resumed else None
        samples, started, first_step = 0, time.perf_counter(), step
        peak = peak_tflops(self.device, cfg.peak_tflops) if self.step_flops else None
        bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not self.progress)

        def sync() -> bool:
            """Read the pending steps; True when a rank asked to stop."""
            per_step = [torch.stack([torch.where(torch.isfinite(lo), lo, 0).sum(), (~torch.isfinite(lo)).sum().float()])
                        for lo, _, _ in pending]
            stop = torch.tensor([float(self._stop_requested)], device=self.device)
            totals = distributed.all_sum(torch.cat([*per_step, stop]), world, self.device)
            for i, (losses, record, ids) in enumerate(pending):
                loss_sum, bad = totals[2 * i], totals[2 * i + 1]
                if bad:
                    self._fail_on_nonfinite(record["step"], losses, ids)
                record["loss"] = loss_sum / (cfg.grad_accum_steps * world.size)
                result.losses.append(record["loss"])
                run_log.write(record)
            if pending:
                last = pending[-1][1]
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                samples_s=f"{last['samples_per_s']:.1f}",
                                **({"mfu": f"{last['mfu']:.1%}"} if "mfu" in last else {}))
                pending.clear()
            run_log.flush()
            return bool(totals[-1])

        self.model.train()
        try:
            while step < total:
                losses, ids, n, truncated = self._train_step(batches, optimizer, scheduler)
                step += 1
                samples += n * world.size
                result.truncated += truncated
                elapsed = time.perf_counter() - started
                record = {"step": step, "epoch": data.state_dict().get("epoch"), "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": samples / elapsed, "elapsed_s": elapsed}
                if peak:  # model FLOPs utilisation over this run so far, all ranks
                    record["mfu"] = self.step_flops * world.size * (step - first_step) / elapsed / (peak * 1e12)
                pending.append((losses, record, ids))
                bar.update(1)
                evaluate = bool(cfg.eval_every and step % cfg.eval_every == 0 and (recipe.data.eval or valid))
                save = bool(cfg.save_every and step % cfg.save_every == 0 and step < total)
                asked = self._stop_requested and not world.enabled  # one process: no need to agree
                if step % cfg.log_every == 0 or step == total or evaluate or save or asked:
                    stop = sync()
                    if evaluate:
                        scores = self._evaluate(valid)
                        if scores:
                            run_log.write({"step": step, **scores}, flush=True)
                            self.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                    if stop:
                        result.interrupted = True
                        break
                    if save:
                        self._save(step, optimizer, scheduler, data)
                        saved_step = step
        finally:
            bar.close()
            run_log.close()
        result.steps = step
        if saved_step != step:
            self._save(step, optimizer, scheduler, data)

    def _fail_on_nonfinite(self, step: int, losses: torch.Tensor, ids: list[list[str]]) -> None:
        """Stop every rank (at the sync point after ``step``); name the step and the examples of the bad
        micro-batches. Nothing after the last good checkpoint is saved."""
        mine = [i for loss, batch_ids in zip(losses.tolist(), ids) if not math.isfinite(loss) for i in batch_ids]
        values = sorted({str(v) for v in losses.tolist() if not math.isfinite(v)})
        everyone = [i for rank_ids in distributed.gather(mine, self.world) for i in rank_ids]
        latest = self.checkpoints.latest()
        raise TrainingError(
            f"loss is {'/'.join(values) or 'not finite'} at step {step}, batch example ids: {', '.join(everyone)}; "
            "stopped without saving the weights it gave. "
            + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written yet."))


def train(recipe: Recipe, *, progress: bool = True, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    return Trainer(recipe, progress=progress, run_dir=run_dir, resume=resume, overwrite=overwrite).fit()
