"""``alm-kit cache``: fill the disk feature cache (:mod:`alm_kit.training.feature_cache`) for a recipe's
training and held-out clips ahead of training, with the model built exactly as training builds it.
"""

from __future__ import annotations

from collections.abc import Iterable

from alm_kit.audio.io import AudioSource
from alm_kit.data.loading import ensure_training_data, load_examples
from alm_kit.data.shards import read_shard, shard_paths
from alm_kit.errors import AlmKitError
from alm_kit.training.engine import Trainer
from alm_kit.training.feature_cache import CacheReport, cache_plan, live_random_crops, open_cache


def cache_recipe(recipe, *, progress: bool = True, batch_size: int = 16) -> dict[str, CacheReport]:
    """``alm-kit cache``: build the disk cache for the recipe's training (and held-out) clips.

    The model is built as training builds it (``Trainer``: seed, ``init_from``), so the encoder
    keys are the ones training will look up.
    """
    training = recipe.training
    if not recipe.data.train:
        raise AlmKitError("the recipe names no training data (data.train)")
    trainer = Trainer(recipe, progress=progress)
    model = trainer.model
    mode, _ = cache_plan(training.cache_features, model)
    if mode != "disk":
        crops = live_random_crops(model)
        if not model.cacheable_encoders:
            why = " and every encoder trains"
        elif training.cache_features == "auto" and crops:
            why = (f" and encoder(s) {', '.join(crops)}, which run at every step, crop at random (cached features "
                   "would come from another part of each clip); set cache_features: disk to cache anyway")
        else:
            why = ""
        raise AlmKitError(f"nothing to cache ahead of time: training.cache_features is {training.cache_features}"
                          + why + "; the disk cache needs a frozen encoder (no trainable parameters) and "
                          "cache_features auto or disk")
    ensure_training_data(recipe, progress)
    cache = open_cache(model, training)
    reports = {}
    for label, (sources, total) in training_clips(recipe).items():
        reports[label] = cache.fill(model, sources, total=total, progress=progress, batch_size=batch_size,
                                    desc=f"caching {label} features")
    return reports


def training_clips(recipe) -> dict[str, tuple[Iterable[AudioSource], int | None]]:
    """The clips training encodes, by data set: ``{"train": (sources, how many or None), "valid": ...}``."""
    out: dict[str, tuple[Iterable[AudioSource], int | None]] = {}
    shards = shard_paths(recipe.data.train)
    if shards:
        out["train"] = ((clip for path in shards for e in read_shard(path, require_response=False)
                         for clip in e.audio), None)
    else:
        examples, _ = load_examples(recipe, recipe.data.train, recipe.data.max_train_examples)
        clips = list(dict.fromkeys(p for e in examples for p in e.audio))
        out["train"] = (clips, len(clips))
    if recipe.data.valid:
        examples, _ = load_examples(recipe, recipe.data.valid, recipe.training.eval_max_items)
        clips = list(dict.fromkeys(p for e in examples for p in e.audio))
        out["valid"] = (clips, len(clips))
    return out
