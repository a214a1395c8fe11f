"""The `osv` command: one subcommand per pipeline stage (see README and docs/design.md).

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func`; heavy imports stay inside the command functions so `osv --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from osv.launch import LaunchError
from osv.params import ParamsError

COMMAND_MODULES = [
    "osv.data.prepare",
    "osv.weights",
    "osv.vae",
    "osv.encode",
    "osv.train.teacher",
    "osv.train.distill",
    "osv.eval.generate",
    "osv.eval.fvd",
    "osv.eval.report",
    "osv.bench",
    "osv.experiments.toy",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ParamsError as exc:
        print(f"osv {args.command}: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"osv {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
