import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dalda_aug
from dalda_aug.cli import main
from dalda_aug.config import ModelConfig
from dalda_aug.errors import InputError, MissingFileError

SOURCE_ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGE = SOURCE_ROOT / "dalda_aug"
PACKAGE_DIR = Path(dalda_aug.__file__).resolve().parent  # the package under test
# Set by `make test` to the folder the wheel was installed into.
INSTALLED = os.environ.get("DALDA_TEST_INSTALLED")


def test_import_is_light():
    code = (
        "import sys, dalda_aug, dalda_aug.cli, dalda_aug.config, dalda_aug.plan.ags, dalda_aug.plan;"
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


@pytest.mark.parametrize("package", ["dalda_aug", "dalda_aug.generators"])
def test_public_names_are_explicit_reexports_for_type_checkers(package):
    """Every name of a lazy package's ``__all__`` is imported under ``if TYPE_CHECKING:`` as
    ``X as X``: a ``mypy --strict`` user of the typed package otherwise gets "does not explicitly
    export" (the runtime ``__all__`` is computed, so type checkers cannot read it)."""
    import ast
    import importlib

    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    aliases = [a for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names]
    assert [a.name for a in aliases if a.asname != a.name] == []
    assert sorted(a.name for a in aliases) == sorted(set(module.__all__) - {"__version__"})


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
    assert "COMMAND" in capsys.readouterr().out  # the help
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    import diffusers
    import open_clip
    import torch
    import transformers

    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"dalda-aug {dalda_aug.__version__}", f"python {platform.python_version()}",
                     f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
                     f"diffusers {diffusers.__version__}",
                     f"transformers {transformers.__version__}", f"open_clip {open_clip.__version__}"]


def test_version_without_the_optional_packages():
    # No site-packages at all (-S), only the dalda_aug under test: every library is reported missing.
    code = f"import sys; sys.path.insert(0, {str(PACKAGE_DIR.parent)!r}); from dalda_aug.cli import main; main(['--version'])"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2:] == ["torch not installed", "diffusers not installed",
                                           "transformers not installed", "open_clip not installed"]
    assert out.stdout.splitlines()[0] == f"dalda-aug {dalda_aug.__version__}"


# -- packaging: what a user gets from the wheel --------------------------------------------------
def _package_files(package: Path) -> set[str]:
    """Every file of a package folder, relative to it, bytecode caches aside."""
    return {p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
            and not p.name.endswith("~")}


def test_wheel_contains_every_file_of_the_package(tmp_path):
    """Code, data files (presets, templates...) and py.typed: a file the wheel leaves out is missing
    for every user who installs from PyPI."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for item in SOURCE_ROOT.iterdir():  # the project files (setup.cfg, README.md...) and the package
        if item.is_file():
            shutil.copy2(item, tree / item.name)
    shutil.copytree(SOURCE_PACKAGE, tree / "dalda_aug", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheel"), str(tree)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("dalda_aug-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"dalda_aug-{dalda_aug.__version__}.dist-info/entry_points.txt").decode()
    shipped = {n.removeprefix("dalda_aug/") for n in names if n.startswith("dalda_aug/")}
    expected = _package_files(SOURCE_PACKAGE)
    assert "py.typed" in expected and "__init__.py" in expected
    assert sorted(expected - shipped) == []
    assert "dalda-aug = dalda_aug.cli:main" in entry_points
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.skipif(not INSTALLED, reason="`make test` runs the suite against the installed wheel")
def test_suite_runs_against_the_installed_wheel():
    installed = Path(INSTALLED).resolve() / "dalda_aug"
    assert PACKAGE_DIR == installed != SOURCE_PACKAGE
    # The CLI in a subprocess (as the CLI tests run it) imports the installed package too.
    code = "import dalda_aug.cli; print(dalda_aug.cli.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert Path(out.stdout.strip()).resolve() == installed / "cli" / "__init__.py"
    # Every file the package reads at run time (all of its non-code files) was installed.
    assert sorted(_package_files(SOURCE_PACKAGE) - _package_files(installed)) == []
