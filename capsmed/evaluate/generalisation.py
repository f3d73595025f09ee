"""Generalisation of every model of a dataset: corruption errors of the shifted stages, learning curves.

``capsmed generalisation -d DATASET`` reads what the shifted stages
(:mod:`capsmed.evaluate.shift`) and the learning-curve models wrote and writes
``results/{dataset}/generalisation.json``, which the summary and the generalisation page read.

Definitions (Hendrycks & Dietterich 2019, ImageNet-C; Di Salvo et al. 2024, MedMNIST-C), with the
error ``E = 1 - metric`` of the dataset's primary metric (Dice for segmentation, AUC for
classification) on the test cases at severity ``s`` of shift ``c``:

- corruption error ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, the reference being the dataset's
  CNN baseline of the same run (``shift.reference`` names another);
- relative corruption error ``rCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)``,
  where each model's clean error comes from the shifted stages' own severity-0 pass;
- ``mce`` and ``relative_mce``: their means over the shifts where they are defined.

A ratio is *undefined* (None, with the reason) where its denominator is meaningless: a reference
whose mean error (CE) or mean degradation (rCE) over the severities is under :data:`MIN_REFERENCE`
(0.01). Each model's difference to the reference per shift (metric averaged over the severities)
gets a paired bootstrap interval over the test cases, resampling the same cases for both.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.paths import Layout

logger = logging.getLogger(__name__)

#: A reference degrading (or erring) less than this on average makes its ratio meaningless.
MIN_REFERENCE = 0.01


def primary_metric(task: str) -> str:
    """The metric whose error the corruption errors use: ``dice`` or ``auc``."""
    return "dice" if task == "segmentation" else "auc"


def corruption_error(errors: Sequence[float], reference: Sequence[float],
                     clean: float | None = None, reference_clean: float | None = None
                     ) -> tuple[float | None, str | None]:
    """``CE`` (or, with the clean errors, the relative ``rCE``) of one shift.

    Args:
        errors: The model's errors at each severity.
        reference: The reference model's errors at the same severities.
        clean: The model's clean error (relative CE), or None (CE).
        reference_clean: The reference's clean error (relative CE).

    Returns:
        ``(value, None)``, or ``(None, reason)`` where the reference's mean error or degradation
        is under :data:`MIN_REFERENCE` or a value is missing.
    """
    e = np.asarray(errors, dtype=float)
    r = np.asarray(reference, dtype=float)
    if e.size == 0 or e.shape != r.shape or not (np.isfinite(e).all() and np.isfinite(r).all()):
        return None, "missing values"
    if clean is not None:
        if reference_clean is None or not (math.isfinite(clean) and math.isfinite(reference_clean)):
            return None, "missing clean error"
        e, r = e - clean, r - reference_clean
        if r.mean() < MIN_REFERENCE:
            return None, f"the reference degrades by {r.mean():.4f} < {MIN_REFERENCE} on average"
    elif r.mean() < MIN_REFERENCE:
        return None, f"the reference's error is {r.mean():.4f} < {MIN_REFERENCE} on average"
    return float(e.sum() / r.sum()), None


def _read_cases(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def _case_scores(rows: Mapping[str, Mapping[str, str]], ids: list[str], task: str,
                 metric: str) -> np.ndarray:
    """Per case: the metric (segmentation) or the class probabilities (classification)."""
    if task == "segmentation":
        return np.asarray([float(rows[i][metric]) if rows[i].get(metric) not in ("", None)
                           else np.nan for i in ids])
    n = sum(1 for k in next(iter(rows.values())) if k.startswith("prob_"))
    return np.asarray([[float(rows[i][f"prob_{k}"]) for k in range(n)] for i in ids])


def _weighted_auc(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC (binary, or macro one-vs-rest) of each resample given as case weights ``(B, N)``."""
    classes = [1] if probs.shape[1] == 2 else sorted(set(y.tolist()))
    aucs = []
    for k in classes:
        pos, neg = y == k, y != k
        if not pos.any() or not neg.any():
            continue
        s = probs[:, k]
        # Mann-Whitney: 1 where a positive outranks a negative, 1/2 for ties
        pairs = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        wp, wn = weights[:, pos], weights[:, neg]
        num = np.einsum("bp,pn,bn->b", wp, pairs, wn)
        den = wp.sum(1) * wn.sum(1)
        aucs.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    return np.nanmean(np.stack(aucs), axis=0) if aucs else np.full(weights.shape[0], np.nan)


def paired_difference(model: list[np.ndarray], reference: list[np.ndarray], task: str,
                      y: np.ndarray | None, n_boot: int, seed: int) -> dict[str, Any]:
    """Metric of ``model`` minus the reference's, averaged over severities, with a paired bootstrap.

    Args:
        model: Per severity, the model's :func:`_case_scores` over the same cases.
        reference: The reference's, likewise.
        task: ``segmentation`` (mean Dice over cases) or ``classification`` (AUC).
        y: True classes (classification).
        n_boot: Resamples (0: no interval).
        seed: Seed of the resampling.

    Returns:
        ``{"difference", "ci95": [lo, hi] | None}``.
    """
    n = len(model[0])

    def stat(weights: np.ndarray) -> np.ndarray:
        diffs = []
        for m, r in zip(model, reference, strict=True):
            if task == "segmentation":
                ok = np.isfinite(m) & np.isfinite(r)
                w = weights * ok
                total = np.where(w.sum(1) > 0, w.sum(1), np.nan)
                diffs.append((w @ np.nan_to_num(m - r)) / total)
            else:
                diffs.append(_weighted_auc(y, m, weights) - _weighted_auc(y, r, weights))
        return np.mean(np.stack(diffs), axis=0)

    point = float(stat(np.ones((1, n)))[0])
    ci = None
    if n_boot and n > 1:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        weights = np.zeros((n_boot, n))
        np.add.at(weights, (np.arange(n_boot)[:, None], idx), 1.0)
        values = stat(weights)
        values = values[np.isfinite(values)]
        if values.size:
            ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return {"difference": point if math.isfinite(point) else None, "ci95": ci}


def _reference(cfg: dict, dataset: str, models: list[str], layout: Layout, fold: int | None,
               named: str | None) -> str | None:
    """The reference model: ``shift.reference``, else the first CNN (``family`` in train.json)."""
    from capsmed.paths import read_json

    if named is not None:
        if named not in models:
            raise CapsmedError(f"datasets.{dataset}.shift.reference: {named!r} is not one of the "
                               f"dataset's models ({', '.join(models)})")
        return named
    for model in models:
        train = read_json(layout.model_dir(dataset, model, fold) / "train.json", "training record",
                          required=False, default={})
        if train.get("family") == "cnn":
            return model
    return None


def _model_shifts(layout: Layout, dataset: str, model: str, fold: int | None, shifts: list[str],
                  severities: list[int], metric: str, task: str) -> dict[str, Any]:
    """One model's metrics per shift and severity, and the clean reference (metrics.json files)."""
    from capsmed.evaluate.shift import CLEAN
    from capsmed.paths import read_json

    def read(shift: str, severity: int) -> dict:
        return read_json(layout.shift_dir(dataset, model, shift, severity, fold) / "metrics.json",
                         f"shifted stage {shift} severity {severity} of {model}")

    clean = read(CLEAN, 0)
    out: dict[str, Any] = {"clean": {metric: clean["metrics"].get(metric)}, "shifts": {}}
    if task == "classification":
        out["clean"]["ece"] = clean["metrics"].get("ece")
    for shift in shifts:
        per = {}
        for severity in severities:
            doc = read(shift, severity)
            entry = {metric: doc["metrics"].get(metric), "ci95": doc.get("ci95", {}).get(metric)}
            if task == "classification":
                entry["ece"] = doc["metrics"].get("ece")
            per[str(severity)] = entry
        out["shifts"][shift] = per
    return out


def _errors(entry: Mapping[str, Any], shift: str, severities: list[int], metric: str) -> list:
    return [1.0 - v if v is not None else np.nan
            for v in (entry["shifts"][shift][str(s)][metric] for s in severities)]


def _paired(layout: Layout, dataset: str, model: str, ref: str, fold: int | None, shift: str,
            severities: list[int], task: str, metric: str, cfg: dict) -> dict[str, Any]:
    """:func:`paired_difference` of one model against the reference on one shift."""
    ours, theirs, y = [], [], None
    for severity in severities:
        a = _read_cases(layout.shift_dir(dataset, model, shift, severity, fold) / "cases.csv")
        b = _read_cases(layout.shift_dir(dataset, ref, shift, severity, fold) / "cases.csv")
        ids = sorted(set(a) & set(b))
        if task == "classification" and y is None:
            y = np.asarray([int(a[i]["class"]) for i in ids])
        ours.append(_case_scores(a, ids, task, metric))
        theirs.append(_case_scores(b, ids, task, metric))
    return paired_difference(ours, theirs, task, y, int(cfg["evaluate"]["bootstrap"]),
                             int(cfg["seed"]))


def learning_curve(cfg: dict, dataset: str, models: list[str], layout: Layout, fold: int | None,
                   metric: str) -> dict[str, Any]:
    """The test metric of each model per training share (:func:`capsmed.config.fraction_labels`).

    Returns:
        ``{"fractions": [labels..., "1.0"], "models": {model: {"0.25": {metric, "ci95",
        "n_train"}, "minority0.5": {...}, "1.0": {...}}}}`` (``1.0`` is the ordinary model);
        empty when no model has a learning curve.
    """
    from capsmed.config import fraction_labels
    from capsmed.paths import read_json

    labels = {model: fraction_labels(cfg, dataset, model) for model in models}
    if not any(labels.values()):
        return {}
    every = list(dict.fromkeys(label for m in models for label in labels[m]))
    out: dict[str, Any] = {"fractions": every + ["1.0"], "models": {}}
    for model in models:
        per = {}
        for label in labels[model]:
            doc = read_json(layout.fraction_eval_dir(dataset, model, label, fold) / "metrics.json",
                            f"test stage of {model} trained on {label} of its cases")
            train = read_json(layout.fraction_model_dir(dataset, model, label, fold)
                              / "train.json", "training record", required=False, default={})
            per[label] = {metric: doc["metrics"].get(metric),
                          "ci95": doc.get("ci95", {}).get(metric),
                          "n_train": train.get("train_cases")}
        full = read_json(layout.eval_dir(dataset, model, "test", fold) / "metrics.json",
                         f"test stage of {model}")
        per["1.0"] = {metric: full["metrics"].get(metric), "ci95": full.get("ci95", {}).get(metric)}
        out["models"][model] = per
    return out


def summarise_generalisation(cfg: dict, dataset: str) -> dict[str, Any]:
    """The dataset's ``generalisation.json`` content (see the module docstring).

    Returns:
        ``{"dataset", "task", "metric", "reference", "shifts", "severities", "models": {model:
        {"clean", "shifts": {shift: {"1": {metric, "ci95", ["ece"]}}}, "ce": {shift},
        "relative_ce": {shift}, "undefined": {shift: reason}, "mce", "relative_mce",
        "paired": {shift: {"difference", "ci95"}}}}, "learning_curve"}``.

    Raises:
        CapsmedError: A missing input file, named.
    """
    from capsmed.config import path_fold
    from capsmed.evaluate.shift import shift_stage_settings
    from capsmed.paths import read_json

    layout = Layout(Path(cfg["results"]))
    fold = path_fold(cfg, dataset)
    plan = read_json(layout.plan(dataset), "plan")
    task = cfg["datasets"][dataset]["task"]
    metric = primary_metric(task)
    models = list(cfg["datasets"][dataset]["models"])
    shifts, _ = shift_stage_settings(cfg, dataset, plan)
    doc: dict[str, Any] = {"dataset": dataset, "task": task, "metric": metric,
                           "shifts": shifts["shifts"], "severities": shifts["severities"],
                           "tta": shifts["tta"], "min_reference": MIN_REFERENCE, "models": {}}
    if shifts["enabled"]:
        ref = _reference(cfg, dataset, models, layout, fold, shifts["reference"])
        doc["reference"] = ref
        for model in models:
            doc["models"][model] = _model_shifts(layout, dataset, model, fold, shifts["shifts"],
                                                 shifts["severities"], metric, task)
        for model, entry in doc["models"].items():
            _ratios(doc, entry, ref, metric)
            if ref is not None and model != ref:
                entry["paired"] = {s: _paired(layout, dataset, model, ref, fold, s,
                                              shifts["severities"], task, metric, cfg)
                                   for s in shifts["shifts"]}
    doc["learning_curve"] = learning_curve(cfg, dataset, models, layout, fold, metric)
    return doc


def _ratios(doc: dict[str, Any], entry: dict[str, Any], ref: str | None, metric: str) -> None:
    """Fill ``ce``, ``relative_ce``, ``undefined``, ``mce`` and ``relative_mce`` of one model."""
    entry["ce"], entry["relative_ce"], entry["undefined"] = {}, {}, {}
    if ref is None:
        entry["mce"] = entry["relative_mce"] = None
        entry["undefined"]["all"] = "no reference model (no CNN baseline in the dataset)"
        return
    reference = doc["models"][ref]
    sev = doc["severities"]
    clean = entry["clean"][metric]
    ref_clean = reference["clean"][metric]
    for shift in doc["shifts"]:
        ours, theirs = _errors(entry, shift, sev, metric), _errors(reference, shift, sev, metric)
        ce, why = corruption_error(ours, theirs)
        rce, rwhy = corruption_error(
            ours, theirs, None if clean is None else 1.0 - clean,
            None if ref_clean is None else 1.0 - ref_clean)
        entry["ce"][shift], entry["relative_ce"][shift] = ce, rce
        if why or rwhy:
            entry["undefined"][shift] = "; ".join(
                f"{name}: {reason}" for name, reason in (("CE", why), ("relative CE", rwhy))
                if reason)
    for key, out in (("ce", "mce"), ("relative_ce", "relative_mce")):
        values = [v for v in entry[key].values() if v is not None]
        entry[out] = float(np.mean(values)) if values else None
