"""``capsmed crossval``: one model's cross-validation result over the folds of a dataset.

With ``split.folds > 1`` the pipeline trains one model per fold and evaluates each on its own
validation cases (``eval/{model}/fold{k}/val/metrics.json``). This step gathers them into
``results/{dataset}/cv/{model}.json``: the metrics of every fold, their mean and sample standard
deviation, and the number of validation cases per fold. Reads JSON only (no torch).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from capsmed.config import dataset_config, trained_folds
from capsmed.errors import CapsmedError
from capsmed.paths import Layout, read_json

logger = logging.getLogger(__name__)


def crossval_summary(cfg: dict[str, Any], dataset: str, model: str) -> dict[str, Any]:
    """Gather the validation metrics of every trained fold of one model.

    Args:
        cfg: Validated configuration.
        dataset: Dataset name.
        model: Model name.

    Returns:
        ``{"dataset", "model", "stage": "val", "folds": [k, ...], "per_fold": [{"fold", "n_cases",
        "metrics"}], "mean": {metric: value}, "sd": {metric: value}}``; ``sd`` is the sample
        standard deviation (``None`` with one fold); metrics missing (``null``) in a fold are
        averaged over the folds that have them.

    Raises:
        CapsmedError: When the dataset has one fold, or a fold's metrics file is missing.
    """
    ds_cfg = dataset_config(cfg, dataset)
    if int(ds_cfg["split"]["folds"]) < 2:
        raise CapsmedError(f"dataset {dataset}: cross-validation needs split.folds > 1 "
                           f"(it is {ds_cfg['split']['folds']})")
    layout = Layout(Path(cfg["results"]))
    folds = trained_folds(cfg, dataset)
    per_fold = []
    for k in folds:
        doc = read_json(layout.eval_dir(dataset, model, "val", k) / "metrics.json",
                        f"validation metrics of fold {k}")
        per_fold.append({"fold": k, "n_cases": doc.get("n_cases"), "metrics": doc["metrics"]})
    names = sorted({name for entry in per_fold for name in entry["metrics"]})
    mean: dict[str, float | None] = {}
    sd: dict[str, float | None] = {}
    for name in names:
        vals = [float(e["metrics"][name]) for e in per_fold if e["metrics"].get(name) is not None]
        mean[name] = statistics.fmean(vals) if vals else None
        sd[name] = statistics.stdev(vals) if len(vals) > 1 else None
    logger.info("%s/%s: %d folds, %s", dataset, model, len(folds),
                ", ".join(f"{k}={v:.4f}" for k, v in mean.items() if v is not None and "_" not in k))
    return {"dataset": dataset, "model": model, "stage": "val", "folds": folds,
            "per_fold": per_fold, "mean": mean, "sd": sd}
