# OSV: the whole pipeline as one Snakemake DAG (dvc.yaml holds the same stages).
#   snakemake --profile local    # everything on this machine
#   snakemake --profile slurm    # GPU stages submitted to SLURM through submitit
# Every rule calls one `osv` subcommand; all parameters come from params.yaml.
import os

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


# The launcher (none/debug/local/slurm) never changes results, so it is not a
# parameter: profiles pass it as config `launcher`, the osv commands read OSV_LAUNCHER.
os.environ.update(OSV_LAUNCHER=str(config.pop("launcher", os.environ.get("OSV_LAUNCHER", "none"))))
validate(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"


rule all:
    default_target: True
    input:
        "reports/results.md",
