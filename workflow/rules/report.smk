# HTML reports: one per model and dataset stage, one per test study, a comparison and a QC page per
# dataset, and the index with results/summary.json. Reports read evaluation files only (no torch).


rule report_stage:
    input:
        metrics=reported_eval(),
        train=reported_train,
        # the validation stage calibrates the uncertainty flag (segmentation)
        calibration=lambda w: [reported_eval("val")(w)] if "val" in EVALUATED_STAGES else [],
    output:
        report(
            f"{RESULTS}/{{dataset}}/reports/{{model}}/{{stage}}.html",
            caption="../report/stage.rst",
            category="{dataset}",
            subcategory="{model}",
            labels={"dataset": "{dataset}", "model": "{model}", "stage": "{stage}"},
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/report_{{model}}_{{stage}}.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} report -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model} -s {wildcards.stage}"


rule report_studies:
    input:
        metrics=reported_eval("test"),
        train=reported_train,
        calibration=lambda w: [reported_eval("val")(w)] if "val" in EVALUATED_STAGES else [],
    output:
        directory(f"{RESULTS}/{{dataset}}/reports/{{model}}/studies"),
    log:
        f"{RESULTS}/{{dataset}}/logs/report_{{model}}_studies.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} report-studies -c {params.config} -d {wildcards.dataset} "
        "-m {wildcards.model}"


rule report_dataset:
    input:
        fingerprint=rules.preprocess.output.fingerprint,
        model_lists=MODEL_LISTS,
        metrics=lambda w: [
            eval_metrics(w.dataset, model, stage, path_fold(config, w.dataset))
            for model in models_of(w)
            for stage in EVALUATED_STAGES
        ],
        crossval=lambda w: crossval_files(w.dataset),
    output:
        comparison=report(
            f"{RESULTS}/{{dataset}}/reports/comparison.html",
            caption="../report/comparison.rst",
            category="{dataset}",
            labels={"dataset": "{dataset}", "page": "comparison"},
        ),
        qc=report(
            f"{RESULTS}/{{dataset}}/reports/qc.html",
            caption="../report/qc.rst",
            category="{dataset}",
            labels={"dataset": "{dataset}", "page": "preprocessing QC"},
        ),
    log:
        f"{RESULTS}/{{dataset}}/logs/report_dataset.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} report-dataset -c {params.config} -d {wildcards.dataset}"


# Corruption errors of the shifted stages and learning curves of every model of a dataset.
rule generalisation:
    input:
        shifts=lambda w: shift_metrics(w.dataset),
        fractions=lambda w: fraction_metrics(w.dataset),
        metrics=lambda w: [
            eval_metrics(w.dataset, model, "test", path_fold(config, w.dataset))
            for model in models_of(w)
        ],
        model_lists=MODEL_LISTS,
    output:
        f"{RESULTS}/{{dataset}}/generalisation.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/generalisation.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} generalisation -c {params.config} -d {wildcards.dataset}"


rule summarize:
    input:
        stage_reports=[
            f"{RESULTS}/{ds}/reports/{model}/{stage}.html"
            for ds in DATASETS
            for model in config["datasets"][ds]["models"]
            for stage in EVALUATED_STAGES
        ],
        studies=[
            f"{RESULTS}/{ds}/reports/{model}/studies"
            for ds in DATASETS
            for model in config["datasets"][ds]["models"]
            if "test" in EVALUATED_STAGES
        ],
        dataset_reports=expand(f"{RESULTS}/{{dataset}}/reports/comparison.html", dataset=DATASETS),
        generalisation=expand(f"{RESULTS}/{{dataset}}/generalisation.json", dataset=DATASETS),
        crossval=[path for ds in DATASETS for path in crossval_files(ds)],
        model_lists=MODEL_LISTS,
    output:
        summary=f"{RESULTS}/summary.json",
        index=report(
            f"{RESULTS}/index.html",
            caption="../report/index.rst",
            category="Overview",
            labels={"page": "index"},
        ),
    log:
        f"{RESULTS}/logs/summarize.log",
    params:
        capsmed=CAPSMED,
        config=CONFIG_FILE,
    conda:
        "../../environment.yml"
    shell:
        "{params.capsmed} --log {log} summarize -c {params.config}"
