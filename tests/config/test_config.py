"""Recipes: safe YAML into dataclasses, extends, overrides, errors that name file, key and choices."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from alm_kit.config import ConfigError, load_recipe
from alm_kit.config.loader import dump_recipe
from tests.conftest import tiny_recipe_dict


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_loads_typed_recipe_and_parses_exponent_strings(tmp_path):
    data = tiny_recipe_dict()
    data["training"]["lr"] = "3e-4"  # YAML 1.1 reads this as a string
    recipe = load_recipe(write(tmp_path / "r.yaml", data))
    assert recipe.training.lr == pytest.approx(3e-4)
    assert recipe.model.encoders[0].name == "htsat"
    assert recipe.model.encoders[0].train == "frozen"


def test_extends_merges_and_overrides_apply(tmp_path):
    base = write(tmp_path / "base.yaml", tiny_recipe_dict())
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child",
                                            "training": {"batch_size": 2}})
    recipe = load_recipe(child, ["training.lr=0.5", "model.encoders.0.params.mel_bins=32", "data.train=x.jsonl"])
    assert recipe.name == "child"
    assert recipe.training.batch_size == 2 and recipe.training.max_steps == 4  # merged with the base
    assert recipe.training.lr == 0.5
    assert recipe.model.encoders[0].params["mel_bins"] == 32
    assert recipe.data.train == "x.jsonl"
    assert base


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    base = write(tmp_path / "base.yaml", tiny_recipe_dict())
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "training": {"bach_size": 2}})
    with pytest.raises(ConfigError) as info:
        load_recipe(child)
    message = str(info.value)
    assert str((tmp_path / "child.yaml").resolve()) in message
    assert "training.bach_size" in message and "did you mean 'batch_size'" in message
    assert base


def test_error_in_base_file_names_the_base(tmp_path):
    data = tiny_recipe_dict()
    data["training"]["schedule"] = "cosin"
    write(tmp_path / "base.yaml", data)
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "c"})
    with pytest.raises(ConfigError) as info:
        load_recipe(child)
    message = str(info.value)
    assert "base.yaml" in message and "training.schedule" in message
    assert "'cosine'" in message and "'constant'" in message


def test_override_error_names_command_line(tmp_path):
    path = write(tmp_path / "r.yaml", tiny_recipe_dict())
    with pytest.raises(ConfigError, match="command line: training.batch_size: expected an integer"):
        load_recipe(path, ["training.batch_size=big"])
    with pytest.raises(ConfigError, match="not key.path=value"):
        load_recipe(path, ["training.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe(path, ["model.encoders.3.name=x"])


def test_validation_rules(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'decoder'"):
        data = tiny_recipe_dict()
        del data["model"]["decoder"]
        load_recipe(write(tmp_path / "a.yaml", data))
    data = tiny_recipe_dict()
    data["model"]["encoders"].append(dict(data["model"]["encoders"][0]))
    with pytest.raises(ConfigError, match="encoder ids must be unique"):
        load_recipe(write(tmp_path / "b.yaml", data))
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        load_recipe(write(tmp_path / "c.yaml", tiny_recipe_dict(**{"training.batch_size": 0})))
    with pytest.raises(ConfigError, match="cycle"):
        write(tmp_path / "x.yaml", {"extends": "y.yaml"})
        load_recipe(write(tmp_path / "y.yaml", {"extends": "x.yaml"}))


def test_yaml_is_data_not_code(tmp_path):
    path = write(tmp_path / "evil.yaml", "name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_component_params_are_checked_against_the_component_config(tmp_path):
    from alm_kit.cli import main

    data = tiny_recipe_dict()
    data["model"]["projector"]["params"]["dropuot"] = 0.1
    path = write(tmp_path / "r.yaml", data)
    with pytest.raises(ConfigError) as info:
        _validate(path)
    assert "model.projector.params.dropuot" in str(info.value) and "did you mean 'dropout'" in str(info.value)
    data = tiny_recipe_dict()
    data["model"]["projector"]["name"] = "mpl"
    path = write(tmp_path / "s.yaml", data)
    assert main(["recipe", "validate", path]) == 2  # printed as an error, no traceback


def _validate(path: str, overrides: list[str] = ()) -> None:
    import argparse

    from alm_kit.cli import cmd_recipe_validate

    cmd_recipe_validate(argparse.Namespace(recipe=path, overrides=list(overrides)))


def test_recipe_show_round_trips(tmp_path, capsys):
    from alm_kit.cli import main

    path = write(tmp_path / "r.yaml", tiny_recipe_dict())
    assert main(["recipe", "show", path, "training.lr=0.25"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["lr"] == 0.25
    again = load_recipe(write(tmp_path / "again.yaml", shown))
    assert dump_recipe(again) == dump_recipe(load_recipe(path, ["training.lr=0.25"]))


@pytest.mark.parametrize("name", ["mellow.yaml", "demo.yaml"])
def test_shipped_recipes_validate(name, capsys):
    from pathlib import Path

    from alm_kit.cli import main

    path = Path(__file__).parents[2] / "recipes" / name
    assert main(["recipe", "validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_errors_in_overrides_name_the_command_line(tmp_path):
    path = write(tmp_path / "r.yaml", tiny_recipe_dict())
    with pytest.raises(ConfigError, match=r"^command line: training.batch_size: batch_size must be > 0"):
        load_recipe(path, ["training.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^command line: trainig: unknown key 'trainig'; did you mean 'training'"):
        load_recipe(path, ["trainig.lr=1"])


# --------------------------------------------------------------------------- YAML 1.1 booleans
def _enum_fields(cls=None, prefix=""):
    """(key path, allowed strings) of every Literal-typed field of the recipe schema (list items: index 0)."""
    import dataclasses
    import types
    import typing

    from alm_kit.config.schema import Recipe

    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for option in options:
            if typing.get_origin(option) is typing.Literal:
                yield key, option
            elif typing.get_origin(option) is list and dataclasses.is_dataclass(typing.get_args(option)[0]):
                yield from _enum_fields(typing.get_args(option)[0], f"{key}.0.")
            elif dataclasses.is_dataclass(option):
                yield from _enum_fields(option, f"{key}.")


def _with_containers(data: dict, key: str) -> dict:
    """``data`` with every optional mapping on the way to ``key`` present (required strings filled)."""
    containers = {"data.synth": {"out_dir": "x"}, "rephrase": {"answer_prompt": "a", "rewrite_prompt": "r"},
                  "model.fusion": {"name": "concat"}}
    for path, value in containers.items():
        if key.startswith(path + "."):
            node = data
            *parents, last = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node.setdefault(last, dict(value))
    return data


def _set(data: dict, key: str, value) -> dict:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return data


def _get(obj, key: str):
    for part in key.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def test_every_enum_field_keeps_yaml11_boolean_words_as_strings(tmp_path):
    """``cache_features: off`` means 'off' (YAML 1.1 would read False), in a file and on the command line,
    for every enum of the schema and each of its values, written unquoted."""
    import typing

    fields = {key: typing.get_args(tp) for key, tp in _enum_fields()}
    assert {"training.cache_features", "model.encoders.0.train", "generation.encoder_batch"} <= set(fields)
    assert "off" in fields["training.cache_features"]
    for key, values in fields.items():
        for value in values:
            data = _set(_with_containers(tiny_recipe_dict(), key), key, "@ENUM@")
            text = yaml.safe_dump(data).replace("@ENUM@", value)  # the value unquoted, as a user writes it
            from_file = load_recipe(write(tmp_path / "r.yaml", text))
            assert _get(from_file, key) == value, (key, value)
            base = _set(_with_containers(tiny_recipe_dict(), key), key, values[-1 if value == values[0] else 0])
            from_command_line = load_recipe(write(tmp_path / "b.yaml", base), [f"{key}={value}"])
            assert _get(from_command_line, key) == value, (key, value)


@dataclasses.dataclass
class PluginConfig:
    """A plugin component's Config whose choices are YAML 1.1 boolean words."""

    norm: Literal["off", "on", "layer"] = "layer"


def test_every_enum_param_of_the_components_keeps_its_string():
    """Component params pass through the same loader: their enums (the built-ins', and a plugin's with
    on/off choices) keep YAML 1.1 boolean words too."""
    import typing

    from alm_kit.config.loader import load_yaml
    from alm_kit.config.parse import _convert, parse_dataclass
    from alm_kit.registry import build_registry

    configs = [entry.load().Config for entry in build_registry(entry_points=False)] + [PluginConfig]
    checked = 0
    for config in configs:
        for key, tp in _enum_fields(config):
            for value in typing.get_args(tp):
                assert _convert(tp, load_yaml(f"v: {value}")["v"], key, lambda _k: None) == value, (config, key)
                checked += 1
    assert checked > 10
    assert parse_dataclass(PluginConfig, load_yaml("norm: off")).norm == "off"


def test_yaml11_boolean_words_still_mean_booleans_in_bool_fields(tmp_path):
    path = write(tmp_path / "r.yaml", yaml.safe_dump(tiny_recipe_dict()) + "description: no\n")
    recipe = load_recipe(path, ["data.skip_bad_audio=on", "generation.thinking=Off", "training.compile=yes"])
    assert recipe.description == "no"  # a string field keeps the word
    assert recipe.data.skip_bad_audio is True and recipe.generation.thinking is False and recipe.training.compile
    with pytest.raises(ConfigError, match="generation.do_sample: expected true or false, got 'maybe'"):
        load_recipe(path, ["generation.do_sample=maybe"])


# --------------------------------------------------------------------------- extends and components
def test_extends_with_another_component_name_replaces_the_parent_entry(tmp_path):
    write(tmp_path / "base.yaml", tiny_recipe_dict())
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  projector:\n"
                                           "    name: linear\n    params: {bias: false}\n")
    recipe = load_recipe(child)
    assert recipe.model.projector.name == "linear"
    assert recipe.model.projector.params == {"bias": False}  # none of the parent mlp's params
    assert recipe.model.decoder.params["tokenizer"] == "builtin:tiny"  # other entries still merge
    _validate(child)  # the linear projector accepts what is left
    from alm_kit.config.loader import origin_of

    assert origin_of(recipe, "model.projector.params.style") == origin_of(recipe, "model.projector")
    assert origin_of(recipe, "model.projector") == str((tmp_path / "child.yaml").resolve())

    # the same name still merges key by key; params: null resets them to the component's defaults
    same = write(tmp_path / "same.yaml", "extends: base.yaml\nmodel:\n  projector:\n    params: {dropout: 0.5}\n")
    assert load_recipe(same).model.projector.params["style"] == "residual"
    reset = write(tmp_path / "reset.yaml", "extends: base.yaml\nmodel:\n  projector:\n    params: null\n")
    assert load_recipe(reset).model.projector.params == {}
    assert load_recipe(child, ["model.projector.params=null"]).model.projector.params == {}


# --------------------------------------------------------------------------- where an error is reported
def test_post_init_error_names_origin_and_key_of_the_value_set_last(tmp_path):
    """A check across two fields is reported at the one the user set last, with where it was set."""
    data = tiny_recipe_dict()
    data["model"]["projector"] = {"name": "qformer", "params": {"hidden_dim": 64, "num_heads": 4}}
    base = write(tmp_path / "base.yaml", data)
    with pytest.raises(ConfigError) as info:
        _validate(base, ["model.projector.params.num_heads=5"])
    assert str(info.value).startswith("command line: model.projector.params.num_heads: hidden_dim (64) must be "
                                      "divisible by num_heads (5)")

    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  projector:\n    params: {num_heads: 5}\n")
    with pytest.raises(ConfigError) as info:
        _validate(child)
    assert str(info.value).startswith(f"{(tmp_path / 'child.yaml').resolve()}: model.projector.params.num_heads: ")

    with pytest.raises(ConfigError) as info:  # a schema check, the same way
        load_recipe(write(tmp_path / "g.yaml", tiny_recipe_dict(**{"generation.use_cache": False})),
                    ["generation.num_beams=4"])
    assert str(info.value).startswith("command line: generation.num_beams: num_beams > 1 (beam search) needs")


def test_choices_are_punctuated(tmp_path):
    data = tiny_recipe_dict()
    data["model"]["projector"]["name"] = "xyz"
    with pytest.raises(ConfigError, match=r"unknown projector 'xyz'\. Valid choices: .*linear, mlp"):
        _validate(write(tmp_path / "r.yaml", data))
    path = write(tmp_path / "s.yaml", tiny_recipe_dict())
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'\. Allowed keys: output_dir, epochs"):
        load_recipe(path, ["training.zzz=1"])
    with pytest.raises(ConfigError, match=r"invalid value 'x'\. Allowed: 'cosine', 'linear', 'constant'$"):
        load_recipe(path, ["training.schedule=x"])
    with pytest.raises(ConfigError, match=r"'cosin'; did you mean 'cosine'\? Allowed: 'cosine'"):
        load_recipe(path, ["training.schedule=cosin"])
