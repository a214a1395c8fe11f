# Data, weights, the small VAE and latent encoding.


rule data:
    output:
        directory("data/clips"),
    params:
        seed=config["seed"],
        data=config["data"],
    log:
        "logs/data.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv data --params params.yaml --out data/clips 2>&1 | tee {log}"


rule weights:
    output:
        directory("models/base"),
    params:
        weights=config["weights"],
        frames=config["data"]["frames"],
    log:
        "logs/weights.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv weights --params params.yaml --out models/base 2>&1 | tee {log}"


rule vae:
    input:
        "models/base",
        "data/clips",
    output:
        directory("models/vae"),
        metrics="metrics/vae.json",
    params:
        vae=config["vae"],
    log:
        "logs/vae.log",
    threads: ALL_CORES
    conda:
        "../envs/osv.yaml"
    shell:
        "osv vae --params params.yaml --base models/base --clips data/clips --out models/vae"
        " --metrics metrics/vae.json 2>&1 | tee {log}"


rule encode:
    input:
        "data/clips",
        "models/base",
        "models/vae",
    output:
        directory("data/latents"),
    params:
        data=config["data"],
        encode=config["encode"],
        conditioning=config["conditioning"],
    log:
        "logs/encode.log",
    threads: ALL_CORES
    conda:
        "../envs/osv.yaml"
    shell:
        "osv encode --params params.yaml --clips data/clips --base models/base --vae models/vae"
        " --out data/latents 2>&1 | tee {log}"
