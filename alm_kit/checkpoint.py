"""Checkpoints: the weights training changed (+ randomly initialised components), the resolved recipe, the tokenizer.

Layout of a checkpoint directory::

    model.safetensors   trainable weights, and every weight of components with no pretrained source
    recipe.yaml         the fully resolved recipe that built the model
    tokenizer/          the decoder's tokenizer files
    meta.json           alm-kit version, step, what was saved
    trainer_state.pt    (training checkpoints) optimizer, scheduler, RNG states, data position;
                        plain tensors and containers, read with torch.load(weights_only=True)

Training writes them into ``RUN_DIR/checkpoints/step-N`` and names the newest in
``RUN_DIR/checkpoints/latest`` (a one-line file). Every path that takes a checkpoint also takes
a run folder or its ``checkpoints`` folder, meaning the latest one (:func:`resolve_checkpoint`).

Loading rebuilds the model from recipe.yaml (pretrained parts come from their
hub id / path) and applies model.safetensors on top. A component whose every weight is
stored (imports, exports, a fully fine-tuned decoder) is rebuilt from the params
``meta.json`` records under ``standalone`` (:meth:`~alm_kit.interfaces.Component.standalone_params`)
instead, so such a checkpoint loads with no network and no package that only provided
weights. Tied tensors (a decoder's ``lm_head`` and its embeddings) are stored once;
``meta.json`` lists them under ``tied``. Files are written under a
temporary name, flushed to the disk (fsync of every file and folder) and only then
renamed, so neither an interrupted save nor a power cut leaves a broken directory, and
``latest`` is replaced only after its checkpoint is complete and durable. A save that
fails (a full disk, say) removes its partial ``.tmp`` folder; a full disk is reported as
a :class:`CheckpointError` naming the last good checkpoint (docs/training.md#durability).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from alm_kit._version import __version__
from alm_kit.config.loader import dump_recipe, load_yaml, recipe_from_dict
from alm_kit.config.schema import Recipe
from alm_kit.errors import CheckpointError  # noqa: F401  (re-exported)
from alm_kit.model import AudioLanguageModel, build_model

WEIGHTS = "model.safetensors"
RECIPE = "recipe.yaml"
TOKENIZER = "tokenizer"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def tied_tensors(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor shares its memory with an earlier name's (tied weights): name -> that name."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:  # no memory to share
            continue
        try:
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                     tuple(tensor.stride()))
        except (RuntimeError, NotImplementedError):  # a sharded tensor: stored under every name, as before
            continue
        if where in first:
            tied[name] = first[where]
        else:
            first[where] = name
    return tied


def _entry_digest(spec: Any) -> str:
    """A component's recipe entry (name and params) as one comparable string."""
    return json.dumps({"name": spec.name, "params": spec.params}, sort_keys=True, default=str)


def checkpoint_keys(model: AudioLanguageModel) -> set[str]:
    """Names of the state a checkpoint must hold to rebuild ``model`` from its recipe (a tied tensor
    under its first name only)."""
    full_prefixes = tuple(f"{path}." for path, (module, _) in model.components().items()
                          if not getattr(module, "has_pretrained_weights", False))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    state = model.state_dict()
    keep = {name for name in state if name in trainable or name.startswith(full_prefixes)}
    return keep - {name for name, first in tied_tensors(state).items() if first in keep}


def checkpoint_state(model: AudioLanguageModel) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to rebuild ``model`` from its recipe."""
    keep = checkpoint_keys(model)
    return {name: tensor for name, tensor in model.state_dict().items() if name in keep}


def standalone_entries(model: AudioLanguageModel, recipe: Recipe, stored: set[str]) -> dict[str, dict[str, Any]]:
    """Recipe key -> {"params": standalone params, "entry": the recipe's entry they stand for}, for
    every component whose every weight is in ``stored``."""
    from alm_kit.model import model_entries

    keys = {id(spec): key for _, spec, key in model_entries(model.config)}
    saved = {key: spec for _, spec, key in model_entries(recipe.model)}  # the model may be built from standalone params
    names = list(model.state_dict())
    out = {}
    for path, (module, spec) in model.components().items():
        own = [n for n in names if n.startswith(path + ".")]
        key = keys[id(spec)]
        if own and all(n in stored for n in own) and key in saved:
            params = module.standalone_params()
            if params is not None:
                out[key] = {"params": params, "entry": _entry_digest(saved[key])}
    return out


def with_standalone_params(recipe: Recipe, directory: Path, entries: dict[str, dict[str, Any]]) -> Recipe:
    """``recipe`` with the components ``entries`` names built from their standalone params
    (``{checkpoint}`` in a string is ``directory``). An entry whose recipe entry was edited since the
    save is left as the recipe says."""
    import dataclasses

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{checkpoint}", str(directory))
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    model = recipe.model
    encoders = list(model.encoders)
    changes: dict[str, Any] = {}
    for key, saved in entries.items():
        parts = key.split(".")  # model.decoder, model.encoders.0
        if parts[1] == "encoders":
            index = int(parts[2])
            if index < len(encoders) and _entry_digest(encoders[index]) == saved["entry"]:
                encoders[index] = dataclasses.replace(encoders[index], params=fill(saved["params"]))
        else:
            spec = getattr(model, parts[1], None)
            if spec is not None and _entry_digest(spec) == saved["entry"]:
                changes[parts[1]] = dataclasses.replace(spec, params=fill(saved["params"]))
    return dataclasses.replace(recipe, model=dataclasses.replace(model, encoders=encoders, **changes))


def save_checkpoint(model: AudioLanguageModel, recipe: Recipe, directory: str | Path,
                    extra_meta: dict[str, Any] | None = None, *, state: dict[str, torch.Tensor] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically and durably (see the module docstring).

    ``state`` replaces ``checkpoint_state(model)`` (a sharded run passes its gathered full state);
    ``trainer_state`` (optimizer, scheduler, RNG, data position) goes to trainer_state.pt.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = checkpoint_state(model) if state is None else state
    tied = tied_tensors(state)
    standalone = standalone_entries(model, recipe, set(state))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k not in tied}
    meta = {"alm_kit_version": __version__, "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values())), **(extra_meta or {}),
            "tied": tied, "standalone": standalone}

    def write() -> None:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS))
        (tmp / RECIPE).write_text(dump_recipe(recipe))
        model.decoder.save_tokenizer(str(tmp / TOKENIZER))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        sync_tree(tmp)

    _writing(f"checkpoint {directory}", tmp, write)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    sync_path(directory.parent)  # the rename itself reaches the disk before anything names the checkpoint
    return directory


def write_latest(checkpoints_dir: str | Path, name: str) -> None:
    """Point ``latest`` at ``name``: a temporary file, flushed to the disk, renamed over the old one
    (atomic on POSIX), and the folder flushed so that the new pointer survives a power cut."""
    checkpoints_dir = Path(checkpoints_dir)
    tmp = checkpoints_dir / f"{LATEST}.tmp"

    def write() -> None:
        with tmp.open("w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())

    _writing(f"{checkpoints_dir / LATEST} (naming {name})", tmp, write)
    os.replace(tmp, checkpoints_dir / LATEST)
    sync_path(checkpoints_dir)


def sync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it, renames included, durable)."""
    if path.is_dir() and os.name != "posix":  # folders cannot be opened on Windows; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first, ``root`` last."""
    paths = sorted(root.rglob("*"))
    for path in paths:
        if not path.is_dir():
            sync_path(path)
    for folder in [root, *(p for p in paths if p.is_dir())][::-1]:
        sync_path(folder)


#: errnos of a full disk (ENOSPC) or an exhausted quota (EDQUOT)
_FULL_DISK = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: how the writers say it without an errno: safetensors ("No space left on device (os error 28)") and
#: torch.save, whose zip writer only notices that a write came up short ("unexpected pos 704 vs 598";
#: older versions: "PytorchStreamWriter failed writing file data/0: file write failed")
_FULL_DISK_WORDS = ("no space left on device", "disk quota exceeded", "unexpected pos", "file write failed")


def _is_full_disk(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
            return True
        if any(words in str(exc).lower() for words in _FULL_DISK_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _writing(what: str, tmp: Path, write: Callable[[], None]) -> None:
    """Run ``write``, which fills ``tmp``; on failure remove ``tmp``. A full disk becomes a
    CheckpointError that names the last good checkpoint; other errors pass through unchanged."""
    try:
        write()
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception) or not _is_full_disk(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot write {what}: no space left on device ({detail}); the partial {tmp.name} "
                              f"was removed. {_last_good(tmp.parent)}") from None


def _last_good(folder: Path) -> str:
    """What a failed save leaves: in a run's checkpoints folder, the checkpoint ``latest`` names."""
    if folder.name != CHECKPOINTS:
        return "Free some space and try again."
    if not (folder / LATEST).is_file():
        return "No checkpoint of this run was written before; free some space and train again."
    try:
        last = f"The last good checkpoint is {resolve_checkpoint(folder)}"
    except CheckpointError as exc:
        last = str(exc)
    return f"{last}; free some space (or lower training.keep_checkpoints) and continue with --resume."


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run folder, its ``checkpoints`` folder or a ``latest`` file."""
    path = Path(path)
    for pointer in (path / CHECKPOINTS / LATEST, path / LATEST, path):
        if pointer.name == LATEST and pointer.is_file():
            target = pointer.parent / pointer.read_text().strip()
            if not (target / WEIGHTS).exists():
                raise CheckpointError(f"{pointer} names {target.name}, which is not a complete checkpoint")
            return target
    return path


def read_recipe(directory: str | Path) -> Recipe:
    directory = Path(directory)
    for name in (WEIGHTS, RECIPE):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory} is not an alm-kit checkpoint: {name} is missing")
    path = directory / RECIPE
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:  # a python/... tag among them: the loader is safe and refuses it
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: refused: {problem}{f' (line {mark.line + 1})' if mark else ''}; "
                              "a checkpoint's recipe holds plain data only") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: refused: a recipe is a mapping, got {type(data).__name__}")
    return recipe_from_dict(data, source=str(path))


def differences(ours: Any, theirs: Any, key: str = "") -> list[str]:
    """Key paths where two plain-data trees differ, as 'key: ours != theirs'."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for k in sorted(set(ours) | set(theirs), key=str):
            sub = f"{key}.{k}" if key else str(k)
            out += differences(ours.get(k), theirs.get(k), sub)
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{key}.{i}")]
    return [] if ours == theirs else [f"{key}: {ours!r} != {theirs!r}"]


def load_weights(model: AudioLanguageModel, directory: str | Path) -> None:
    """Apply a checkpoint's weights to a model built from a recipe; errors say what does not match."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = load_file(str(directory / WEIGHTS))
    own = model.state_dict()
    missing = sorted(checkpoint_keys(model) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: checkpoint does not match its recipe: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{directory}: shapes differ from the recipe's model for {bad[:5]}")
    model.load_state_dict(state, strict=False)


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.exists() else {}


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[AudioLanguageModel, Recipe]:
    """The model and the recipe it was trained with; components stored whole are built from their
    standalone params (no download), the rest as the recipe says."""
    directory = resolve_checkpoint(directory)
    recipe = read_recipe(directory)
    from alm_kit.sources import check_sources

    standalone = read_meta(directory).get("standalone") or {}
    to_build = with_standalone_params(recipe, directory.resolve(), standalone)
    check_sources(to_build, str(directory), data=False)  # what is not stored: cached, or fetched now
    model = build_model(to_build.model)
    if (directory / TOKENIZER).exists():
        from transformers import AutoTokenizer

        model.decoder.tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER))
    load_weights(model, directory)
    return model.to(device).eval(), recipe


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    if not path.exists():
        raise CheckpointError(f"{directory} holds no training state ({TRAINER_STATE}); it cannot be resumed")
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
        found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain containers "
                              f"(what alm-kit writes){f' ({found})' if found else ''}; it was not loaded") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({str(exc).strip().splitlines()[0]})") from None


def merge_lora(model: nn.Module) -> int:
    """Fold every peft LoRA layer into its base layer and put the base layer back; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.get_base_layer())
    return len(layers)


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """A self-contained inference folder: LoRA merged into the base weights, every weight stored.

    LoRA components become ``train: full`` in the exported recipe, so loading it injects no
    adapters; since every weight is stored, the folder does not depend on what was frozen.
    """
    import dataclasses

    source = resolve_checkpoint(source)
    model, recipe = load_checkpoint(source)
    merged = merge_lora(model)
    entries = [dataclasses.replace(e, train="full", lora=None) if e.train == "lora" else e
               for e in recipe.model.encoders]
    changes = {"encoders": entries}
    for name in ("fusion", "projector", "decoder", "layout"):
        entry = getattr(recipe.model, name)
        if entry is not None and entry.train == "lora":
            changes[name] = dataclasses.replace(entry, train="full", lora=None)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **changes))
    meta = read_meta(source)
    return save_checkpoint(model, recipe, out, {"step": meta.get("step"), "exported_from": str(source),
                                                "merged_lora_layers": merged}, state=model.state_dict())


def init_from_checkpoint(model: AudioLanguageModel, directory: str | Path,
                         components: list[str] | None = None) -> list[str]:
    """Copy the checkpoint's tensors of ``components`` into ``model``; return the names copied.

    ``directory`` is a checkpoint or a run folder (then its latest checkpoint). This is how training
    starts from another run's weights (``training.init_from``), e.g. a projector pre-aligned by
    ``training.objective: align``: unlike resuming, only weights are taken (no optimizer, schedule or
    data position), and only those of the named components (``training.init_components``).
    """
    from safetensors.torch import load_file

    directory = resolve_checkpoint(directory)  # a checkpoint, or a run folder (its latest checkpoint)
    if not (directory / WEIGHTS).exists():
        raise CheckpointError(f"training.init_from: {directory} is not an alm-kit checkpoint ({WEIGHTS} is missing)")
    state = load_file(str(directory / WEIGHTS))
    known = list(model.components())
    prefixes = known if components is None else components
    unknown = [c for c in prefixes if c not in known]
    if unknown:
        raise CheckpointError(f"training.init_components: unknown component(s) {', '.join(unknown)}; "
                              f"this model has: {', '.join(known)}")
    own = model.state_dict()
    picked = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in prefixes)}
    if components is not None:
        empty = [c for c in components if not any(k.startswith(c + ".") for k in picked)]
        if empty:
            raise CheckpointError(f"training.init_from: {directory} holds no weights of {', '.join(empty)}")
    unexpected = sorted(k for k in picked if k not in own)
    shapes = sorted(k for k in picked if k in own and picked[k].shape != own[k].shape)
    if unexpected or shapes:
        raise CheckpointError(
            f"training.init_from: {directory} does not fit this model: "
            + "; ".join(part for part in (
                f"unknown tensors {unexpected[:5]}" if unexpected else "",
                "other shapes for " + ", ".join(f"{k} {tuple(picked[k].shape)} vs {tuple(own[k].shape)}"
                                                for k in shapes[:5]) if shapes else "") if part))
    model.load_state_dict(picked, strict=False)
    return sorted(picked)
