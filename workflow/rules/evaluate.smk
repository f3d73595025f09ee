# Evaluate one model on one dataset stage (train / val / test) in each study's original geometry.
# By default one job predicts every case of the stage; with evaluate.per_case_jobs each case is its
# own job (evaluate_case) and the stage job only gathers them (same cases.csv and metrics.json).


rule evaluate:
    input:
        evaluate_inputs,
    output:
        metrics=f"{RESULTS}/{{dataset,{ONE_FOLD}}}/eval/{{model}}/{{stage}}/metrics.json",
        cases=f"{RESULTS}/{{dataset}}/eval/{{model}}/{{stage}}/cases.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_{{stage}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=eval_digest,
        fold=fold_arg,
        from_cases=from_cases_arg,
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
        "-m {wildcards.model} -s {wildcards.stage} --threads {threads}{params.fold}"
        "{params.from_cases}"


# Cross-validation: each fold's model on that fold's cases. Every fold is evaluated on its val
# cases (for rule crossval); the reported fold (split.fold) on every stage.
use rule evaluate as evaluate_fold with:
    output:
        metrics=f"{RESULTS}/{{dataset,{FOLDED}}}/eval/{{model}}/fold{{fold}}/{{stage}}/metrics.json",
        cases=f"{RESULTS}/{{dataset}}/eval/{{model}}/fold{{fold}}/{{stage}}/cases.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_fold{{fold}}_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_fold{{fold}}_{{stage}}.tsv"


# One case (evaluate.per_case_jobs): prediction files and eval/.../{stage}/cases/{case}.json.
rule evaluate_case:
    input:
        f"{RESULTS}/{{dataset}}/models/{{model}}/train.json",
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/eval/{{model}}/{{stage}}/cases/{{case}}.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_{{stage}}/{{case}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=eval_digest,
        fold=fold_arg,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_{{stage}}/{{case}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["evaluate_mem_mb"],
        runtime=config["resources"]["evaluate_runtime"],
        cpus_per_task=config["threads"],
    shell:
        "{params.capsmed} --log {log} evaluate -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} -s {wildcards.stage} --case {wildcards.case} "
        "--threads {threads}{params.fold}"


use rule evaluate_case as evaluate_case_fold with:
    input:
        f"{RESULTS}/{{dataset}}/models/{{model}}/fold{{fold}}/train.json",
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/eval/{{model}}/fold{{fold}}/{{stage}}/cases/{{case}}.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_fold{{fold}}_{{stage}}/{{case}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_fold{{fold}}_{{stage}}/{{case}}.tsv"


# One model's validation metrics over all folds: mean and sd (results/{dataset}/cv/{model}.json).
rule crossval:
    input:
        lambda w: [eval_metrics(w.dataset, w.model, "val", k) for k in trained_folds(config, w.dataset)],
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/cv/{{model}}.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/crossval_{{model}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} crossval -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model}"


# Shifted test stages: the test cases under one shift at one severity, through the test stage's
# inference and metrics (capsmed evaluate-shift); shift "none" at severity 0 is the clean reference.
rule evaluate_shift:
    input:
        reported_train,
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/eval/{{model}}/shift/{{shift}}/s{{severity}}/metrics.json",
        f"{RESULTS}/{{dataset}}/eval/{{model}}/shift/{{shift}}/s{{severity}}/cases.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_shift_{{model}}_{{shift}}_s{{severity}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=shift_digest,
        fold=fold_arg,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_shift_{{model}}_{{shift}}_s{{severity}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["evaluate_mem_mb"],
        runtime=config["resources"]["evaluate_runtime"],
        cpus_per_task=config["threads"],
    shell:
        "{params.capsmed} --log {log} evaluate-shift -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} --shift {wildcards.shift} --severity {wildcards.severity} "
        "--threads {threads}{params.fold}"


use rule evaluate_shift as evaluate_shift_fold with:
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/eval/{{model}}/fold{{fold}}/shift/{{shift}}/s{{severity}}/metrics.json",
        f"{RESULTS}/{{dataset}}/eval/{{model}}/fold{{fold}}/shift/{{shift}}/s{{severity}}/cases.csv",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_shift_{{model}}_fold{{fold}}_{{shift}}_s{{severity}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_shift_{{model}}_fold{{fold}}_{{shift}}_s{{severity}}.tsv"


# Learning curves: a fraction's model on the ordinary test cases.
rule evaluate_fraction:
    input:
        lambda w: str(LAYOUT.fraction_model_dir(w.dataset, w.model, w.fraction, _fold_of(w))
                      / "train.json"),
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/eval/{{model}}/fraction-{{fraction}}/test/metrics.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_fraction-{{fraction}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=fraction_eval_digest,
        fold=fold_arg,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_fraction-{{fraction}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["evaluate_mem_mb"],
        runtime=config["resources"]["evaluate_runtime"],
        cpus_per_task=config["threads"],
    shell:
        "{params.capsmed} --log {log} evaluate -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} -s test --fraction {wildcards.fraction} --threads {threads}"
        "{params.fold}"


use rule evaluate_fraction as evaluate_fraction_fold with:
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/eval/{{model}}/fold{{fold}}/fraction-{{fraction}}/test/metrics.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/evaluate_{{model}}_fold{{fold}}_fraction-{{fraction}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/evaluate_{{model}}_fold{{fold}}_fraction-{{fraction}}.tsv"
