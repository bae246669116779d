"""The released Mellow checkpoints (``v0.ckpt``, ``v0_s.ckpt`` on the hub repo soham97/mellow) as alm-kit checkpoints.

The reference saves a plain state dict of its ``Mellow`` module, under DDP with a ``module.``
prefix, sometimes nested under ``state_dict`` or ``model``. Its modules map one to one onto the
components of ``recipes/mellow.yaml``::

    audio_encoder.base.htsat.*      -> encoders.htsat.htsat.*     HTS-AT (same code as laion-clap's)
    audio_encoder.base.c2l.*        -> projector.c2l.*            Linear(527 -> 768)
    audio_encoder.projection.*      -> projector.mapper.*         linear1, linear2, layer_norm
    caption_decoder.lm.*            -> decoder.lm.*               the SmolLM2 causal LM

The converted model is built from the recipe (compatibility settings: fixed 129-token prompt
padded with '!', no attention mask, the reference's " <|endoftext|>" after prompt and answer) and
saved with every weight, so the checkpoint does not depend on what the recipe freezes. See
docs/mellow.md for what compatibility mode means and what the parity tests pin down.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from alm_kit.errors import CheckpointError
from alm_kit.hashing import file_sha256

#: reference prefix -> alm-kit prefix (after an optional "module.")
KEY_MAP = (
    ("audio_encoder.base.htsat.", "encoders.htsat.htsat."),
    ("audio_encoder.base.c2l.", "projector.c2l."),
    ("audio_encoder.projection.", "projector.mapper."),
    ("caption_decoder.lm.", "decoder.lm."),
)
#: reference entries that carry nothing alm-kit needs (buffers older transformers saved; recomputed)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: containers a training script may have wrapped the state dict in
NESTING_KEYS = ("state_dict", "model", "module")
DDP_PREFIX = "module."


def default_recipe() -> Path:
    """recipes/mellow.yaml of the source tree alm-kit runs from."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "mellow.yaml"
    if not path.exists():
        raise CheckpointError(f"recipes/mellow.yaml not found next to the alm_kit package ({path}); "
                              "pass the recipe with --recipe")
    return path


def read_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint, unwrapped and without the DDP prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Mellow checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals: all mean "not a plain state dict"
        raise CheckpointError(f"{path}: not a torch state dict that loads with weights_only=True "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        found = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: holds no state dict of tensors (top-level entries: {found})")
    if all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def to_alm_kit_name(key: str) -> str | None:
    for src, dst in KEY_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_reference_name(key: str) -> str:
    for src, dst in KEY_MAP:
        if key.startswith(dst):
            return src + key[len(dst):]
    return key


def _listing(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def convert_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                  source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename reference keys to alm-kit's; fail with the first missing / unexpected keys or shapes."""
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        name = to_alm_kit_name(key)
        if name is not None and name in own:
            mapped[name] = value
        elif not key.endswith(IGNORED_SUFFIXES):
            unexpected.append(key)
    missing = [to_reference_name(k) for k in own if k not in mapped]
    if missing or unexpected:
        hint = ("" if any(to_alm_kit_name(k) for k in state) else
                " (none of its keys starts with " + ", ".join(src for src, _ in KEY_MAP) + ")")
        raise CheckpointError(f"{source} is not a Mellow checkpoint for this recipe{hint}: "
                              f"missing {_listing(sorted(missing))}; unexpected {_listing(sorted(unexpected))}")
    bad = [f"{to_reference_name(k)} {tuple(v.shape)} (recipe: {tuple(own[k].shape)})"
           for k, v in mapped.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: shapes differ from the recipe's model: {_listing(bad, 3)}")
    return {k: v.to(own[k].dtype) for k, v in mapped.items()}




def import_mellow(source: str | Path, out_dir: str | Path, recipe: str | Path | None = None,
                  overrides: Sequence[str] = ()) -> Path:
    """Convert a reference checkpoint into an alm-kit checkpoint directory of ``recipe`` (default: mellow.yaml)."""
    from alm_kit.checkpoint import save_checkpoint
    from alm_kit.config import load_recipe
    from alm_kit.model import build_model

    state = read_reference_state(source)  # fail on a wrong file before building anything
    recipe_obj = load_recipe(recipe or default_recipe(), list(overrides))
    model = build_model(recipe_obj.model)
    own = model.state_dict()
    converted = convert_state(state, own, str(source))
    model.load_state_dict(converted, strict=True)
    return save_checkpoint(model, recipe_obj, out_dir, {
        "imported_from": str(Path(source).resolve()), "importer": "mellow", "source_sha256": file_sha256(source),
    }, state=model.state_dict())
