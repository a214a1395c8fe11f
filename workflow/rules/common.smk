# Shared names: the run and method lists of params.yaml, what each stage instance depends on
# (osv/dependencies.py: the one definition dvc.yaml and the checkpoint fingerprint also use),
# and model folder lookups.
from osv.dependencies import code_files, params_keys, select
from osv.params import deep_merge, resources_for

PARAMS = "params.yaml"
RUNS = list(config["train"]["runs"])
METHODS = list(config["eval"]["methods"])
# Fan-out (docs/design.md "Fan-out"): one job per OpenVid part, per range of encode shards and per
# range of test clips of each method; a gather rule after each.
OPENVID = config["data"]["source"] == "openvid"
DATA_PARTS = [f"data/parts/openvid-{n}.json" for n in config["data"]["openvid"]["parts"]] if OPENVID else []
ENCODE_JOBS = resources_for(config, "encode")["jobs"]
GENERATE_JOBS = resources_for(config, "generate")["jobs"]


def stage_threads(stage):
    """In-process stages use resources.<stage>.cpus_per_task threads, in every front end
    (osv.launch.pin_threads); a rule that only submits a job and waits for it holds one."""
    if LAUNCHER != "none":
        return 1
    return resources_for(config, stage)["cpus_per_task"]


wildcard_constraints:
    run="|".join(RUNS),
    method="|".join(METHODS),
    part=r"\d+",


localrules:
    data_part,
    data,
    vae,
    encode_part,
    encode,
    generate_part,
    teacher,
    train,
    generate,
    fvd,
    claims,


def slurm_resources(stage):
    """Snakemake's mem_mb, runtime (minutes) and gpu of a stage's job, from params.yaml's
    resources.<stage> (a training run's override included). The rule hands them to osv as
    OSV_RESOURCES, so `--set-resources train:mem_mb=...` and `--default-resources` reach the
    SLURM job (osv.launch); dvc repro, which has no such flags, submits params.yaml's."""

    def res(wildcards):
        run = wildcards.get("run")
        p = deep_merge(config, config["train"]["runs"][run].get("override", {})) if run else config
        return resources_for(p, stage)

    return dict(mem_mb=lambda wc: int(res(wc)["mem_gb"] * 1024), runtime=lambda wc: res(wc)["timeout_min"],
                gpu=lambda wc: res(wc)["gpus"])


def stage_params(stage):
    """The params values a stage reads (Snakemake reruns the instances whose values changed)."""
    if stage in ("train", "generate", "fvd"):
        return lambda wc: select(config, params_keys(stage, wc.get("run", wc.get("method")), config))
    return select(config, params_keys(stage))


# A training step with the VAE-decoder discriminator front end (ablation e) costs about 8 of
# the latent front end's (docs/benchmarks.md).
VAE_FRONT_END_COST = 8


def chain_cost(name):
    """Estimated cost of a training run plus its costliest chain of runs that start from it."""
    run = config["train"]["runs"][name]
    p = deep_merge(config, run.get("override", {}))
    own = p[run["stage"]]["steps"] * (VAE_FRONT_END_COST if p["disc"]["front_end"] == "vae" else 1)
    children = [r for r, v in config["train"]["runs"].items() if v["init"] == name]
    return own + max(map(chain_cost, children), default=0)


def train_priority(wildcards):
    """Longest chain first: left to itself Snakemake started ablation e's two runs last, and
    they ended the embedded DAG on one core for 8 minutes while the other idled."""
    return chain_cost(wildcards.run)


def init_folder(wildcards):
    """Stage 2 starts from another run's export, or from the teacher."""
    return f"models/{config['train']['runs'][wildcards.run]['init']}"


def method_model(wildcards):
    return f"models/{config['eval']['methods'][wildcards.method]['model']}"
