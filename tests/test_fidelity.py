"""Fidelity switches to the reference code (issue 12): base-prompt class names and the CLI's
generation dtype default."""

from __future__ import annotations

import pytest
from PIL import Image

from dalda_aug.cli import main
from dalda_aug.plan import AugmentationPlan


@pytest.fixture()
def pets(tmp_path):
    root = tmp_path / "pets"
    for i, cls in enumerate(("american_bulldog", "Abyssinian")):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (40, 32), (40 * i, 90, 200 - 40 * i)).save(root / cls / "a.png")
    return root


def test_plan_class_names_folder_writes_the_folder_name_into_the_base_prompt(pets, tmp_path, tiny_models):
    # kkyuhun94/dalda semantic_aug/augmentations/dalda.py: format_name(name) = name.replace(' ', '_')
    # and DEFAULT_BASE_PROMPT "a photo of a {name}" -> "a photo of a american_bulldog".
    models = tiny_models.save(tmp_path / "models.json")
    common = ["plan", "--data", str(pets), "--variants", "2", "--models", str(models)]
    assert main([*common, "--out", str(tmp_path / "paper")]) == 0
    assert main([*common, "--out", str(tmp_path / "ref"), "--class-names", "folder"]) == 0
    paper, ref = AugmentationPlan.load(tmp_path / "paper"), AugmentationPlan.load(tmp_path / "ref")
    assert {v.prompt for v in paper.variants_for("american_bulldog/a.png")} == {"a photo of a american bulldog"}
    assert {v.prompt for v in ref.variants_for("american_bulldog/a.png")} == {"a photo of a american_bulldog"}
    assert {v.prompt for v in ref.variants_for("Abyssinian/a.png")} == {"a photo of a Abyssinian"}
    # the class (and so the CLIPScore's text) is unchanged; only the prompt differs
    assert [(v.class_name, v.score) for v in ref] == [(v.class_name, v.score) for v in paper]
    assert ref.config["prompts"]["class_names"] == "folder" and paper.config["prompts"]["class_names"] == "readable"


def test_plan_class_names_folder_fills_a_banks_name_placeholder(pets, tmp_path, tiny_models):
    from dalda_aug.prompts import PromptBank

    models = tiny_models.save(tmp_path / "models.json")
    PromptBank({"american bulldog": ["a {name} on a beach"], "Abyssinian": ["an {name} asleep"]}).save(tmp_path / "b.json")
    assert main(["plan", "--data", str(pets), "--variants", "1", "--models", str(models), "--out", str(tmp_path / "p"),
                 "--prompts", str(tmp_path / "b.json"), "--class-names", "folder"]) == 0
    plan = AugmentationPlan.load(tmp_path / "p")
    assert plan.variants_for("american_bulldog/a.png")[0].prompt == "a american_bulldog on a beach"


def test_plan_class_names_rejects_other_values(pets, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--data", str(pets), "--out", str(tmp_path / "o"), "--class-names", "upper"])
    assert info.value.code == 2 and "--class-names" in capsys.readouterr().err


def test_prepare_datasets_docstring_names_real_flags():
    import argparse
    import ast
    import re
    from pathlib import Path

    from dalda_aug.cli import build_parser

    source = Path(__file__).resolve().parents[1] / "examples" / "prepare_datasets.py"
    doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8")))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    plan_flags = sub.choices["plan"]._option_string_actions
    named = re.findall(r"dalda-aug plan (--[\w-]+)", doc)
    assert named == ["--shots"]
    assert all(flag in plan_flags for flag in named)
