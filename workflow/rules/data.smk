# Data, weights, the small VAE and latent encoding.


rule data:
    input:
        code=code_files("data"),
    output:
        directory("data/clips"),
        # this job's timing (osv/timing.py): beside the folder, whose hash later stages depend on
        timing="data/clips.timing.json",
    params:
        deps=stage_params("data"),
    log:
        "logs/data.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv data --params params.yaml --out data/clips 2>&1 | tee {log}"


rule weights:
    input:
        code=code_files("weights"),
    output:
        directory("models/base"),
        timing="models/base.timing.json",
    params:
        deps=stage_params("weights"),
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
        code=code_files("vae"),
    output:
        directory("models/vae"),
        metrics="metrics/vae.json",
        provenance="metrics/vae.provenance.json",
    params:
        deps=stage_params("vae"),
    log:
        "logs/vae.log",
    threads: stage_threads("vae")
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
        code=code_files("encode"),
    output:
        # The index, written last. The shards beside it are resumable work, not a declared output:
        # Snakemake would delete a failed job's outputs, and a rerun reuses every intact shard.
        "data/latents/index.json",
        timing="data/latents.timing.json",
    params:
        deps=stage_params("encode"),
    log:
        "logs/encode.log",
    threads: stage_threads("encode")
    conda:
        "../envs/osv.yaml"
    shell:
        "osv encode --params params.yaml --clips data/clips --base models/base --vae models/vae"
        " --out data/latents 2>&1 | tee {log}"
