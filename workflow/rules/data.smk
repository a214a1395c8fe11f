# Data, weights, the small VAE and latent encoding.


rule data_part:
    # OpenVid only: one job per part of data.openvid.parts (download ~50 GB, check, extract).
    input:
        code=code_files("data"),
    output:
        "data/parts/openvid-{part}.json",
    params:
        deps=stage_params("data"),
    threads: stage_threads("data")
    benchmark:
        "benchmarks/data/part-{part}.tsv"
    resources:
        **slurm_resources("data"),
    log:
        "logs/data/part-{part}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv data --params params.yaml --out data/clips --part {wildcards.part} > {log} 2>&1"


rule data:
    # The split over every part (OpenVid), or the embedded clips: one job either way.
    input:
        DATA_PARTS,
        code=code_files("data"),
    output:
        directory("data/clips"),
        # this job's timing (osv/timing.py): beside the folder, whose hash later stages depend on
        timing="data/clips.timing.json",
    params:
        deps=stage_params("data"),
    threads: stage_threads("data")
    benchmark:
        "benchmarks/data.tsv"
    resources:
        **slurm_resources("data"),
    log:
        "logs/data.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv data --params params.yaml --out data/clips --gather 2>&1 | tee {log}"


rule weights:
    input:
        code=code_files("weights"),
    output:
        directory("models/base"),
        timing="models/base.timing.json",
    params:
        deps=stage_params("weights"),
    benchmark:
        "benchmarks/weights.tsv"
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
    benchmark:
        "benchmarks/vae.tsv"
    resources:
        **slurm_resources("vae"),
    log:
        "logs/vae.log",
    threads: stage_threads("vae")
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv vae --params params.yaml --base models/base --clips data/clips --out models/vae"
        " --metrics metrics/vae.json 2>&1 | tee {log}"


rule encode_part:
    # Job {part} of resources.encode.jobs: a contiguous range of shards, each clip decoded once for
    # both resolutions. The shards are resumable work, not declared outputs: Snakemake would delete a
    # failed job's outputs, and a rerun reuses every intact shard. The receipt lists what it wrote.
    input:
        "data/clips",
        "models/base",
        "models/vae",
        code=code_files("encode"),
    output:
        "data/latents.parts/part-{part}-of-%03d.json" % ENCODE_JOBS,
    params:
        deps=stage_params("encode"),
    threads: stage_threads("encode")
    benchmark:
        "benchmarks/encode/part-{part}.tsv"
    resources:
        **slurm_resources("encode"),
    log:
        "logs/encode/part-{part}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv encode --params params.yaml --clips data/clips --base models/base --vae models/vae"
        " --out data/latents --part {wildcards.part} > {log} 2>&1"


rule encode:
    # The index from the receipts, written last (its presence means the folder is complete).
    input:
        expand("data/latents.parts/part-{part:03d}-of-{jobs:03d}.json", part=range(ENCODE_JOBS), jobs=ENCODE_JOBS),
        "data/clips",
        code=code_files("encode"),
    output:
        "data/latents/index.json",
        timing="data/latents.timing.json",
    params:
        deps=stage_params("encode"),
    benchmark:
        "benchmarks/encode.tsv"
    log:
        "logs/encode.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv encode --params params.yaml --clips data/clips --base models/base --vae models/vae"
        " --out data/latents --gather 2>&1 | tee {log}"
