"""`osv bench ...`: micro-benchmarks that print numbers (no timing is asserted in tests).

sample: sampler speed and NFE; disc: discriminator iteration cost; fvd: feature-extractor throughput;
vae: VAE training step; step: training step vs its floor; timing: the per-stage timing of a run;
train: s/iteration and peak memory of whole stage-1/stage-2 iterations (real SVD shapes with --shape svd);
plan: GPU-hours, wall hours and peak memory of every training run from those measurements, for a card.

Each benchmark lives in its own module exposing `add_args(parser)` and `run(args)`. A module
that is missing or fails to import only breaks its own subcommand (it fails when run, with
the import error), never `osv --help` or the other benchmarks.
"""

from __future__ import annotations

import argparse
import importlib

# (subcommand, module, help): add a benchmark by appending a row.
BENCHMARKS = [
    ("sample", "osv.bench.sample", "seconds per video and NFE: teacher vs student samplers"),
    ("disc", "osv.bench.disc", "discriminator iteration cost: latent upsampler vs VAE decoder"),
    ("fvd", "osv.bench.fvd", "FVD/FID feature-extractor throughput"),
    ("vae", "osv.bench.vae", "seconds per VAE training step (crop, whole frame) and where they go"),
    ("step", "osv.bench.step", "one training step (lgp, acd) vs the floor of its network evaluations"),
    ("timing", "osv.bench.timing", "per-stage timing of a finished run (wall, CPU, peak RSS, start-up) as Markdown"),
    ("train", "osv.bench.train", "s/iteration and peak memory of a stage-1 / stage-2 iteration (lgp, acd, ablation e)"),
    ("plan", "osv.plan", "GPU-hours, wall hours and peak memory per training run of train.runs for a named card"),
]


def _unavailable(module_name: str, error: Exception):
    def run(args) -> int:
        raise RuntimeError(f"osv bench {args.benchmark}: module {module_name} is not usable: {error!r}") from error

    return run


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="micro-benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module_name, help_text in BENCHMARKS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 -- deferred: only this subcommand fails, when run
            bench = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            bench.add_argument("rest", nargs=argparse.REMAINDER)
            bench.set_defaults(func=_unavailable(module_name, exc))
            continue
        bench = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).splitlines()[0])
        module.add_args(bench)
        bench.set_defaults(func=module.run)  # each benchmark module's handler
