"""What the commands share (dalda_aug/cli/_common.py): every subcommand runs something, and the
commands that write a plan folder refuse a taken one with the same line, before anything loads."""

from __future__ import annotations

import argparse
import sys

import pytest

from dalda_aug.cli import build_parser, main
from dalda_aug.cli._common import options


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) of every command that takes no further subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*words, name))


def test_every_command_runs_a_function():
    leaves = dict(_leaves(build_parser()))
    # The commands the README lists, read by hand; each is found and runs a function of its own module.
    expected = {("plan",), ("warm",), ("prompts",), ("demo",), ("filter",), ("train-filter",), ("metrics",),
                ("inspect",), ("textual-inversion",), ("make-tiny-models",), ("cache", "stats"),
                ("cache", "export"), ("cache", "verify"), ("cache", "specs")}
    assert expected <= set(leaves)
    for words, parser in leaves.items():
        run = parser.get_default("func")
        assert callable(run), words
        assert run.__module__.startswith("dalda_aug.cli"), (words, run.__module__)


@pytest.mark.parametrize("command", [
    ["plan", "--data", "{data}"],
    ["filter", "--plan", "{data}", "--cache", "{data}", "--by", "clip-class", "--keep", "1"],
])
def test_a_taken_plan_folder_is_refused_in_one_line_before_anything_loads(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("{}", encoding="utf-8")
    data = tmp_path / "missing"  # never read: the refusal comes first
    argv = [word.format(data=data) for word in command] + ["--out", str(out)]
    heavy = {"torch", "open_clip", "diffusers"} - set(sys.modules)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"dalda-aug {command[0]}: error: --out {out} already holds a plan; "
                   "pass --overwrite to replace it\n")
    assert not heavy & set(sys.modules), "a model library was imported before the refusal"


def test_options_hands_on_the_named_ones():
    args = argparse.Namespace(steps=3, size=None, seed=0)
    assert options(args, "steps", "size") == {"steps": 3, "size": None}
    assert options(args, "steps", "size", "seed", given=True) == {"steps": 3, "seed": 0}
    with pytest.raises(AttributeError):
        options(args, "nope")


@pytest.mark.parametrize("command", [
    ["warm", "--plan", "{missing}", "--cache", "{missing}"],
    ["textual-inversion", "--data", "{missing}", "--out", "{missing}", "--models", "{models}"],
])
def test_threads_below_one_is_one_line_naming_the_option(tmp_path, capsys, tiny_models, command):
    """warm and textual-inversion take --threads alike: 0 is refused in one line (exit 2), before
    the plan or the images are read."""
    from pathlib import Path

    models = Path(tiny_models.base).parent  # the folder make_tiny_models wrote, with its models.json
    assert (models / "models.json").is_file()
    argv = [word.format(missing=tmp_path / "missing", models=models) for word in command] + ["--threads", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"dalda-aug {command[0]}: error: --threads must be >= 1, got 0\n"
