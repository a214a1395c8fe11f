"""The `osv` command: one subcommand per pipeline stage (see README and docs/design.md).

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func`; heavy imports stay inside the command functions so `osv --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from osv.launch import LaunchError
from osv.numerics import NonFiniteError
from osv.params import ParamsError

# command name -> module holding its register(); only the module of the command run is imported.
COMMANDS = {
    "check": "osv.params",
    "data": "osv.data.prepare",
    "weights": "osv.weights",
    "vae": "osv.vae",
    "encode": "osv.encode",
    "teacher": "osv.train.teacher",
    "train": "osv.train.distill",
    "generate": "osv.eval.generate",
    "fvd": "osv.eval.fvd",
    "report": "osv.eval.report",
    "bench": "osv.bench",
    "experiment": "osv.experiments.toy",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args) or 0
    except ParamsError as exc:
        print(f"osv {args.command}: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(str(exc), file=sys.stderr)
        return NonFiniteError.exit_code
    except LaunchError as exc:
        print(f"osv {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
