# Evaluate one model on one dataset stage (train / val / test) in each study's original geometry.


rule evaluate:
    input:
        rules.train.output,
    output:
        metrics=f"{RESULTS}/{{dataset}}/eval/{{model}}/{{stage}}/metrics.json",
        cases=f"{RESULTS}/{{dataset}}/eval/{{model}}/{{stage}}/cases.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_{{stage}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=eval_digest,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_{{stage}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["evaluate_mem_mb"],
        runtime=config["resources"]["evaluate_runtime"],
        cpus_per_task=config["threads"],
    shell:
        "{params.capsmed} --log {log} evaluate -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} -s {wildcards.stage} --threads {threads}"
