# The embedded teacher, then every training run of train.runs (OSV and its ablations).


rule teacher:
    input:
        "models/base",
        "models/vae",
        "data/latents",
    output:
        directory("models/teacher"),
        metrics="metrics/teacher.json",
        plots="plots/teacher.csv",
    params:
        teacher=config["teacher"],
        sde=config["sde"],
    log:
        "logs/teacher.log",
    threads: ALL_CORES
    conda:
        "../envs/osv.yaml"
    shell:
        "osv teacher --params params.yaml --base models/base --vae models/vae --latents data/latents"
        " --out models/teacher --metrics metrics/teacher.json --plots plots/teacher.csv 2>&1 | tee {log}"


rule train:
    input:
        "models/teacher",
        "data/latents",
        init=init_folder,
    output:
        ckpt=directory("runs/{run}"),
        model=directory("models/{run}"),
        metrics="metrics/train/{run}.json",
        plots="plots/train/{run}.csv",
    params:
        run=lambda wc: config["train"]["runs"][wc.run],
        stages={k: config[k] for k in ("sde", "conditioning", "student", "disc", "lgp", "acd")},
        train={k: v for k, v in config["train"].items() if k != "runs"},
        init=init_folder,
    priority: train_priority
    log:
        "logs/train/{run}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv train --params params.yaml --run {wildcards.run} --teacher models/teacher --init {params.init}"
        " --latents data/latents --ckpt runs/{wildcards.run} --out models/{wildcards.run}"
        " --metrics metrics/train/{wildcards.run}.json --plots plots/train/{wildcards.run}.csv 2>&1 | tee {log}"
