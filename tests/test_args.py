"""mhsft/args.py: the helpers the stages' command lines share."""

from __future__ import annotations

import pytest

from mhsft.args import pick_subcommand, split_positional
from mhsft.data.commands import DataCommandArguments
from mhsft.report.contents import ReportArguments
from mhsft.utils import UserError


def test_bare_words_join_the_list_flag_wherever_they_stand():
    argv = ["a.json", "--model", "builtin:tiny", "b.json", "--strict", "c.json", "--dataset", "d.json"]
    assert split_positional(argv, DataCommandArguments, "dataset") == [
        "--dataset", "a.json", "b.json", "c.json", "d.json", "--model", "builtin:tiny", "--strict",
    ]  # fmt: skip
    argv = ["run/v0", "--baseline", "eval/base", "eval/ft", "--max_samples", "3", "--gate", "g.yaml"]
    assert split_positional(argv, ReportArguments, "inputs") == [
        "--inputs", "run/v0", "eval/ft", "--baseline", "eval/base", "--max_samples", "3", "--gate", "g.yaml",
    ]  # fmt: skip
    assert split_positional(["--strict", "true", "x.json"], DataCommandArguments, "dataset") == [
        "--dataset", "x.json", "--strict", "true",
    ]  # fmt: skip


def test_subcommands(capsys):
    table = {"create": "make one", "serve": "serve it"}
    assert pick_subcommand([], "review", "[STUDY]", table) is None
    assert "usage: mhsft review <command> [STUDY]" in capsys.readouterr().out
    assert pick_subcommand(["serve", "s", "--port", "1"], "review", "", table) == (
        "serve",
        ["s", "--port", "1"],
    )
    with pytest.raises(UserError, match="unknown review command 'srve'; choose one of: create, serve"):
        pick_subcommand(["srve"], "review", "", table)
