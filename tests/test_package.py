import json
import subprocess
import sys

import pytest

import dalda_aug
from dalda_aug.cli import main
from dalda_aug.config import ModelConfig
from dalda_aug.errors import InputError, MissingFileError


def test_import_is_light():
    code = (
        "import sys, dalda_aug, dalda_aug.cli, dalda_aug.config, dalda_aug.ags, dalda_aug.plan;"
        "dalda_aug.cli.build_parser();"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'timm') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_resolves():
    for name in dalda_aug.__all__:
        assert getattr(dalda_aug, name) is not None, name
    with pytest.raises(AttributeError):
        dalda_aug.not_a_name


def test_model_config_defaults_and_json(tmp_path):
    cfg = ModelConfig()
    assert cfg.base == "CompVis/stable-diffusion-v1-4"
    assert cfg.vae == "stabilityai/sd-vae-ft-mse"
    assert (cfg.ip_adapter, cfg.ip_adapter_subfolder, cfg.ip_adapter_weight, cfg.image_encoder_subfolder) == (
        "h94/IP-Adapter", "models", "ip-adapter_sd15.bin", "models/image_encoder")
    assert (cfg.clip_model, cfg.clip_pretrained) == ("ViT-B-16", "openai")
    path = cfg.save(tmp_path / "m.json")
    assert ModelConfig.load(path) == cfg
    other = ModelConfig(vae=None)
    assert other.fingerprint() != cfg.fingerprint()
    # relative local paths resolve against the file's folder
    (tmp_path / "rel.json").write_text(json.dumps({"base": "./sd"}))
    assert ModelConfig.load(tmp_path / "rel.json").base == str((tmp_path / "sd").resolve())


def test_model_config_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nope.json"):
        ModelConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        ModelConfig.load(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"bse": "x"}))
    with pytest.raises(InputError, match="bse"):
        ModelConfig.load(tmp_path / "typo.json")
    with pytest.raises(InputError, match="base"):
        ModelConfig(base="")


def test_make_tiny_models_cli(tmp_path, capsys):
    assert main(["make-tiny-models", str(tmp_path / "m")]) == 0
    cfg = ModelConfig.load(tmp_path / "m" / "models.json")
    for p in (cfg.base, cfg.vae, cfg.ip_adapter, cfg.clip_model, cfg.clip_pretrained):
        assert (tmp_path / "m").resolve() in __import__("pathlib").Path(p).resolve().parents
    assert (tmp_path / "m" / "ip-adapter" / "models" / "ip-adapter_sd15.bin").is_file()
    assert (tmp_path / "m" / "ip-adapter" / "models" / "image_encoder" / "config.json").is_file()
    assert (tmp_path / "m" / "sd" / "model_index.json").is_file()
    import torch

    sd = torch.load(tmp_path / "m" / "ip-adapter" / "models" / "ip-adapter_sd15.bin", weights_only=True)
    assert set(sd) == {"image_proj", "ip_adapter"}
    assert set(sd["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert sd["image_proj"]["proj.weight"].shape[0] == 4 * sd["image_proj"]["norm.weight"].shape[0]
    assert all(k.split(".")[0].isdigit() and int(k.split(".")[0]) % 2 == 1 for k in sd["ip_adapter"])


def test_cli_help_and_version(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and dalda_aug.__version__ in capsys.readouterr().out
