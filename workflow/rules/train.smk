# Train one model on one dataset (one fold of it, where folds are used). Checkpoints (last.pt,
# best.pt) are not declared outputs, so that Snakemake never deletes them: a killed run resumes from
# last.pt when the rule runs again.


rule train:
    input:
        plan=rules.preprocess.output.plan,
        splits=rules.split.output,
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/models/{{model}}/train.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/train_{{model}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=train_digest,
        fold=fold_arg,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
        cpus_per_task=config["threads"],
        gpu=config["gpus"],
    shell:
        "{params.capsmed} --log {log} train -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} --threads {threads}{params.fold}"


# Cross-validation: the same, per fold (datasets with split.folds > 1).
use rule train as train_fold with:
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/models/{{model}}/fold{{fold}}/train.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/train_{{model}}_fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{model}}_fold{{fold}}.tsv"


# Learning curves: the same model on a nested share of its training cases ({fraction}: "0.25", or
# "minority0.25" for a share of the minority class; capsmed.config.fraction_labels), in
# models/{model}[/fold{k}]/fraction-{fraction}. The 1.0 point is the model above.
use rule train as train_fraction with:
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/models/{{model}}/fraction-{{fraction}}/train.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/train_{{model}}_fraction-{{fraction}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=fraction_train_digest,
        fold=lambda w: f" --fraction {w.fraction}",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{model}}_fraction-{{fraction}}.tsv"


use rule train as train_fraction_fold with:
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/models/{{model}}/fold{{fold}}/fraction-{{fraction}}/train.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/train_{{model}}_fold{{fold}}_fraction-{{fraction}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        digest=fraction_train_digest,
        fold=lambda w: f" --fold {w.fold} --fraction {w.fraction}",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/train_{{model}}_fold{{fold}}_fraction-{{fraction}}.tsv"
