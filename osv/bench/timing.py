"""`osv bench timing --root <workspace>`: the timing table of a finished run, as Markdown.

Reads the timing record every job of the DAG wrote where its work ran (osv/timing.py): wall
time, CPU time, peak RSS and start-up per stage kind, and the CPU line; jobs without a record are
listed as missing. The same table as the "Timing" section of reports/results.md, for
docs/benchmarks.md. Runs nothing, imports no torch.
"""

from __future__ import annotations

from pathlib import Path


def add_args(parser) -> None:
    parser.add_argument("--root", default=".", help="the workspace of the run (default: here)")
    parser.add_argument("--params", default=None, help="its params file (default: ROOT/params.yaml)")


def run(args) -> int:
    from osv.params import load_params
    from osv.timing import run_table

    root = Path(args.root)
    params = load_params(args.params or root / "params.yaml")
    print(run_table(params, root), end="")
    return 0
