# Generation for every method of eval.methods, FVD/FID, and the report.


rule generate:
    input:
        "models/teacher",
        "data/latents",
        model=method_model,
    output:
        directory("samples/{method}"),
    params:
        method=lambda wc: config["eval"]["methods"][wc.method],
        eval={k: v for k, v in config["eval"].items() if k != "methods"},
        model=method_model,
    log:
        "logs/generate/{method}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv generate --params params.yaml --method {wildcards.method} --teacher models/teacher"
        " --model {params.model} --latents data/latents --out samples/{wildcards.method} 2>&1 | tee {log}"


rule fvd:
    input:
        "samples/{method}",
        "data/clips",
        "models/base",
    output:
        "metrics/eval/{method}.json",
    params:
        eval={k: v for k, v in config["eval"].items() if k != "methods"},
    log:
        "logs/fvd/{method}.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv fvd --params params.yaml --method {wildcards.method} --samples samples/{wildcards.method}"
        " --clips data/clips --base models/base --out metrics/eval/{wildcards.method}.json 2>&1 | tee {log}"


rule report:
    input:
        expand("metrics/eval/{method}.json", method=METHODS),
        expand("plots/train/{run}.csv", run=RUNS),
        "metrics/vae.json",
        "metrics/teacher.json",
    output:
        "reports/results.md",
        "plots/fvd_vs_nfe.csv",
    params:
        methods=config["eval"]["methods"],
    log:
        "logs/report.log",
    conda:
        "../envs/osv.yaml"
    shell:
        "osv report --params params.yaml --metrics metrics --samples samples --plots plots"
        " --out reports 2>&1 | tee {log}"
