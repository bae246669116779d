"""Training objectives: what the engine minimises for a batch (``training.objective``).

* ``lm`` -- next-token cross-entropy on the response (``AudioLanguageModel.forward``).
* ``align`` -- BLIP-2 stage-1 style audio-text alignment, before instruction tuning: each
  example's audio tokens (projector output, masked mean over its clips' valid tokens) and the
  mean of the decoder's input embeddings of its response (a caption) are matched by a
  symmetric contrastive loss (open_clip's ``ClipLoss``) with a learned temperature. The text
  side passes through a small head (a Linear initialised to the identity), so the projector
  is pulled toward the decoder's embedding space. The decoder only supplies embeddings (no
  gradient), so it must be frozen; the objective's own parameters (head and temperature) are
  trained but not saved: only the model is.

An objective is a module ``forward(model, batch, max_response_tokens) -> LossOutput``. Its own
parameters (if any) have their own AdamW and schedule (``configure_optimizer``, ``step``), so
the engine's optimizer, its checkpoints and resumption hold the model's parameters only
(resuming an ``align`` run starts the head afresh). ``model`` is
what the engine trains: the model itself, or its DDP/FSDP wrapper for ``lm`` (``align`` calls
the model's parts directly and therefore runs on one process only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alm_kit.config.loader import origin_of
from alm_kit.config.parse import ConfigError
from alm_kit.config.schema import Recipe
from alm_kit.data.batch import Batch
from alm_kit.model import AudioLanguageModel, LossOutput
from alm_kit.nn.masks import masked_mean


class Objective(nn.Module):
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def forward(self, model: AudioLanguageModel, batch: Batch,
                max_response_tokens: int | None = None) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def param_groups(self, recipe: Recipe) -> list[dict]:
        """Optimizer groups for the objective's own parameters (none by default)."""
        return []

    def configure_optimizer(self, recipe: Recipe, schedule: Callable[[int], float]) -> None:
        """AdamW over ``param_groups`` with the engine's schedule factor (nothing when there are none)."""
        groups = self.param_groups(recipe)
        if groups:
            self.optimizer = torch.optim.AdamW(groups, lr=recipe.training.lr)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def step(self) -> None:
        """Called after each optimizer step of the engine."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)


class LanguageModeling(Objective):
    """Next-token prediction on the response tokens."""

    def forward(self, model: AudioLanguageModel, batch: Batch, max_response_tokens: int | None = None) -> LossOutput:
        return model(batch, max_response_tokens=max_response_tokens)


class ContrastiveAlignment(Objective):
    """Audio tokens <-> decoder text embeddings of the response, ``open_clip.loss.ClipLoss``."""

    def __init__(self, model: AudioLanguageModel, recipe: Recipe) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        cfg = recipe.training.align
        if model.config.decoder.train != "frozen":
            raise ConfigError("training.objective: align uses the decoder's token embeddings as the text side and "
                              "never updates the decoder: set model.decoder.train: frozen (and train it in the "
                              "next stage, e.g. a recipe that extends this one)", key="model.decoder.train",
                              source=origin_of(recipe, "model.decoder.train"))
        if recipe.training.batch_size < 2:
            raise ConfigError("training.objective: align contrasts the examples of a batch: training.batch_size "
                              "must be >= 2", key="training.batch_size", source=origin_of(recipe, "training.batch_size"))
        d = model.decoder.hidden_size
        self.text_head = nn.Linear(d, d)
        with torch.no_grad():
            self.text_head.weight.copy_(torch.eye(d))
            self.text_head.bias.zero_()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.lr = cfg.lr
        self.text_source = cfg.text
        self.loss = ClipLoss()

    def param_groups(self, recipe: Recipe) -> list[dict]:
        lr = self.lr or recipe.training.lr
        return [{"params": [self.text_head.weight], "lr": lr, "weight_decay": recipe.training.weight_decay,
                 "name": "align"},
                {"params": [self.text_head.bias, self.logit_scale], "lr": lr, "weight_decay": 0.0, "name": "align"}]

    @staticmethod
    def audio_embedding(model: AudioLanguageModel, batch: Batch) -> Tensor:
        """(examples, d): mean of the valid audio tokens of all of an example's clips."""
        text = model.layout.tokenize(batch.prompts)  # the intent query reads the prompt
        tokens = model.audio_tokens(model.batch_features(batch), text, batch.clips_per_example)
        weights = tokens.mask.to(tokens.embeds.dtype).unsqueeze(-1)
        sums, counts = (tokens.embeds * weights).sum(1), weights.sum(1)
        rows = torch.repeat_interleave(torch.arange(len(batch), device=sums.device),
                                       torch.tensor(batch.clips_per_example, device=sums.device))
        per_example = sums.new_zeros(len(batch), sums.shape[-1]).index_add_(0, rows, sums)
        count = counts.new_zeros(len(batch), 1).index_add_(0, rows, counts)
        return per_example / count.clamp_min(1.0)

    @staticmethod
    @torch.no_grad()
    def text_embedding(model: AudioLanguageModel, texts: list[str]) -> Tensor:
        """(examples, d): masked mean of the decoder's input embeddings of each text."""
        tok = model.decoder.tokenizer
        ids = [tok.encode(t, add_special_tokens=False) or [tok.eos_token_id] for t in texts]
        longest = max(len(i) for i in ids)
        table = torch.zeros(len(ids), longest, dtype=torch.long, device=model.device)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool, device=model.device)
        for row, seq in enumerate(ids):
            table[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return masked_mean(model.decoder.embed(table).float(), mask)

    def forward(self, model: AudioLanguageModel, batch: Batch, max_response_tokens: int | None = None) -> LossOutput:
        texts = batch.responses if self.text_source == "response" else batch.prompts
        if texts is None:
            raise ValueError("training.objective: align needs a response (the caption) for every example")
        audio = F.normalize(self.audio_embedding(model, batch).float(), dim=-1)
        text = F.normalize(self.text_head(self.text_embedding(model, texts)), dim=-1)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return LossOutput(self.loss(audio, text, scale), num_tokens=len(batch))


def build_objective(model: AudioLanguageModel, recipe: Recipe, *, world_size: int = 1) -> Objective:
    if recipe.training.objective == "align":
        if world_size > 1:
            raise ConfigError("training.objective: align runs on one process (not under torchrun) for now",
                              key="training.objective", source=origin_of(recipe, "training.objective"))
        return ContrastiveAlignment(model, recipe)
    return LanguageModeling()
