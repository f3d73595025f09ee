"""``results/summary.json``: every dataset, model, stage and study report (DESIGN section 2).

Reads only files written by the earlier stages; imports no torch.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from capsmed.config import path_fold
from capsmed.fileio import read_json
from capsmed.paths import Layout, safe_name

logger = logging.getLogger(__name__)


def build_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """Collect the results of every dataset and model named in the config.

    Args:
        cfg: Validated configuration.

    Returns:
        ``{"datasets": {name: {"task", "models": {model: {"family", "params", "stages": {stage:
        {"metrics", "ci95", "report"}}, "studies": {case_id: path}}}}}}`` with paths relative to
        the results folder; stages or models whose files are missing are left out (with a warning). With
        several folds the stages are those of the reported fold (``split.fold``, recorded as
        ``fold``) and ``cross_validation`` holds ``cv/{model}.json`` (``folds``, ``mean``, ``sd``,
        ``path``).
    """
    layout = Layout(Path(cfg["results"]))
    out: dict[str, Any] = {"datasets": {}}
    for ds, ds_cfg in cfg["datasets"].items():
        entry: dict[str, Any] = {"task": ds_cfg["task"], "models": {}}
        fold = path_fold(cfg, ds)
        for model in ds_cfg["models"]:
            train = read_json(layout.model_dir(ds, model, fold) / "train.json", required=False)
            if train is None:
                logger.warning("%s/%s: no train.json, left out of the summary", ds, model)
                continue
            m: dict[str, Any] = {
                "family": train.get("family"), "params": train["params"],
                "flops": train.get("flops"),
                "train_seconds": train.get("train_seconds"),
                "peak_memory_mb": train.get("peak_memory_mb"),
                "stages": {}, "studies": {},
            }
            for stage in cfg["evaluate"]["stages"]:
                doc = read_json(layout.eval_dir(ds, model, stage, fold) / "metrics.json", required=False)
                if doc is None:
                    continue
                report = layout.stage_report(ds, model, stage)
                m["stages"][stage] = {
                    "metrics": doc["metrics"], "ci95": doc.get("ci95", {}),
                    "n_cases": doc.get("n_cases"),
                    "inference_seconds_per_case": doc.get("cost", {}).get(
                        "inference_seconds_per_case"),
                    "report": str(report.relative_to(layout.results)),
                }
            cases_csv = layout.eval_dir(ds, model, "test", fold) / "cases.csv"
            if cases_csv.is_file():
                with open(cases_csv, encoding="utf-8", newline="") as fh:
                    for row in csv.DictReader(fh):
                        study = layout.studies_dir(ds, model) / f"{safe_name(row['case_id'])}.html"
                        m["studies"][row["case_id"]] = str(study.relative_to(layout.results))
            if fold is not None:
                m["fold"] = fold
                cv = read_json(layout.crossval(ds, model), required=False)
                if cv is not None:
                    m["cross_validation"] = {
                        "folds": cv["folds"], "mean": cv["mean"], "sd": cv["sd"],
                        "path": str(layout.crossval(ds, model).relative_to(layout.results))}
            entry["models"][model] = m
        for page in ("comparison", "qc"):
            path = layout.reports(ds) / f"{page}.html"
            entry[page] = str(path.relative_to(layout.results))
        entry.update(generalisation_sections(layout, ds))
        out["datasets"][ds] = entry
    return out


def generalisation_sections(layout: Layout, ds: str) -> dict[str, Any]:
    """A dataset's ``generalisation`` and ``learning_curve`` entries (DESIGN.md section 2).

    Read from ``generalisation.json`` (:mod:`capsmed.evaluate.generalisation` writes it): per model
    ``mce``, ``relative_mce`` and ``shifts: {shift: {severity: {metric: value}}}``, the reference
    model, and the page's path; the learning curve as ``{model: {fraction: {metric: value}}}``.
    Empty when the dataset has no such file.
    """
    doc = read_json(layout.generalisation(ds), required=False)
    if not doc:
        return {}
    metric = doc["metric"]
    out: dict[str, Any] = {}
    if doc.get("models"):
        out["generalisation"] = {
            "reference": doc.get("reference"), "metric": metric,
            "report": str(layout.generalisation_report(ds).relative_to(layout.results)),
            "models": {model: {
                "mce": m.get("mce"), "relative_mce": m.get("relative_mce"),
                "shifts": {shift: {sev: {metric: v[metric]} for sev, v in per.items()}
                           for shift, per in m["shifts"].items()}}
                for model, m in doc["models"].items()}}
    curve = doc.get("learning_curve") or {}
    if curve.get("models"):
        out["learning_curve"] = {"metric": metric, "models": {
            model: {frac: {metric: v[metric]} for frac, v in per.items()}
            for model, per in curve["models"].items()}}
    return out
