"""capsmed crossval: the validation metrics of every fold, their mean and sample sd."""

import json
import statistics

import pytest

from capsmed.config import validate_config
from capsmed.errors import CapsmedError
from capsmed.evaluate.crossval import crossval_summary
from tests.pipeline_helpers import run_cli, write_config


def _cfg(tmp_path, **split):
    ds = {"source": "synthetic", "task": "classification", "spatial_dims": 2,
          "synthetic": {"size": [28, 28]}, "models": ["seed_cnn"], "split": split}
    return validate_config({"results": str(tmp_path / "r"), "datasets": {"d": ds}})


def _write_fold(tmp_path, fold, metrics, n=5):
    path = tmp_path / "r/d/eval/seed_cnn" / f"fold{fold}" / "val" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"n_cases": n, "metrics": metrics}))


def test_mean_and_sample_sd_over_folds(tmp_path):
    cfg = _cfg(tmp_path, folds=3)
    aucs = [0.75, 0.9, 0.6]
    for k, auc in enumerate(aucs):
        _write_fold(tmp_path, k, {"auc": auc, "accuracy": 0.5 + 0.1 * k,
                                  "ece": None if k == 1 else 0.2})
    doc = crossval_summary(cfg, "d", "seed_cnn")
    assert doc["folds"] == [0, 1, 2] and [e["fold"] for e in doc["per_fold"]] == [0, 1, 2]
    assert doc["mean"]["auc"] == pytest.approx(0.75)
    assert doc["sd"]["auc"] == pytest.approx(statistics.stdev(aucs)) == pytest.approx(0.15)
    assert doc["mean"]["accuracy"] == pytest.approx(0.6)
    # a metric missing in one fold is averaged over the folds that have it
    assert doc["mean"]["ece"] == pytest.approx(0.2) and doc["sd"]["ece"] == pytest.approx(0.0)


def test_command_writes_the_cv_file(tmp_path):
    cfg = _cfg(tmp_path, folds=2)
    for k in range(2):
        _write_fold(tmp_path, k, {"auc": 0.5 + 0.2 * k})
    path = write_config(cfg, tmp_path / "c.yaml")
    assert run_cli("-q", "crossval", "-c", path, "-d", "d", "-m", "seed_cnn") == 0
    doc = json.loads((tmp_path / "r/d/cv/seed_cnn.json").read_text())
    assert doc["mean"]["auc"] == pytest.approx(0.6)


def test_one_fold_is_not_cross_validation(tmp_path):
    with pytest.raises(CapsmedError, match=r"dataset d: cross-validation needs split.folds > 1 "
                                           r"\(it is 1\)"):
        crossval_summary(_cfg(tmp_path), "d", "seed_cnn")


def test_a_missing_fold_is_named(tmp_path):
    cfg = _cfg(tmp_path, folds=2)
    _write_fold(tmp_path, 0, {"auc": 0.5})
    with pytest.raises(CapsmedError, match=r"fold1/val/metrics.json: validation metrics of fold 1 "
                                           r"not found"):
        crossval_summary(cfg, "d", "seed_cnn")
