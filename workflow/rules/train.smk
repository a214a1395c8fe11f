# The embedded teacher, then every training run of train.runs (OSV and its ablations).


rule teacher:
    input:
        "models/base",
        "models/vae",
        "data/latents/index.json",
        code=code_files("teacher"),
    output:
        directory("models/teacher"),
        metrics="metrics/teacher.json",
        provenance="metrics/teacher.provenance.json",
        plots="plots/teacher.csv",
    params:
        deps=stage_params("teacher"),
    benchmark:
        "benchmarks/teacher.tsv"
    resources:
        **slurm_resources("teacher"),
    log:
        "logs/teacher.log",
    threads: stage_threads("teacher")
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv teacher --params params.yaml --base models/base --vae models/vae --latents data/latents"
        " --out models/teacher --metrics metrics/teacher.json --plots plots/teacher.csv 2>&1 | tee {log}"


rule train:
    input:
        "models/teacher",
        "data/latents/index.json",
        init=init_folder,
        code=code_files("train"),
    output:
        # runs/{run} (checkpoints) is resumable state, not a declared output: Snakemake would delete
        # it when the job fails and before rerunning it. DVC versions it (persist: true).
        model=directory("models/{run}"),
        metrics="metrics/train/{run}.json",
        provenance="metrics/train/{run}.provenance.json",
        plots="plots/train/{run}.csv",
    params:
        deps=stage_params("train"),
        init=init_folder,
    threads: stage_threads("train")
    priority: train_priority
    benchmark:
        "benchmarks/train/{run}.tsv"
    resources:
        **slurm_resources("train"),
    log:
        "logs/train/{run}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv train --params params.yaml --run {wildcards.run} --teacher models/teacher --init {params.init}"
        " --latents data/latents --ckpt runs/{wildcards.run} --out models/{wildcards.run}"
        " --metrics metrics/train/{wildcards.run}.json --plots plots/train/{wildcards.run}.csv 2>&1 | tee {log}"
