"""The training engine: one loop for every recipe.

Reads ``training.*`` of the recipe (docs/training.md): parameter groups with a
learning rate per component, AdamW without weight decay on norms and biases,
linear warm-up + cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA (fp32 on CPU), the frozen-encoder feature cache, progress bar,
metrics as JSON Lines, a checkpoint at the end and a multiple-choice evaluation
when the recipe names a test file.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alm_kit.checkpoint import save_checkpoint
from alm_kit.config.loader import dump_recipe, origin_of
from alm_kit.config.schema import Recipe
from alm_kit.data.batch import AudioTextDataset, collate
from alm_kit.data.manifest import Example, check_audio_files, read_manifest
from alm_kit.model import AudioLanguageModel, build_model
from alm_kit.text.templates import apply_response_template
from alm_kit.training.feature_cache import FeatureCache, open_cache, random_crop_encoders


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped_examples: int = 0
    evaluation: dict[str, Any] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def ensure_training_data(recipe: Recipe, progress: bool = True) -> None:
    """Make the synthetic data set when the recipe asks for it and the manifest is missing."""
    synth = recipe.data.synth
    if synth is None or (recipe.data.train and Path(recipe.data.train).exists()):
        return
    from alm_kit.data.synth import synthesize

    synthesize(synth.out_dir, n_train=synth.n_train, n_test=synth.n_test, seed=synth.seed,
               speech=synth.speech, progress=progress)


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


class Trainer:
    def __init__(self, recipe: Recipe, *, progress: bool = True, run_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.progress = progress
        self.run_dir = Path(run_dir or recipe.output_dir)
        cfg = recipe.training
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.model = build_model(recipe.model, origin=lambda key: origin_of(recipe, key), seed=cfg.seed).to(self.device)
        self.cache: FeatureCache | None = None

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def _loader(self, examples: list[Example]) -> torch.utils.data.DataLoader:
        cfg = self.recipe.training
        clips = list(dict.fromkeys(p for e in examples for p in e.audio))
        self.cache = self._feature_cache(clips, total=len(clips))
        dataset = AudioTextDataset(examples, self.model.audio_specs, train=True, seed=cfg.seed, cache=self.cache)
        generator = torch.Generator().manual_seed(cfg.seed)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                           collate_fn=collate, generator=generator, drop_last=False)

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

    def fit(self) -> TrainResult:
        recipe, cfg = self.recipe, self.recipe.training
        if not recipe.data.train:
            raise ValueError("the recipe names no training data: set data.train "
                             "(and data.synth to generate the synthetic set there)")
        ensure_training_data(recipe, self.progress)
        examples, problems = load_examples(recipe, recipe.data.train, recipe.data.max_train_examples)
        for problem in problems:
            self.log(f"skipped: {problem}")
        if problems:
            self.log(f"skipped {len(problems)} example(s) with bad audio (data.skip_bad_audio)")
        if not examples:
            raise ValueError(f"{recipe.data.train}: no usable training examples")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(dump_recipe(recipe))

        loader = self._loader(examples)
        steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum_steps)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(param_groups(self.model, recipe), lr=cfg.lr, fused=fused or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        self.log(f"training {sum(p.numel() for p in trainable):,} of "
                 f"{sum(p.numel() for p in self.model.parameters()):,} parameters for {total} steps on {self.device}")

        self.model.train()
        metrics = (self.run_dir / "metrics.jsonl").open("w")
        losses: list[float] = []
        step, micro, started = 0, 0, time.perf_counter()
        bar = tqdm(total=total, desc="training", unit="step", disable=not self.progress)
        window: list[float] = []
        samples = truncated = 0
        while step < total:
            loader.dataset.epoch = micro // max(1, len(loader))
            for batch in loader:
                with autocast_for(self.device, cfg.precision):
                    out = self.model(batch, max_response_tokens=cfg.max_response_tokens)
                truncated += out.truncated
                loss = out.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step} (examples {batch.ids})")
                (loss / cfg.grad_accum_steps).backward()
                window.append(loss.item())
                samples += len(batch)
                micro += 1
                if micro % cfg.grad_accum_steps:
                    continue
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean = sum(window) / len(window)
                window.clear()
                losses.append(mean)
                elapsed = time.perf_counter() - started
                record = {"step": step, "loss": mean, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": samples / elapsed, "elapsed_s": elapsed}
                metrics.write(json.dumps(record) + "\n")
                if step % cfg.log_every == 0 or step == total:
                    metrics.flush()
                    bar.set_postfix(loss=f"{mean:.3f}", lr=f"{record['lr']:.2e}")
                bar.update(1)
                if step >= total:
                    break
        bar.close()
        metrics.close()
        if truncated:
            self.log(f"truncated {truncated} response(s) longer than training.max_response_tokens="
                     f"{cfg.max_response_tokens}")
        checkpoint = save_checkpoint(self.model, recipe, self.run_dir / "checkpoint", {"step": step})
        self.log(f"saved {checkpoint}")
        result = TrainResult(self.run_dir, checkpoint, step, losses, len(problems))
        if recipe.data.eval:
            from alm_kit.evaluation.mcq import evaluate_file

            result.evaluation = evaluate_file(self.model, recipe.data.eval, recipe.generation,
                                              limit=recipe.data.max_eval_examples, progress=self.progress)
            (self.run_dir / "eval.json").write_text(json.dumps(result.evaluation, indent=2))
        return result


def train(recipe: Recipe, *, progress: bool = True, run_dir: str | Path | None = None) -> TrainResult:
    return Trainer(recipe, progress=progress, run_dir=run_dir).fit()
