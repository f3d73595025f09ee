# Export of every trained model (config key export: [onnx, torchscript, bundle]; empty by default):
# capsmed export writes results/{dataset}/export/{model}[/fold{k}]/ and, last, {format}.json
# recording its check against the eager model on the dataset's first test case.


rule export:
    input:
        train=reported_train,
    output:
        f"{RESULTS}/{{dataset,{ONE_FOLD}}}/export/{{model}}/{{format}}.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/export_{{model}}_{{format}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
        fold=fold_arg,
    conda:
        "../../environment.yml"
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/export_{{model}}_{{format}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["resources"]["evaluate_mem_mb"],
        runtime=config["resources"]["evaluate_runtime"],
        cpus_per_task=config["threads"],
    shell:
        "{params.capsmed} --log {log} export -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} --format {wildcards.format} --threads {threads}{params.fold}"


# Datasets with several folds: the reported fold's model (export/{model}/fold{k}/).
use rule export as export_fold with:
    output:
        f"{RESULTS}/{{dataset,{FOLDED}}}/export/{{model}}/fold{{fold}}/{{format}}.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/export_{{model}}_fold{{fold}}_{{format}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/export_{{model}}_fold{{fold}}_{{format}}.tsv"
