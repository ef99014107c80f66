"""An unknown option is said first: one line under the subcommand's usage, exit status 2, no
traceback, with a "did you mean" hint when it is close to one of the command's own options; the
required options a command lacks are said only when every option is known."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dalda_aug.cli import main


def _usage_and_error(capsys, argv: list[str]) -> tuple[list[str], str]:
    """Run ``main(argv)``, which must exit with status 2: the usage lines, and the one error line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    return lines[:-1], lines[-1]


@pytest.mark.parametrize(("argv", "prog", "said"), [
    (["plan", "--shtos", "2"], "dalda-aug plan", "--shtos 2 (did you mean --shots?)"),
    (["plan", "--shtos=2"], "dalda-aug plan", "--shtos=2 (did you mean --shots?)"),
    (["warm", "--stpes", "2"], "dalda-aug warm", "--stpes 2 (did you mean --steps?)"),
    (["cache", "export", "--shrad-size", "9"], "dalda-aug cache export", "--shrad-size 9 (did you mean --shard-size?)"),
    (["prompts", "--outt", "x"], "dalda-aug prompts", "--outt x (did you mean --out?)"),
    (["textual-inversion", "--zzz", "1"], "dalda-aug textual-inversion", "--zzz 1"),  # nothing close
])
def test_an_unknown_option_is_said_before_missing_required_ones(capsys, argv, prog, said):
    usage, error = _usage_and_error(capsys, argv)
    assert usage[0].startswith(f"usage: {prog} ")
    assert error == f"{prog}: error: unrecognized arguments: {said}"


def test_missing_required_options_are_said_when_every_option_is_known(capsys):
    usage, error = _usage_and_error(capsys, ["plan", "--shots", "2"])
    assert usage[0].startswith("usage: dalda-aug plan ")
    assert error == "dalda-aug plan: error: the following arguments are required: --data, --out"
    _, error = _usage_and_error(capsys, ["cache"])
    assert error == "dalda-aug cache: error: the following arguments are required: ACTION"


def test_plan_with_a_misspelled_option_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "dalda_aug", "plan", "--shtos", "2"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("usage: dalda-aug plan ")
    assert lines[-1] == "dalda-aug plan: error: unrecognized arguments: --shtos 2 (did you mean --shots?)"
    assert sum("error:" in line for line in lines) == 1
