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
    from dalda_aug.clipscore import load_open_clip
    from dalda_aug.prompts import load_clip_tokenizer

    with pytest.raises(MissingFileError, match="tokenizer folder not found"):
        load_clip_tokenizer("./no/such/tokenizer")
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        load_open_clip("ViT-B-16", "missing-ckpt.pt")
    with pytest.raises(ModelLoadError, match="model config not found"):
        load_open_clip(str(tmp_path / "missing.json"), None)
