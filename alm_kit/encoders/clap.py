"""The audio half of LAION-CLAP: audio branch (HTS-AT or PANN) + audio projection.

Built from laion-clap's own model configs (``laion_clap/clap_module/model_configs/*.json``,
read without importing ``laion_clap``) and its ``clap_module`` code (through
:func:`alm_kit.encoders._laion.clap_module`, which never runs ``laion_clap/__init__.py``).
The text branch is not built.

* ``pooled``: the CLAP audio embedding, ``normalize(audio_projection(branch embedding))``
  (joint space, 512-d in the shipped configs), exactly as ``CLAP.get_audio_embedding``.
* ``frames``: with ``frames: false`` (default) one frame equal to ``pooled``; with
  ``frames: true`` the branch's ``fine_grained_embedding`` (HTS-AT: 768-d latent per time
  step, 32 steps x 32; PANN Cnn14: 2048-d), *not* projected to the joint space.

The shipped configs use 48 kHz, 480,000 samples (10.0 s: HTS-AT stretches the 1001 mel
frames to 1024; a longer input fails its assertion), 64 mels, window 1024, hop 480
(not the 1024 of laion's ``CLAPAudioCfp`` dataclass default), 50-14000 Hz.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alm_kit.encoders._laion import NoAttentionMaps, building_laion_modules, clap_module, fix_front_end
from alm_kit.interfaces import AudioFeatures, AudioSpec, Encoder, StreamInfo
from alm_kit.nn.masks import frames_mask

#: laion-clap's create_htsat_model sizes (spec 256, patch 4, Swin window 8 for all)
HTSAT_SIZES = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [4, 8, 16, 32]},
    "base": {"embed_dim": 128, "depths": [2, 2, 12, 2], "num_heads": [4, 8, 16, 32]},
    "large": {"embed_dim": 256, "depths": [2, 2, 12, 2], "num_heads": [4, 8, 16, 32]},
}
#: PANN models: (time downsampling = repetition of fine_grained_embedding frames)
PANN_TIME_RATIO = {"Cnn6": 16, "Cnn10": 32, "Cnn14": 32}
#: prefixes that wrap a CLAP state dict (DDP training, Lightning)
CHECKPOINT_PREFIXES = ("module.", "model.", "clap.")
_HTSAT_OVERRIDES = ("spec_size", "patch_size", "embed_dim", "depths", "num_heads", "swin_window")


def model_configs_dir() -> Path:
    """laion-clap's ``clap_module/model_configs`` folder, found without importing laion_clap."""
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the clap encoder needs laion-clap: pip install laion-clap")
    return Path(list(spec.submodule_search_locations)[0]) / "clap_module" / "model_configs"


def load_model_config(model: str) -> dict[str, Any]:
    """A laion-clap model config by name (``HTSAT-tiny``) or a path to such a JSON file."""
    path = Path(model)
    if not (model.endswith(".json") and path.exists()):
        folder = model_configs_dir()
        path = folder / f"{model}.json"
        if not path.exists():
            known = sorted(p.stem for p in folder.glob("*.json") if p.stem.startswith(("HTSAT", "PANN")))
            raise ValueError(f"unknown CLAP model config {model!r}; laion-clap ships: {', '.join(known)}")
    data = json.loads(path.read_text())
    if "audio_cfg" not in data or "embed_dim" not in data:
        raise ValueError(f"{path}: not a CLAP model config (needs embed_dim and audio_cfg)")
    return data


def _torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)``; laion's training checkpoints also hold numpy scalars,
    which are allowed explicitly (never an arbitrary unpickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"CLAP checkpoint not found: {path}") from None
    except pickle.UnpicklingError as first:
        import numpy as np

        allowed: list[Any] = [np.dtype]
        for name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
            module, _, attr = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError):
                pass
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {first}. "
                             "Re-save its state dict (torch.save(ckpt['state_dict'], ...)).") from None


class CLAPAudioEncoder(NoAttentionMaps, Encoder):
    """LAION-CLAP's audio encoder: HTS-AT/PANN branch + projection to the joint space."""

    @dataclass
    class Config:
        #: laion-clap model config: HTSAT-tiny, HTSAT-base, HTSAT-large, PANN-14, PANN-10, PANN-6, ... or a .json path
        model: str = "HTSAT-tiny"
        #: width of CLAP's joint audio-text space (512 in every shipped model)
        joint_dim: int = 512
        #: also return the branch's framewise latent (fine_grained_embedding); else one frame = pooled
        frames: bool = False
        #: keep the branch's repeated frames (32x for HTS-AT) or one frame per time step
        repeat_frames: bool = True
        #: short clips: laion-clap's repeatpad (whole repeats, then zeros), tiling to the end, or zeros
        pad: Literal["zero", "repeat", "repeatpad"] = "repeatpad"
        crop: Literal["start", "center", "random"] = "start"
        #: laion-clap checkpoint (.pt/.ckpt) with audio_branch.* and audio_projection.* weights
        checkpoint: str | None = None
        #: SpecAugment of the branch while the encoder is in training mode
        spec_augment: bool = True
        init_seed: int = 0
        # --- overrides of the model config's audio_cfg (None: the JSON's value)
        sample_rate: int | None = None
        clip_seconds: float | None = None
        window_size: int | None = None
        hop_size: int | None = None
        mel_bins: int | None = None
        fmin: int | None = None
        fmax: int | None = None
        num_classes: int | None = None
        # --- HTS-AT architecture overrides (None: laion-clap's size for the config's model_name)
        spec_size: int | None = None
        patch_size: int | None = None
        embed_dim: int | None = None
        depths: list[int] | None = None
        num_heads: list[int] | None = None
        swin_window: int | None = None

        def __post_init__(self) -> None:
            if self.joint_dim < 1:
                raise ValueError("joint_dim must be >= 1")
            if self.clip_seconds is not None and self.clip_seconds <= 0:
                raise ValueError("clip_seconds must be > 0")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        model_cfg = load_model_config(config.model)
        audio = dict(model_cfg["audio_cfg"])
        for ours, theirs in (("sample_rate", "sample_rate"), ("window_size", "window_size"),
                             ("hop_size", "hop_size"), ("mel_bins", "mel_bins"), ("fmin", "fmin"),
                             ("fmax", "fmax"), ("num_classes", "class_num")):
            if getattr(config, ours) is not None:
                audio[theirs] = getattr(config, ours)
        if config.clip_seconds is not None:
            audio["clip_samples"] = int(round(config.clip_seconds * audio["sample_rate"]))
        self.audio_cfg = SimpleNamespace(**audio)
        model_type = audio.get("model_type")
        self.takes_dict = model_type == "HTSAT" or audio.get("model_name") == "Cnn14"
        overrides = {k: getattr(config, k) for k in _HTSAT_OVERRIDES if getattr(config, k) is not None}

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            if model_type == "HTSAT":
                with building_laion_modules():
                    self.audio_branch, self.frame_repeat, steps = self._build_htsat(overrides)
            elif model_type == "PANN":
                if overrides:
                    raise ValueError(f"{', '.join(overrides)} only apply to HTS-AT models, not {config.model}")
                self.audio_branch, self.frame_repeat, steps = self._build_pann()
            else:
                raise ValueError(f"{config.model}: unsupported CLAP audio model_type {model_type!r}")
            width = self._branch_width()
            if not overrides and width != model_cfg["embed_dim"]:
                raise ValueError(f"{config.model}: branch width {width} != config embed_dim {model_cfg['embed_dim']}")
            # CLAP's audio_projection (keys audio_projection.0 / .2 as in laion-clap checkpoints)
            self.audio_projection = nn.Sequential(
                nn.Linear(width, config.joint_dim), nn.ReLU(), nn.Linear(config.joint_dim, config.joint_dim)
            )
        fix_front_end(self.audio_branch)
        if not config.spec_augment:
            self.audio_branch.spec_augmenter = nn.Identity()
        if config.checkpoint:
            self.load_checkpoint(config.checkpoint)

        rate, samples = int(audio["sample_rate"]), int(audio["clip_samples"])
        clip_seconds = config.clip_seconds if config.clip_seconds is not None else samples / rate
        self.spec = AudioSpec(rate, clip_seconds, config.pad, config.crop)
        num_frames = steps * (self.frame_repeat if config.repeat_frames else 1) if config.frames else 1
        self.num_frames = num_frames
        self.info = StreamInfo(
            frame_dim=width if config.frames else config.joint_dim,
            pooled_dim=config.joint_dim,
            frame_rate=num_frames / clip_seconds if config.frames else None,
            num_frames=num_frames,
        )

    # ------------------------------------------------------------------ construction
    def _build_htsat(self, overrides: dict[str, Any]) -> tuple[nn.Module, int, int]:
        htsat = clap_module("htsat")
        cfg = self.audio_cfg
        size = HTSAT_SIZES.get(getattr(cfg, "model_name", ""), None)
        if size is None:
            raise ValueError(f"HTS-AT model_name {getattr(cfg, 'model_name', None)!r} is not tiny, base or large")
        arch = {"spec_size": 256, "patch_size": 4, "swin_window": 8, **size, **overrides}
        if len(arch["depths"]) != len(arch["num_heads"]):
            raise ValueError("depths and num_heads must have the same length")
        if arch["spec_size"] % cfg.mel_bins:
            raise ValueError("spec_size must be a multiple of mel_bins (HTS-AT folds time into frequency)")
        freq_ratio = arch["spec_size"] // cfg.mel_bins
        mel_frames = cfg.clip_samples // cfg.hop_size + 1
        if mel_frames > arch["spec_size"] * freq_ratio:
            raise ValueError(f"{cfg.clip_samples} samples at hop {cfg.hop_size} give {mel_frames} mel frames; "
                             f"HTS-AT takes at most {arch['spec_size'] * freq_ratio}: shorten the clip")
        if overrides:
            p = arch["patch_size"]
            branch = htsat.HTSAT_Swin_Transformer(
                spec_size=arch["spec_size"], patch_size=p, patch_stride=(p, p), num_classes=cfg.class_num,
                embed_dim=arch["embed_dim"], depths=list(arch["depths"]), num_heads=list(arch["num_heads"]),
                window_size=arch["swin_window"], config=cfg,
            )
        else:
            branch = htsat.create_htsat_model(cfg)
        levels = len(arch["depths"]) - 1
        steps = arch["spec_size"] // 2**levels // arch["patch_size"] * freq_ratio
        return branch, 8 * arch["patch_size"], steps

    def _build_pann(self) -> tuple[nn.Module, int, int]:
        cfg = self.audio_cfg
        if cfg.model_name not in PANN_TIME_RATIO:
            raise ValueError(f"PANN model_name {cfg.model_name!r} is not one of {', '.join(PANN_TIME_RATIO)}")
        if cfg.mel_bins != 64:
            raise ValueError("PANN models need mel_bins 64 (their first BatchNorm is 64 wide)")
        branch = clap_module("pann_model").create_pann_model(cfg)
        ratio = PANN_TIME_RATIO[cfg.model_name]
        return branch, ratio, (cfg.clip_samples // cfg.hop_size + 1) // ratio

    def _branch_width(self) -> int:
        if hasattr(self.audio_branch, "num_features"):  # HTS-AT
            return int(self.audio_branch.num_features)
        return int(self.audio_branch.fc1.out_features)  # PANN

    # ------------------------------------------------------------------ weights
    @property
    def has_pretrained_weights(self) -> bool:
        return self.config.checkpoint is not None

    @classmethod
    def sources(cls, config: Config) -> list[Any]:
        from alm_kit.interfaces import Source

        if not config.checkpoint:
            return []
        return [Source("file", config.checkpoint, "checkpoint",
                       hint="point it at a laion-clap checkpoint (e.g. 630k-audioset-best.pt), or "
                            "{params}.checkpoint=null for random weights (docs/components.md)")]

    def standalone_params(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.config), "checkpoint": None}

    def load_checkpoint(self, path: str) -> None:
        raw = _torch_load(path)
        state = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a CLAP checkpoint (expected a state dict)")
        own = self.state_dict()
        for prefix in ("",) + CHECKPOINT_PREFIXES:
            picked = {k[len(prefix):]: v for k, v in state.items()
                      if k.startswith(prefix) and k[len(prefix):].startswith(("audio_branch.", "audio_projection."))}
            if picked:
                break
        else:
            raise ValueError(f"{path}: no CLAP audio weights (keys like 'audio_branch.patch_embed.proj.weight' "
                             f"and 'audio_projection.0.weight', optionally under {', '.join(CHECKPOINT_PREFIXES)})")
        unexpected = sorted(set(picked) - set(own))
        if unexpected:
            hint = " (a fusion model: enable_fusion checkpoints are not supported)" if any(
                "fusion" in k or "mel_conv" in k for k in unexpected) else ""
            raise ValueError(f"{path}: weights this {self.config.model} encoder lacks{hint}: {unexpected[:5]}")
        missing = [k for k in own if k not in picked and "extractor" not in k]
        if missing:
            raise ValueError(f"{path}: CLAP audio weights missing {missing[:5]}")
        try:
            self.load_state_dict(picked, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not fit {self.config.model}: {exc}") from None

    # ------------------------------------------------------------------ forward
    def forward(self, waveforms: Tensor, lengths: Tensor) -> AudioFeatures:
        waveforms = waveforms.float()
        # laion's HTS-AT and Cnn14 read a {"waveform": ...} dict, its Cnn6/Cnn10 the tensor itself
        inputs = {"waveform": waveforms} if self.takes_dict else waveforms
        out = self.audio_branch(inputs, device=waveforms.device)
        pooled = F.normalize(self.audio_projection(out["embedding"]), dim=-1)
        if not self.config.frames:
            frames = pooled[:, None, :]
        else:
            frames = out["fine_grained_embedding"]
            if not self.config.repeat_frames:
                frames = frames[:, :: self.frame_repeat]
        mask = frames_mask(lengths, waveforms.shape[-1], frames.shape[1])
        return AudioFeatures(frames, mask, pooled)
