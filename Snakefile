# OSV: the whole pipeline as one Snakemake DAG (dvc.yaml holds the same stages).
#   snakemake --profile local    # everything on this machine
#   snakemake --profile slurm    # GPU stages submitted to SLURM through submitit
# Every rule calls one `osv` subcommand; all parameters come from params.yaml.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from osv.params import check_yaml_file, validate

min_version("9.0")


configfile: "params.yaml"


# The launcher (none/debug/local/slurm) never changes results, so it is not a
# parameter: profiles pass it as config `launcher`, the osv commands read OSV_LAUNCHER.
LAUNCHER = str(config.pop("launcher", os.environ.get("OSV_LAUNCHER", "none")))
os.environ.update(OSV_LAUNCHER=LAUNCHER)
# The commands read params.yaml, so the DAG must plan with exactly that file: --config and
# --configfile would record params the work never used. And the whole validation gate (schema
# and cross-key rules) runs here, before Snakemake plans anything or clears any output.
if config != check_yaml_file("params.yaml"):
    raise WorkflowError(
        "--config/--configfile changed the params, but every osv command reads params.yaml: "
        "edit params.yaml instead (the profile's `launcher` is the only config key allowed)"
    )
validate(config, "params.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"


onerror:
    # With keep-going, every row that could be made is made; this partial report marks each
    # other row "not produced", with the first failed job it needs and that job's error line.
    shell("osv report --params params.yaml --out reports > logs/report-partial.log 2>&1 || true")


rule all:
    default_target: True
    input:
        "reports/results.md",
