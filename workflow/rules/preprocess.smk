# Validate and materialise a dataset, fingerprint it, plan preprocessing, split it.


rule prepare:
    output:
        f"{RESULTS}/{{dataset}}/data/cases.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/prepare.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=dataset_digest,
    conda:
        "../../environment.yml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.capsmed} --log {log} prepare -c {params.config} -d {wildcards.dataset}"


# A checkpoint: the shifted stages' default list depends on the plan (modality, dimensionality,
# intensities), so their jobs are known once it exists.
checkpoint preprocess:
    input:
        rules.prepare.output,
    output:
        fingerprint=f"{RESULTS}/{{dataset}}/preprocessed/fingerprint.json",
        plan=f"{RESULTS}/{{dataset}}/preprocessed/plan.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/preprocess.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=lambda w: dataset_digest(w) + "-" + ",".join(models_of(w)),
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/preprocess.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "{params.capsmed} --log {log} preprocess -c {params.config} -d {wildcards.dataset}"


# A checkpoint: with evaluate.per_case_jobs the evaluation jobs are known once the split exists.
checkpoint split:
    input:
        rules.prepare.output,
    output:
        f"{RESULTS}/{{dataset}}/splits.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/split.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=dataset_digest,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} split -c {params.config} -d {wildcards.dataset}"
