"""Registry: built-ins through the public hooks, failing and duplicate plugins, unknown names."""

from __future__ import annotations

import types

import pytest

from alm_kit import hookimpl
from alm_kit.registry import (
    ComponentLoadError,
    DuplicateComponentError,
    UnknownComponentError,
    build_registry,
    manager,
)
from alm_kit.registry.manager import BUILTIN_PLUGINS
from tests.conftest import tiny_recipe_dict


def plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_builtins_register_through_the_public_hooks():
    registry = build_registry(entry_points=False)
    assert "htsat" in registry.names("encoder")
    assert {"linear", "mlp"} <= set(registry.names("projector"))
    assert registry.names("decoder") == ["causal_lm"]
    assert {"prefix", "placeholder"} <= set(registry.names("layout"))
    entry = registry.get("encoder", "htsat")
    assert entry.provider.distribution == "alm-kit"
    assert entry.provider.plugin in BUILTIN_PLUGINS
    # the built-in module uses the same hookimpl marker a third-party plugin uses
    import alm_kit.encoders

    assert hasattr(alm_kit.encoders.register_encoders, "alm_kit_impl")


def test_loading_a_component_checks_its_interface():
    from alm_kit.interfaces import Encoder

    registry = build_registry(entry_points=False)
    assert issubclass(registry.load("encoder", "htsat"), Encoder)
    bad = plugin(register_encoders=lambda register: register("not_an_encoder", "collections:OrderedDict"))
    registry = build_registry(plugins=[bad], entry_points=False)
    with pytest.raises(ComponentLoadError, match="does not subclass alm_kit.interfaces.Encoder"):
        registry.load("encoder", "not_an_encoder")


def test_unknown_name_lists_valid_ones_with_did_you_mean():
    registry = build_registry(entry_points=False)
    with pytest.raises(UnknownComponentError) as info:
        registry.get("projector", "mpl")
    message = str(info.value)
    assert "did you mean 'mlp'" in message
    assert "linear" in message and "mlp" in message
    with pytest.raises(ValueError, match="component kind"):
        registry.names("encoderz")


def test_duplicate_name_names_both_providers():
    from alm_kit.projectors.mlp import MLPProjector

    dup = plugin(register_projectors=lambda register: register("mlp", MLPProjector, description="again"))
    registry = build_registry(plugins=[dup], entry_points=False)
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("projector", "mlp")
    message = str(info.value)
    assert "alm_kit.projectors" in message  # the built-in provider
    assert "alm_kit.projectors.mlp:MLPProjector" in message and message.count("->") == 2
    assert [g[0].name for g in registry.duplicates()] == ["mlp"]
    assert "linear" in registry.names("projector")  # everything else still works


def test_failing_hook_is_reported_and_registers_nothing_others_keep_working():
    def broken(register):
        register("half", "x:Y")
        raise RuntimeError("boom")

    registry = build_registry(plugins=[plugin(register_encoders=broken)], entry_points=False)
    assert any("boom" in f.error for f in registry.failures)
    assert "half" not in registry.names("encoder")
    assert "htsat" in registry.names("encoder")


def test_misspelled_hook_is_reported():
    typo = plugin(register_encoder=lambda register: None)
    registry = build_registry(plugins=[typo], entry_points=False)
    assert any("did you mean 'register_encoders'" in f.error for f in registry.failures)


def installed_plugin(site, name: str, dist_name: str, module: str, source: str | None = None) -> None:
    """An entry point as ``pip install`` declares it (``*.dist-info``), with its module's ``source``."""
    import importlib

    dist = site / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[alm_kit]\n{name} = {module}\n")
    if source is not None:
        (site / f"{module}.py").write_text(source)
    importlib.invalidate_caches()


def test_misspelled_hook_of_an_installed_plugin_names_its_distribution(tmp_path, monkeypatch):
    installed_plugin(tmp_path, "typo", "acme-typo", "acme_typo_plugin",
                     "from alm_kit import hookimpl\n\n@hookimpl\ndef register_encoder(register):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ALM_KIT_LOAD_PLUGINS", raising=False)
    failure = next(f for f in build_registry().failures if f.plugin == "typo")
    assert failure.distribution == "acme-typo"
    assert "unknown hook 'register_encoder'; did you mean 'register_encoders'?" in failure.error
    assert failure.kind == "encoder"


def test_entry_point_that_fails_to_import_is_reported_by_name(tmp_path, monkeypatch):
    installed_plugin(tmp_path, "broken", "broken-plugin", "broken_plugin_module_that_does_not_exist")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ALM_KIT_LOAD_PLUGINS", raising=False)
    registry = build_registry()
    failure = next(f for f in registry.failures if f.plugin == "broken")
    assert failure.distribution == "broken-plugin"
    assert "ModuleNotFoundError" in failure.error
    assert "htsat" in registry.names("encoder")

    monkeypatch.setenv("ALM_KIT_LOAD_PLUGINS", "")  # load no third-party plugins
    assert not any(f.plugin == "broken" for f in build_registry().failures)


def test_plugins_command_lists_kind_name_and_provider(capsys):
    from alm_kit.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if " htsat " in f" {line} ")
    assert line.split()[:4] == ["encoder", "htsat", "alm-kit", "0.1.0"]


def test_plugin_targets_must_be_classes_or_module_class_strings():
    for target in ("acme.encoder.Encoder", "acme encoder:Encoder", 42):
        bad = plugin(register_encoders=lambda register, target=target: register("acme", target))
        registry = build_registry(plugins=[bad], entry_points=False)
        failure = next(f for f in registry.failures)
        assert "acme" in failure.error and repr(target) in failure.error and failure.kind == "encoder"
        with pytest.raises(UnknownComponentError, match=f"its encoders are missing:\n.*{failure.error}"):
            registry.get("encoder", "acme")


# --------------------------------------------------------------------------- as commands report them
def recipe_file(tmp_path, **changes) -> str:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**changes)))
    return str(path)


@pytest.mark.parametrize("target, expected", [
    ("collections:OrderedDict", "does not subclass alm_kit.interfaces.Projector"),
    ("acme_projector_not_installed:Proj", "cannot import 'acme_projector_not_installed:Proj': ModuleNotFoundError"),
    ("alm_kit.projectors.mlp:NoSuchClass", "cannot import 'alm_kit.projectors.mlp:NoSuchClass': AttributeError"),
])
def test_recipe_validate_reports_an_unusable_plugin_component_without_traceback(
        target, expected, tmp_path, monkeypatch, capsys):
    from alm_kit.cli import main

    acme = plugin(register_projectors=lambda register: register("acme", target))
    monkeypatch.setattr(manager, "_REGISTRY", build_registry(plugins=[acme], entry_points=False))
    path = recipe_file(tmp_path, **{"model.projector": {"name": "acme"}})
    assert main(["recipe", "validate", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path.resolve() / 'r.yaml'}: model.projector.name: projector 'acme' from ")
    assert expected in err and "Traceback" not in err


def failed_plugins():
    def broken(register):
        raise RuntimeError("needs acme-sdk >= 2")

    return [plugin(register_encoders=broken), plugin(register_projectors=broken)]


def test_unknown_component_names_the_plugins_that_failed_to_load(tmp_path, monkeypatch, capsys):
    from alm_kit.cli import main

    registry = build_registry(plugins=failed_plugins(), entry_points=False)
    with pytest.raises(UnknownComponentError) as info:
        registry.get("encoder", "acme_wav2vec")
    message = str(info.value)
    assert "unknown encoder 'acme_wav2vec'. Valid choices: " in message
    assert "A plugin failed to load; its encoders are missing:" in message
    assert "register_encoders: RuntimeError: needs acme-sdk >= 2" in message
    assert "register_projectors" not in message  # a failed projector hook cannot have provided an encoder
    assert "failed to load" not in str(pytest.raises(UnknownComponentError, registry.get, "decoder", "x").value)

    monkeypatch.setattr(manager, "_REGISTRY", registry)
    path = recipe_file(tmp_path, **{"model.encoders": [{"name": "acme_wav2vec"}]})
    assert main(["recipe", "validate", path]) == 2
    assert "its encoders are missing:\n  plugin '" in capsys.readouterr().err


def test_train_names_the_plugins_that_failed_to_load(tmp_path, monkeypatch, capsys, tone_dataset):
    from alm_kit.cli import main

    monkeypatch.setattr(manager, "_REGISTRY", build_registry(plugins=failed_plugins(), entry_points=False))
    path = recipe_file(tmp_path, **{"model.encoders": [{"name": "acme_wav2vec"}]})
    assert main(["train", path, "--quiet", f"data.train={tone_dataset}",
                 f"training.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model.encoders.0.name: unknown encoder 'acme_wav2vec'" in err
    assert "register_encoders: RuntimeError: needs acme-sdk >= 2" in err and "Traceback" not in err
