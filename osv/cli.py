"""The `osv` command: one subcommand per pipeline stage (see README and docs/design.md).

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func`. Only the module of the command run is imported; `osv --help` imports none (several
import torch at module level) and lists the commands from HELP.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from osv import logs, timing
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
    "experiment": "osv.experiments.claims",
    "push": "osv.push",
}

# command name -> its help line, as its module's register() words it (tests/test_timing.py checks):
# what `osv --help` lists without importing a command module.
HELP = {
    "check": "validate params.yaml (schema, cross-key rules, every run's override)",
    "data": "cut train/test clips (mp4) and write manifest.csv",
    "weights": "Base models: small models from configs, or pinned hub weights.",
    "vae": "train (embedded) or copy (paper) the video VAE; test PSNR",
    "encode": "encode clips to latents, conditioning latents and CLIP embeddings",
    "teacher": "Train (embedded) or link (paper) the SVD teacher; held-out metrics.",
    "train": "One training run (stage 1 LGP or stage 2 ACD) of train.runs.",
    "generate": "sample the test set for one method of eval.methods",
    "fvd": "FVD / FID of one method's samples with the full protocol",
    "report": "results.md, FVD-vs-NFE and training-curve plots",
    "bench": "micro-benchmarks",
    "experiment": "The paper's claims on a miniature with an exact teacher.",
    "push": "upload models/RUN (pipeline, card) to a Hugging Face hub repo",
}


class DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_defaults(child)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` (its module imported), or of the command list alone (nothing imported)."""
    from osv import __version__

    parser = argparse.ArgumentParser(prog="osv", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"osv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command]).register(sub)
        _with_defaults(parser)
    else:  # --help, no command or a typo: argparse prints the list (or the error) and exits
        for name, help_text in HELP.items():
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # before any command module imports tqdm; JSON, --help and --version stay plain
    plain = {"--json", "-h", "--help"} & set(argv)
    logs.setup(stdout=bool(argv) and argv[0] in COMMANDS and not plain)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    timing.mark_work_start()  # start-up ends here: interpreter, imports, argument parsing
    try:
        rc = args.func(args)
        rc = rc if isinstance(rc, int) else 0  # a benchmark may return its result
        # data, weights (and encode, generate in-process) keep a timing file; no-op for the others
        timing.finish(args.command, getattr(args, "out", None), getattr(args, "method", None))
        return rc
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
