"""One command pattern: every flag has help text showing its default, --version, paths from --run / --method."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from osv import __version__
from osv.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from subparsers(child)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_that_shows_its_default(command):
    for parser in subparsers(build_parser(command)):
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]}: no help text"
            text = parser.formatter_class(parser.prog)._get_help_string(action)
            if action.default not in (None, False):
                assert "default" in text, f"{parser.prog} {action.option_strings[0]}: default not shown"
        assert parser.get_default("func") is None or parser.get_default("func").__name__ in ("command", "run"), \
            parser.prog


def test_version_and_help_stay_plain():
    out = subprocess.run([Path(sys.executable).parent / "osv", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"osv {__version__}"


def test_train_and_generate_derive_their_paths(monkeypatch):
    """`osv train --run R` and `osv generate --method M` need no other path: the DAG's are derived."""
    from osv.eval import generate
    from osv.train import distill

    seen = {}
    monkeypatch.setattr("osv.launch.run_stage", lambda stage, fn, kwargs, params, **_: seen.update(kwargs))
    monkeypatch.chdir(ROOT)
    args = build_parser("train").parse_args(["train", "--run", "stage2"])
    assert distill.command(args) == 0
    assert (seen["init"], seen["ckpt"], seen["out"], seen["metrics"], seen["plots"]) == (
        "models/stage1", "runs/stage2", "models/stage2", "metrics/train/stage2.json", "plots/train/stage2.csv")
    args = build_parser("generate").parse_args(["generate", "--method", "osv_tts", "--gather"])
    monkeypatch.setattr(generate, "gather", lambda params, method, model, out, jobs: seen.update(model=model, out=out))
    assert generate.command(args) == 0
    assert (seen["model"], seen["out"]) == ("models/stage2", "samples/osv_tts")
