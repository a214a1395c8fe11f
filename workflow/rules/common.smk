# Shared names: the run and method lists of params.yaml, and model folder lookups.
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


def init_folder(wildcards):
    """Stage 2 starts from another run's export, or from the teacher."""
    return f"models/{config['train']['runs'][wildcards.run]['init']}"


def method_model(wildcards):
    return f"models/{config['eval']['methods'][wildcards.method]['model']}"
