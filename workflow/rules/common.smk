# Shared names: the run and method lists of params.yaml, and model folder lookups.
from osv.params import deep_merge

PARAMS = "params.yaml"
RUNS = list(config["train"]["runs"])
METHODS = list(config["eval"]["methods"])
# Threads of a stage that nothing runs beside (vae, encode, teacher): Snakemake lowers a rule's
# threads to --cores and sets OMP_NUM_THREADS to the result. (workflow.cores would fail in
# modes without --cores, such as --report.)
ALL_CORES = 1024


wildcard_constraints:
    run="|".join(RUNS),
    method="|".join(METHODS),


localrules:
    encode,
    teacher,
    train,
    generate,
    fvd,


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
