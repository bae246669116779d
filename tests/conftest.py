"""Shared fixtures: tiny recipes built in code, generated audio files. Everything offline."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

#: a very small HTS-AT: 16 kHz, 2 s clips, 16 time steps (512 frames at 256/s with repeat_frames)
TINY_HTSAT = {
    "sample_rate": 16000, "clip_seconds": 2.0, "window_size": 512, "hop_size": 160, "mel_bins": 16,
    "fmax": 8000, "spec_size": 64, "embed_dim": 8, "depths": [1, 1, 1], "num_heads": [1, 1, 2],
    "swin_window": 4, "num_classes": 12, "drop_path_rate": 0.0,
}
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}
#: Qwen3's architecture (q/k norms, explicit head_dim, tied embeddings) at toy size; use builtin:tiny-qwen3
TINY_QWEN3 = {
    "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": True,
}


def tiny_recipe_dict(**changes) -> dict:
    """A Mellow-architecture recipe at toy size (plain data, as YAML would give)."""
    recipe = {
        "name": "tiny",
        "model": {
            "encoders": [{"name": "htsat", "train": "frozen", "params": dict(TINY_HTSAT)}],
            "projector": {"name": "mlp", "params": {
                "style": "residual", "dropout": 0.0, "frames_to_pooled": True, "prepend_pooled": True,
                "pool": {"factor": 8, "keep_first": True}}},
            "decoder": {"name": "causal_lm", "params": {"tokenizer": "builtin:tiny", "config": dict(TINY_LLAMA)}},
            "layout": {"name": "prefix", "params": {"num_audios": 2}},
        },
        "training": {"batch_size": 4, "lr": 3e-3, "max_steps": 4, "log_every": 1, "seed": 0, "device": "cpu"},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
    }
    for key, value in changes.items():
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return copy.deepcopy(recipe)


def write_tone(path, freq: float = 440.0, seconds: float = 1.0, rate: int = 16000, channels: int = 1,
               subtype: str = "PCM_16") -> str:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(str(path), data, rate, subtype=subtype)
    return str(path)


def assert_differs(a, b, atol: float = 1e-4) -> None:
    """``a`` and ``b`` differ clearly: some element by more than ``atol`` (not by round-off)."""
    gap = (a.float() - b.float()).abs().max().item()
    assert gap > atol, f"expected a clear difference, the largest is {gap:.3g} (<= {atol})"


@pytest.fixture
def tiny_recipe():
    from alm_kit.config.loader import recipe_from_dict

    return recipe_from_dict(tiny_recipe_dict())


@pytest.fixture
def tone_dataset(tmp_path):
    """A small manifest: one-clip and two-clip examples whose answer is the tone's pitch class."""
    import json

    rows = []
    (tmp_path / "audio").mkdir()
    for i in range(8):
        high = i % 2 == 0
        a = write_tone(tmp_path / "audio" / f"t{i}.wav", 1500.0 if high else 300.0, 1.5)
        audio = f"audio/t{i}.wav" if i < 4 else [f"audio/t{i}.wav", f"audio/t{(i + 1) % 8}.wav"]
        rows.append({"id": f"ex{i}", "audio": audio, "prompt": "is the tone high or low?",
                     "response": "high" if high else "low"})
        assert a
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global RNG state, whatever ran before it (test order and
    which tests were selected do not change what a test draws)."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_tmp(tmp_path_factory):
    """Disk feature caches of the test session go to a temporary folder, never ~/.cache."""
    os.environ["ALM_KIT_CACHE"] = str(tmp_path_factory.mktemp("alm-kit-cache"))
    yield
