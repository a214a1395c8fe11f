# Generation for every method of eval.methods, FVD/FID, and the report.


rule generate_part:
    # Job {part} of resources.generate.jobs for one method: a range of test clips, written batch by
    # batch to samples.parts/{method} (resumable work, not declared: a failed job keeps its batches).
    input:
        "models/teacher",
        "data/latents/index.json",
        model=method_model,
        code=code_files("generate"),
    output:
        "samples.parts/{method}/part-{part}-of-%03d.json" % GENERATE_JOBS,
    params:
        deps=stage_params("generate"),
        model=method_model,
    threads: stage_threads("generate")
    benchmark:
        "benchmarks/generate/{method}/part-{part}.tsv"
    resources:
        **slurm_resources("generate"),
    log:
        "logs/generate/{method}/part-{part}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv generate --params params.yaml --method {wildcards.method} --teacher models/teacher"
        " --model {params.model} --latents data/latents --out samples/{wildcards.method}"
        " --part {wildcards.part} > {log} 2>&1"


rule generate:
    # samples/{method} from its parts: clips (hard links), meta.json, previews.
    input:
        expand("samples.parts/{{method}}/part-{part:03d}-of-{jobs:03d}.json", part=range(GENERATE_JOBS),
               jobs=GENERATE_JOBS),
        model=method_model,
        code=code_files("generate"),
    output:
        report(
            directory("samples/{method}"),
            patterns=["{name}.gif", "{name}.png"],
            caption="../report/previews.rst",
            category="Previews",
            subcategory="{method}",
        ),
    params:
        deps=stage_params("generate"),
        model=method_model,
    benchmark:
        "benchmarks/generate/{method}.tsv"
    log:
        "logs/generate/{method}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv generate --params params.yaml --method {wildcards.method} --teacher models/teacher"
        " --model {params.model} --latents data/latents --out samples/{wildcards.method} --gather 2>&1 | tee {log}"


rule fvd:
    input:
        "samples/{method}",
        "data/clips",
        "models/base",
        code=code_files("fvd"),
    output:
        "metrics/eval/{method}.json",
        "metrics/eval/{method}.provenance.json",
    params:
        deps=stage_params("fvd"),
    threads: stage_threads("fvd")
    benchmark:
        "benchmarks/fvd/{method}.tsv"
    resources:
        **slurm_resources("fvd"),
    log:
        "logs/fvd/{method}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv fvd --params params.yaml --method {wildcards.method} --samples samples/{wildcards.method}"
        " --clips data/clips --base models/base --out metrics/eval/{wildcards.method}.json 2>&1 | tee {log}"


rule claims:
    # Tables 1-2 and Fig. 5 in miniature (exact teacher, several seeds): no input but the code.
    input:
        code=code_files("claims"),
    output:
        "metrics/claims.json",
        "metrics/claims.provenance.json",
        "plots/claims.csv",
        report("reports/claims_curves.png", caption="../report/claims_curves.rst", category="Results"),
    params:
        deps=stage_params("claims"),
    threads: stage_threads("claims")
    benchmark:
        "benchmarks/claims.tsv"
    resources:
        **slurm_resources("claims"),
    log:
        "logs/claims.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "OSV_RESOURCES=mem_mb={resources.mem_mb},runtime={resources.runtime},gpu={resources.gpu} osv experiment claims --params params.yaml --out metrics/claims.json --plot reports/claims_curves.png"
        " --csv plots/claims.csv 2>&1 | tee {log}"


rule report:
    input:
        expand("metrics/eval/{method}.json", method=METHODS),
        expand("samples/{method}", method=METHODS),  # teacher-ODE match, guidance absorption
        expand("plots/train/{run}.csv", run=RUNS),
        "plots/teacher.csv",
        "data/clips",  # the real test clips shown beside the samples (reports/previews)
        "metrics/vae.json",
        "metrics/teacher.json",
        "metrics/claims.json",
        code=code_files("report"),
    output:
        report("reports/results.md", caption="../report/results.rst", category="Results"),
        report("reports/fvd_vs_nfe.png", caption="../report/fvd_vs_nfe.rst", category="Results"),
        report("reports/train_curves.png", caption="../report/train_curves.rst", category="Training"),
        directory("reports/previews"),
        "reports/metrics.json",
        "reports/metrics.provenance.json",
        "plots/fvd_vs_nfe.csv",
    params:
        deps=stage_params("report"),
    benchmark:
        "benchmarks/report.tsv"
    log:
        "logs/report.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv report --params params.yaml --metrics metrics --samples samples --plots plots"
        " --clips data/clips --out reports 2>&1 | tee {log}"
