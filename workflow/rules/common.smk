# Config validation (the one schema, shared with capsmed.config), input functions, wildcard
# constraints and the resolved config file that every `capsmed` call reads.
import json
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from capsmed.config import (
    config_hash,
    dataset_hash,
    evaluation_hash,
    fraction_labels,
    model_config_hash,
    path_fold,
    resolve_fold,
    trained_folds,
    validate_config,
)
from capsmed.data.shifts import shift_settings
from capsmed.data.splits import stage_case_ids
from capsmed.evaluate.run import case_file
from capsmed.fileio import read_json, write_text_if_changed
from capsmed.models.registry import config_problems
from capsmed.paths import STAGES, Layout


validate(config, "../schemas/config.schema.yaml")
# What the schema cannot check (model names and options, source paths, sizes against
# spatial_dims), through the same code as `capsmed validate -c CONFIG`, before any job is planned.
_problems = config_problems(validate_config(config, "config"), "config")
if _problems:
    raise WorkflowError("\n".join(_problems))

RESULTS = config["results"].rstrip("/")
DATASETS = list(config["datasets"])
# The stages this config evaluates and reports, of capsmed.paths.STAGES.
EVALUATED_STAGES = list(config["evaluate"]["stages"])
# `python -m capsmed` with the interpreter running Snakemake (the project's .venv), so rules work
# without an activated environment, locally and on SLURM nodes sharing the filesystem.
# Set CAPSMED_COMMAND=capsmed to use the command on PATH instead (e.g. with --sdm conda).
CAPSMED = os.environ.get("CAPSMED_COMMAND", f"{sys.executable} -m capsmed")


def _write_resolved_config() -> str:
    """The validated config (defaults filled) in one file that every capsmed call reads.

    Written only when its content changes, atomically, so re-parsing on cluster nodes is harmless.
    """
    path = Path(RESULTS) / ".capsmed" / "config.yaml"
    write_text_if_changed(path, yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True))
    return str(path)


CONFIG_FILE = _write_resolved_config()


def _write_model_lists() -> str:
    """The datasets, their models and stages, in one file that the summary pages take as input.

    Snakemake keeps an up-to-date summary.json when a model is added to the config, unless its
    records of the earlier run (.snakemake/metadata) are there to show the new input; with a
    copied results folder or a deleted .snakemake it would say "Nothing to be done". This file
    changes (and gets newer) exactly when the lists do, so the summary and comparison pages, and
    through them the new model's jobs, run again either way.
    """
    path = Path(RESULTS) / ".capsmed" / "models.json"
    lists = {ds: {"models": list(config["datasets"][ds]["models"]), "stages": EVALUATED_STAGES}
             for ds in DATASETS}
    write_text_if_changed(path, json.dumps(lists, indent=1, sort_keys=True) + "\n")
    return str(path)


MODEL_LISTS = _write_model_lists()


def dataset_digest(wildcards) -> str:
    """A rule's params change (and it reruns) when the config behind the dataset's files does."""
    return dataset_hash(config, wildcards.dataset)


def train_digest(wildcards) -> str:
    """The trained model's config hash, the same that its checkpoints record."""
    return model_config_hash(config, wildcards.dataset, wildcards.model)


def eval_digest(wildcards) -> str:
    return evaluation_hash(config, wildcards.dataset, wildcards.model)


def models_of(wildcards) -> list:
    return config["datasets"][wildcards.dataset]["models"]


# Cross-validation. A dataset with split.folds > 1 keeps each fold's model and evaluations in
# models/{model}/fold{fold} and eval/{model}/fold{fold}/{stage} (rules train_fold and
# evaluate_fold); every fold is trained and validated, and the fold named by split.fold is
# evaluated on every stage and reported. A dataset with one fold uses models/{model} and
# eval/{model}/{stage} (rules train and evaluate). The rules and paths are capsmed's
# (capsmed.config, capsmed.paths); only the Snakemake wiring is here.
LAYOUT = Layout(RESULTS)


def _alternatives(names) -> str:
    """A regex matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


# path_fold: the reported fold in paths, None where the dataset has one fold.
ONE_FOLD = _alternatives(ds for ds in DATASETS if path_fold(config, ds) is None)
FOLDED = _alternatives(ds for ds in DATASETS if path_fold(config, ds) is not None)


def train_json(ds: str, model: str, fold=None) -> str:
    return str(LAYOUT.model_dir(ds, model, fold) / "train.json")


def eval_metrics(ds: str, model: str, stage: str, fold=None) -> str:
    return str(LAYOUT.eval_dir(ds, model, stage, fold) / "metrics.json")


def reported_train(wildcards) -> str:
    return train_json(wildcards.dataset, wildcards.model, path_fold(config, wildcards.dataset))


def reported_eval(stage=None):
    """Input function: metrics.json of the reported fold ({stage} from the wildcards if None)."""
    def inner(wildcards) -> str:
        ds = wildcards.dataset
        return eval_metrics(ds, wildcards.model, stage or wildcards.stage, path_fold(config, ds))
    return inner


def crossval_files(ds: str) -> list:
    """cv/{model}.json of each model where every fold is trained (capsmed.config.trained_folds)."""
    if len(trained_folds(config, ds)) > 1:
        return [str(LAYOUT.crossval(ds, model)) for model in config["datasets"][ds]["models"]]
    return []


PER_CASE = bool(config["evaluate"].get("per_case_jobs", False))


def _fold_of(wildcards):
    return int(wildcards.fold) if "fold" in wildcards.keys() else None


def evaluate_inputs(wildcards) -> list:
    """The model's train.json and, with evaluate.per_case_jobs, one evaluated file per case.

    The case list comes from splits.json, so with per-case jobs the DAG is completed after the
    split checkpoint has run.
    """
    ds, fold = wildcards.dataset, _fold_of(wildcards)
    inputs = [train_json(ds, wildcards.model, fold)]
    if not PER_CASE:
        return inputs
    splits = read_json(checkpoints.split.get(dataset=ds).output[0], "split")
    index = resolve_fold(config, ds, fold)[0]
    eval_dir = LAYOUT.eval_dir(ds, wildcards.model, wildcards.stage, fold)
    return inputs + [str(case_file(eval_dir, i))
                     for i in stage_case_ids(splits, wildcards.stage, index)]


def from_cases_arg(wildcards) -> str:
    return " --from-cases" if PER_CASE else ""


def fold_arg(wildcards) -> str:
    """``--fold K`` for the *_fold rules, nothing for the one-fold rules."""
    return f" --fold {wildcards.fold}" if "fold" in wildcards.keys() else ""


# Shifted test stages (capsmed.evaluate.shift): one job per model, shift and severity, plus the
# clean reference (shift "none", severity 0); the list of shifts follows the dataset's plan.
def shift_list(ds: str) -> dict:
    """The dataset's shift settings (capsmed.data.shifts.shift_settings), once its plan exists."""
    plan = read_json(checkpoints.preprocess.get(dataset=ds).output.plan, "plan")
    return shift_settings(config, ds, plan)


def shift_metrics(ds: str) -> list:
    """metrics.json of every shifted stage of every model of a dataset (empty when disabled)."""
    shifts = shift_list(ds)
    if not shifts["enabled"]:
        return []
    fold = path_fold(config, ds)
    stages = [("none", 0)] + [(s, k) for s in shifts["shifts"] for k in shifts["severities"]]
    return [str(LAYOUT.shift_dir(ds, model, shift, severity, fold) / "metrics.json")
            for model in config["datasets"][ds]["models"] for shift, severity in stages]


def shift_digest(wildcards) -> str:
    """The shifted stages rerun when the model, inference, evaluation or shift settings change."""
    ds = wildcards.dataset
    shift = config_hash({"shift": config.get("shift"),
                         "dataset": config["datasets"][ds].get("shift")})
    return f"{evaluation_hash(config, ds, wildcards.model)}-{shift}"


# Learning curves (train.fractions, train.minority_fraction): one model per share, as a wildcard.
def fraction_train_digest(wildcards) -> str:
    return model_config_hash(config, wildcards.dataset, wildcards.model, wildcards.fraction)


def fraction_eval_digest(wildcards) -> str:
    return evaluation_hash(config, wildcards.dataset, wildcards.model, wildcards.fraction)


def fraction_metrics(ds: str) -> list:
    """The test metrics.json of every learning-curve model of a dataset."""
    fold = path_fold(config, ds)
    return [str(LAYOUT.fraction_eval_dir(ds, model, label, fold) / "metrics.json")
            for model in config["datasets"][ds]["models"]
            for label in fraction_labels(config, ds, model)]


def all_targets() -> list:
    out = [f"{RESULTS}/summary.json", f"{RESULTS}/index.html"]
    for ds in DATASETS:
        for model in config["datasets"][ds]["models"]:
            out += [f"{RESULTS}/{ds}/reports/{model}/{stage}.html" for stage in EVALUATED_STAGES]
    return out


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="[A-Za-z][A-Za-z0-9_]*",
    stage="|".join(STAGES),
    fold="[0-9]+",
    case="[A-Za-z0-9._-]+",
    shift="[a-z][a-z0-9_]*",
    severity="[0-5]",
    fraction="(minority)?[0-9.]+",
