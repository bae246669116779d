"""alm-kit train on a machine without the recipe's data, checkpoints or models: one message that says
what is missing and how to get it, exit 2, decided before anything is built and without retries."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from alm_kit.config.loader import recipe_from_dict
from alm_kit.sources import missing_sources
from tests.conftest import tiny_recipe_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails at once, as with no DNS; the attempts are counted."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_train_mellow_offline_without_its_data_says_what_is_missing(tmp_path, monkeypatch, capsys, no_network):
    from alm_kit.cli import main

    monkeypatch.chdir(tmp_path)  # data/reasonaqa/... does not exist here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(RECIPES / "mellow.yaml"), "model.decoder.params.pretrained=alm-kit-tests/not-cached",
                 "model.encoders.0.params.checkpoint=/nowhere/HTSAT_AudioSet_Saved_1.ckpt"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {RECIPES / 'mellow.yaml'} needs what this machine does not have:")
    lines = err.splitlines()[1:]
    assert [line.split(":")[0].strip("- ") for line in lines] == [
        "data.train", "data.eval", "model.encoders.0.params.checkpoint", "model.decoder.params.pretrained"]
    assert "data/reasonaqa/train.json does not exist; point data.train=PATH" in lines[0]
    assert "data.eval=null to skip it" in lines[1]
    assert "/nowhere/HTSAT_AudioSet_Saved_1.ckpt does not exist" in lines[2]
    assert "model.encoders.0.params.checkpoint=null for random weights" in lines[2]
    assert "not in the local cache, and HF_HUB_OFFLINE is set" in lines[3]
    assert "huggingface-cli download alm-kit-tests/not-cached" in lines[3]
    assert "model.decoder.params.pretrained=/path/to/copy" in lines[3]
    assert no_network == []  # offline: the hub is not even asked
    assert not (tmp_path / "runs").exists()  # nothing was built or written


def test_unreachable_hub_and_whisper_download_are_one_attempt_each(tmp_path, monkeypatch, capsys, no_network):
    """tinygiant.yaml with the network down (no HF_HUB_OFFLINE): Qwen3 from the hub and Whisper's
    download are reported after one connection attempt per host."""
    from alm_kit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # Whisper's weights are not cached here
    code = main(["train", str(RECIPES / "tinygiant.yaml"), "model.decoder.params.preset=null",
                 "model.decoder.params.pretrained=alm-kit-tests/not-cached-qwen3"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = {line.split(":")[0].strip("- "): line for line in err.splitlines()[1:]}
    assert set(lines) == {"data.train", "data.eval", "model.decoder.params.pretrained",
                          "model.encoders.0.params.pretrained"}
    assert "huggingface.co cannot be reached (Name or service not known)" in lines["model.decoder.params.pretrained"]
    whisper = lines["model.encoders.0.params.pretrained"]
    assert "large-v3-turbo.pt is not downloaded yet" in whisper and str(tmp_path / "cache" / "whisper") in whisper
    assert "model.encoders.0.params.pretrained=false model.encoders.0.params.checkpoint=/path/large-v3-turbo.pt" in whisper
    assert sorted(host for host, _ in no_network) == ["huggingface.co", "openaipublic.azureedge.net"]


def test_what_is_there_passes(tmp_path, monkeypatch, no_network):
    """Existing files, a cached hub model and a local decoder folder are not reported."""
    import huggingface_hub

    train = tmp_path / "train.jsonl"
    train.write_text("")
    (tmp_path / "htsat.ckpt").write_bytes(b"")
    recipe = tiny_recipe_dict(**{"data": {"train": str(train)}})
    recipe["model"]["encoders"][0]["params"]["checkpoint"] = str(tmp_path / "htsat.ckpt")
    assert missing_sources(recipe_from_dict(recipe)) == []
    recipe["model"]["decoder"]["params"] = {"pretrained": "some-org/some-model"}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert missing_sources(recipe_from_dict(recipe)) == []
    recipe["model"]["decoder"]["params"] = {"pretrained": str(tmp_path)}  # a local folder
    assert missing_sources(recipe_from_dict(recipe)) == [] and no_network == []


def test_synthetic_data_is_made_not_missing(tmp_path):
    recipe = tiny_recipe_dict(**{"data": {"train": str(tmp_path / "synth" / "train.jsonl"),
                                          "eval": str(tmp_path / "synth" / "test.json"),
                                          "synth": {"out_dir": str(tmp_path / "synth")}}})
    assert missing_sources(recipe_from_dict(recipe)) == []
