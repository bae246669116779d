"""The example plugin package plugins/alm-kit-logmel-cnn, loaded the way a user's install loads it.

Nothing here pip-installs into the test environment: a fake ``*.dist-info`` folder in
tmp_path declares the ``alm_kit`` entry point (exactly what ``pip install`` writes),
and the plugin's source folder goes on ``sys.path``. The optional last test runs a
real ``pip install --target`` into tmp_path.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alm_kit.config.loader import recipe_from_dict
from alm_kit.config.parse import ConfigError, parse_dataclass
from alm_kit.interfaces import Encoder
from alm_kit.registry import build_registry, manager
from tests.conftest import assert_differs, tiny_recipe_dict

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "alm-kit-logmel-cnn"
DIST_NAME = "alm-kit-logmel-cnn"
DIST_VERSION = "0.1.0"
EP_NAME = "logmel_cnn"
EP_VALUE = "alm_kit_logmel_cnn.plugin"
ENCODER_PATH = "alm_kit_logmel_cnn.encoder:LogMelCNN"

#: a small, fast configuration for the training run
SMALL = {"clip_seconds": 2.0, "n_mels": 16, "channels": 8, "num_layers": 2, "output_dim": 32, "time_stride": 2}


def write_fake_dist(site: Path, name: str = DIST_NAME, version: str = DIST_VERSION,
                    entry_points: str = f"[alm_kit]\n{EP_NAME} = {EP_VALUE}\n") -> Path:
    """What ``pip install`` leaves in site-packages, minus the code: METADATA + entry_points.txt."""
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return dist


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """The plugin as if installed: its metadata in tmp_path/site, its code from plugins/."""
    site = tmp_path / "site"
    write_fake_dist(site)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(site))  # first on sys.path: wins over an editable install of the same name
    monkeypatch.delenv("ALM_KIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("ALM_KIT_TRACE_PLUGINS", raising=False)
    for name in [m for m in sys.modules if m.startswith("alm_kit_logmel_cnn")]:  # imported from another copy
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    return site


@pytest.fixture
def encoder_cls(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    from alm_kit_logmel_cnn.encoder import LogMelCNN

    return LogMelCNN


def make(cls, **params):
    return cls(parse_dataclass(cls.Config, params, path="params"))


# --------------------------------------------------------------------------- packaging
def test_pyproject_declares_the_entry_point_the_tests_fake():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == DIST_NAME
    assert project["version"] == DIST_VERSION
    assert {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]} >= {"alm-kit", "torch"}
    assert project["entry-points"]["alm_kit"] == {EP_NAME: EP_VALUE}
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["license"] == "MIT"  # an SPDX string: the {text = ...} table warns (setuptools >= 77)
    assert data["build-system"]["requires"] == ["setuptools>=77"]
    assert (PLUGIN_DIR / "README.md").is_file()


# --------------------------------------------------------------------------- discovery
def test_registry_loads_plugin_through_entry_point(plugin_installed, monkeypatch):
    # listing components must not import the encoder module (it registers a "module:Class" string)
    monkeypatch.delitem(sys.modules, "alm_kit_logmel_cnn.encoder", raising=False)
    registry = build_registry()

    assert "alm_kit_logmel_cnn.encoder" not in sys.modules
    assert not [f for f in registry.failures if f.plugin == EP_NAME], registry.failures
    entry = registry.get("encoder", "logmel_cnn")
    assert (entry.provider.distribution, entry.provider.version, entry.provider.plugin) == (
        DIST_NAME, DIST_VERSION, EP_NAME)
    assert entry.target_path == ENCODER_PATH
    assert entry.description
    cls = entry.load()
    assert issubclass(cls, Encoder) and cls.__qualname__ == "LogMelCNN"
    assert str(Path(sys.modules["alm_kit_logmel_cnn.encoder"].__file__)).startswith(str(PLUGIN_DIR))

    # built-ins are still there, provided by alm-kit itself
    htsat = registry.get("encoder", "htsat")
    assert htsat.provider.distribution == "alm-kit"
    for kind, name in (("projector", "mlp"), ("decoder", "causal_lm"), ("layout", "prefix")):
        assert registry.get(kind, name).provider.distribution == "alm-kit"
    assert not [group for group in registry.duplicates() if group[0].name == "logmel_cnn"]


def test_plugins_command_shows_distribution_and_entry_point_name(plugin_installed, monkeypatch, capsys):
    from alm_kit.cli import main

    monkeypatch.setattr(manager, "_REGISTRY", build_registry())
    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if " logmel_cnn " in line)
    assert line.split()[:5] == ["encoder", "logmel_cnn", DIST_NAME, DIST_VERSION, f"({EP_NAME})"]


def test_load_plugins_env_selects_entry_points(plugin_installed, monkeypatch):
    monkeypatch.setenv("ALM_KIT_LOAD_PLUGINS", "")
    registry = build_registry()
    assert "logmel_cnn" not in registry.names("encoder")
    assert "htsat" in registry.names("encoder")

    monkeypatch.setenv("ALM_KIT_LOAD_PLUGINS", "some_other_plugin, logmel_cnn")
    assert "logmel_cnn" in build_registry().names("encoder")


# --------------------------------------------------------------------------- the encoder
def test_frames_match_info_and_mask_follows_lengths(encoder_cls):
    enc = make(encoder_cls).eval()
    cfg = enc.config
    assert enc.spec.sample_rate == 16000 and enc.spec.clip_samples == 32000 and enc.spec.pad == "zero"
    assert enc.info.frame_dim == enc.info.pooled_dim == cfg.output_dim
    assert enc.info.frame_rate == pytest.approx(16000 / (cfg.hop * cfg.time_stride ** cfg.num_layers))

    lengths = torch.tensor([32000, 16000, 5000, 1])
    waves = torch.randn(4, 32000) * 0.1
    for i, n in enumerate(lengths.tolist()):
        waves[i, n:] = 0.0
    with torch.no_grad():
        out = enc(waves, lengths)

    assert out.frames.shape == (4, enc.info.num_frames, cfg.output_dim)
    assert out.mask.shape == (4, enc.info.num_frames) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (4, cfg.output_dim)
    assert torch.isfinite(out.frames).all() and torch.isfinite(out.pooled).all()
    assert out.mask[0].all()  # a full clip has no padded frames
    # frame j starts at sample j * hop * stride**layers; valid exactly when that sample is in the clip
    samples_per_frame = cfg.hop * cfg.time_stride ** cfg.num_layers
    starts = torch.arange(enc.info.num_frames) * samples_per_frame
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(out.mask[i], starts <= n), (n, out.mask[i])
    assert out.mask[1].sum() == enc.frames_for(16000) < enc.info.num_frames
    assert out.mask[3].tolist() == [True] + [False] * (enc.info.num_frames - 1)
    assert torch.all(out.frames[~out.mask] == 0)


def test_pooled_ignores_padded_samples(encoder_cls):
    enc = make(encoder_cls).eval()
    torch.manual_seed(0)
    lengths = torch.tensor([32000, 12000, 3000])
    waves = torch.randn(3, 32000) * 0.1
    noisy = waves.clone()
    for i, n in enumerate(lengths.tolist()):
        waves[i, n:] = 0.0
        noisy[i, n:] = torch.randn(32000 - n)  # loud garbage where the clip is padded
    with torch.no_grad():
        a, b = enc(waves, lengths), enc(noisy, lengths)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.frames[a.mask], b.frames[b.mask], rtol=0, atol=1e-6)
    # the pooled vector is the mean of the valid frames only
    for i in range(3):
        torch.testing.assert_close(a.pooled[i], a.frames[i][a.mask[i]].mean(0))
    # ... and the padding really mattered to the unmasked computation (the check above is not vacuous)
    with torch.no_grad():
        c = enc(noisy, torch.full((3,), 32000))
    assert_differs(c.pooled[1], a.pooled[1], atol=1e-3)


def test_variable_length_clip_alone_equals_clip_in_padded_batch(encoder_cls):
    enc = make(encoder_cls, clip_seconds=None, pad="zero").eval()
    assert enc.spec.clip_seconds is None and enc.spec.pad == "none"
    assert enc.info.num_frames is None
    torch.manual_seed(1)
    short, long = torch.randn(7000) * 0.1, torch.randn(19000) * 0.1
    batch = torch.zeros(2, 19000)
    batch[0, :7000], batch[1] = short, long
    with torch.no_grad():
        alone = enc(short[None], torch.tensor([7000]))
        both = enc(batch, torch.tensor([7000, 19000]))
    n = alone.frames.shape[1]
    assert alone.mask.all() and n == enc.frames_for(7000)
    assert both.mask[0].sum() == n and both.mask[1].all() and both.frames.shape[1] == enc.frames_for(19000)
    torch.testing.assert_close(both.frames[0, :n], alone.frames[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.pooled[0], alone.pooled[0], rtol=1e-4, atol=1e-5)


def test_gradients_flow_and_init_seed_is_local(encoder_cls):
    state = torch.random.get_rng_state()
    a, b = make(encoder_cls, **SMALL, init_seed=3), make(encoder_cls, **SMALL, init_seed=3)
    c = make(encoder_cls, **SMALL, init_seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.proj.weight, c.proj.weight)
    assert "window" not in a.state_dict() and "mel_fb" not in a.state_dict()  # constants stay out of checkpoints

    out = a(torch.randn(2, 32000) * 0.1, torch.tensor([32000, 9000]))
    (out.pooled.sum() + out.frames.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())


def test_checkpoint_param_restores_weights(encoder_cls, tmp_path):
    trained = make(encoder_cls, **SMALL, init_seed=5).eval()
    path = tmp_path / "enc.pt"
    torch.save(trained.state_dict(), path)
    loaded = make(encoder_cls, **SMALL, init_seed=6, checkpoint=str(path)).eval()
    assert loaded.has_pretrained_weights and not trained.has_pretrained_weights
    waves, lengths = torch.randn(2, 32000) * 0.1, torch.tensor([32000, 20000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(waves, lengths).pooled, trained(waves, lengths).pooled)


def test_mel_filterbank_has_no_empty_bands(encoder_cls):
    from alm_kit_logmel_cnn.encoder import mel_filterbank

    fb = mel_filterbank(32, 400, 16000)
    assert fb.shape == (201, 32)
    assert (fb.max(0).values > 0.3).all() and (fb >= 0).all() and (fb <= 1).all()
    peaks = fb.argmax(0)
    assert torch.all(peaks[1:] >= peaks[:-1])  # bands rise in frequency


def test_config_is_validated_like_builtins(encoder_cls):
    with pytest.raises(ConfigError, match="unknown key 'n_mel'.*did you mean 'n_mels'"):
        parse_dataclass(encoder_cls.Config, {"n_mel": 40}, path="model.encoders.0.params")
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_dataclass(encoder_cls.Config, {"channels": "many"}, path="p")
    with pytest.raises(ConfigError, match="hop"):
        parse_dataclass(encoder_cls.Config, {"hop": 800}, path="p")
    with pytest.raises(ConfigError, match="fmax"):
        parse_dataclass(encoder_cls.Config, {"fmax": 9000}, path="p")
    assert parse_dataclass(encoder_cls.Config, {"clip_seconds": None}, path="p").clip_seconds is None


# --------------------------------------------------------------------------- a recipe that names it
def test_tiny_recipe_with_plugin_encoder_trains(plugin_installed, tone_dataset, tmp_path, monkeypatch):
    from alm_kit.training.engine import train

    # the engine builds components from the process-wide registry: point it at one that has the plugin
    monkeypatch.setattr(manager, "_REGISTRY", build_registry())
    data = tiny_recipe_dict(**{
        "model.encoders": [{"name": "logmel_cnn", "train": "full", "params": dict(SMALL)}],
        "training.max_steps": 15,
        "training.lr": 1e-2,
        "training.warmup_steps": 0,
    })
    data["data"] = {"train": str(tone_dataset)}
    recipe = recipe_from_dict(data)

    started = time.perf_counter()
    result = train(recipe, progress=False, run_dir=tmp_path / "run")
    elapsed = time.perf_counter() - started

    assert result.steps == 15 and len(result.losses) == 15
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, result.losses
    assert result.checkpoint.is_dir() and (result.checkpoint / "model.safetensors").is_file()
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["step"] == 15
    assert "logmel_cnn" in (result.checkpoint / "recipe.yaml").read_text()
    # a randomly initialised encoder is stored in full, and training changed it
    from safetensors.torch import load_file

    saved = {k.removeprefix("encoders.logmel_cnn."): v for k, v in
             load_file(str(result.checkpoint / "model.safetensors")).items() if k.startswith("encoders.logmel_cnn.")}
    fresh = manager._REGISTRY.load("encoder", "logmel_cnn")
    initial = make(fresh, **SMALL).state_dict()
    assert set(saved) == set(initial)
    assert not torch.equal(saved["proj.weight"], initial["proj.weight"])
    assert elapsed < 60, f"training took {elapsed:.1f} s"


# --------------------------------------------------------------------------- a real pip install (optional)
def test_pip_install_target_writes_the_entry_point(tmp_path, monkeypatch):
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("pip is not available next to the interpreter")
    source = tmp_path / "src"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "target"
    cmd = [sys.executable, "-m", "pip", "install", "--verbose", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"pip could not build the plugin offline: {done.stderr[-500:]}")
    assert "project.license" not in done.stdout + done.stderr  # no deprecation warning about the metadata

    dists = list(target.glob("alm_kit_logmel_cnn-*.dist-info"))
    assert [d.name for d in dists] == [f"alm_kit_logmel_cnn-{DIST_VERSION}.dist-info"]
    installed = importlib.metadata.Distribution.at(dists[0])
    assert installed.metadata["Name"] == DIST_NAME
    assert [(ep.group, ep.name, ep.value) for ep in installed.entry_points] == [("alm_kit", EP_NAME, EP_VALUE)]
    assert (target / "alm_kit_logmel_cnn" / "encoder.py").is_file()

    monkeypatch.syspath_prepend(str(target))
    monkeypatch.delenv("ALM_KIT_LOAD_PLUGINS", raising=False)
    for name in [m for m in sys.modules if m.startswith("alm_kit_logmel_cnn")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    entry = build_registry().get("encoder", "logmel_cnn")
    assert (entry.provider.distribution, entry.provider.version) == (DIST_NAME, DIST_VERSION)
    entry.load()
    assert Path(sys.modules["alm_kit_logmel_cnn.encoder"].__file__).is_relative_to(target)
