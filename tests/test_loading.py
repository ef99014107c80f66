"""The one "hub id or local path" rule, and the modules that read model locations through it."""

from __future__ import annotations

import json
import os

import pytest

from dalda_aug.config import ModelConfig
from dalda_aug.errors import MissingFileError, ModelLoadError
from dalda_aug.generators.loading import parse_location


@pytest.mark.parametrize("text, kind", [
    ("CompVis/stable-diffusion-v1-4", "hub"),
    ("models/sd", "hub"),             # owner/name: a hub id while no such folder exists
    ("ViT-B-16", "hub"),              # an open_clip name
    ("openai", "hub"),                # an open_clip pretrained tag
    ("./models/sd", "local"),
    ("../sd", "local"),
    ("~/sd", "local"),
    ("/abs/sd", "local"),
    ("a/b/c", "local"),
    ("C:\\models\\sd", "local"),
    ("ckpt.pt", "local"),
    ("weights.safetensors", "local"),
    ("model-config.json", "local"),
])
def test_rule(text, kind):
    assert parse_location(text).kind == kind


def test_an_existing_folder_is_local_and_base_dir_resolves(tmp_path, monkeypatch):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_location("models/sd").is_local
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert not parse_location("models/sd").is_local
    located = parse_location("models/sd", base_dir=tmp_path)
    assert located.is_local and located.value == str((tmp_path / "models" / "sd").resolve())
    assert parse_location("~/x").value == os.path.expanduser("~/x")


def test_models_file_resolves_relative_folders_by_the_rule(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "models.json").write_text(json.dumps({"base": "sd", "vae": "./vae", "ip_adapter": "h94/IP-Adapter"}))
    config = ModelConfig.load(tmp_path / "models.json")
    assert config.base == str((tmp_path / "sd").resolve())      # exists beside the file
    assert config.vae == str((tmp_path / "vae").resolve())      # written as a path
    assert config.ip_adapter == "h94/IP-Adapter"                # a hub id stays one


def test_tokenizer_and_open_clip_read_locations_by_the_rule(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    from dalda_aug.plan.clipscore import load_open_clip
    from dalda_aug.prompts import load_clip_tokenizer

    with pytest.raises(MissingFileError, match="tokenizer folder not found"):
        load_clip_tokenizer("./no/such/tokenizer")
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        load_open_clip("ViT-B-16", "missing-ckpt.pt")
    with pytest.raises(ModelLoadError, match="model config not found"):
        load_open_clip(str(tmp_path / "missing.json"), None)


# -- the one hub check (issue 20.2) and models files (issue 20.4, 20.7) --------------------------
def test_local_models_never_probe_the_hub(tiny_models, monkeypatch):
    import socket
    import time

    from dalda_aug.hub import hub_files, require_hub_models

    fields = ("base", "vae", "ip_adapter", "clip_model", "clip_pretrained")
    assert hub_files(tiny_models, fields) == []
    with socket.socket() as silent:  # a hub that never answers: a probe would wait 5 s
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        started = time.monotonic()
        require_hub_models(tiny_models, fields)
        assert time.monotonic() - started < 2


def test_hub_models_offline_and_not_cached_stop_in_one_line(tmp_path, monkeypatch):
    from dalda_aug.hub import HubUnreachableError, hub_files, require_hub_models

    models = ModelConfig()
    assert [f.repo for f in hub_files(models, ("base", "vae", "ip_adapter"))] == [
        "CompVis/stable-diffusion-v1-4", "h94/IP-Adapter", "stabilityai/sd-vae-ft-mse"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnreachableError) as info:
        require_hub_models(models, ("base",))
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "CompVis/stable-diffusion-v1-4" in message and "--models models.json" in message
    assert "h94/IP-Adapter" not in message  # only what the command loads
    assert "HF_HUB_OFFLINE=1" not in message  # set already: not suggested again (issue 29, point 9)


def test_a_models_folder_and_its_defaults(tmp_path):
    from dalda_aug.config import model_defaults
    from dalda_aug.errors import InputError

    ModelConfig(base="./sd").save(tmp_path / "m" / "models.json", defaults={"warm": {"size": 64, "steps": 2}})
    assert ModelConfig.load(tmp_path / "m").base == str((tmp_path / "m" / "sd").resolve())
    assert model_defaults(tmp_path / "m", "warm") == {"size": 64, "steps": 2}
    assert model_defaults(tmp_path / "m", "textual-inversion") == {}
    (tmp_path / "bad.json").write_text(json.dumps({"defaults": {"warm": {"size": "big"}}}))
    with pytest.raises(InputError, match="defaults.warm.size"):
        ModelConfig.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="holds no models.json"):
        ModelConfig.load(tmp_path)
