"""The examples a recipe's ``data`` section names: made first when they are synthetic (``data.synth``),
read with the recipe's response template, limited, and checked for audio (``data.skip_bad_audio``).
Training, ``alm-kit cache`` and ``alm-kit compare`` read their data here.
"""

from __future__ import annotations

from pathlib import Path

from alm_kit.config.schema import Recipe
from alm_kit.data.manifest import Example, check_audio_files, read_manifest, warn_repeated_ids
from alm_kit.text.templates import apply_response_template


def ensure_training_data(recipe: Recipe, progress: bool = True) -> dict | None:
    """Make the synthetic data set when the recipe asks for it and the manifest is missing (or, in
    data.synth.out_dir, was made with other settings); its metadata, or None without data.synth."""
    synth = recipe.data.synth
    if synth is None or not isinstance(recipe.data.train, str):
        return None
    train = Path(recipe.data.train)
    if train.exists() and train.resolve().parent != Path(synth.out_dir).resolve():
        return None
    from tqdm.auto import tqdm

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
    warn_repeated_ids([e.id for e in examples], path)
    return check_audio_files(examples, skip_bad=recipe.data.skip_bad_audio)
