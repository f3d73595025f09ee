"""Shifted test stages and the generalisation summary: the test stage's path under graded shifts."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from capsmed.errors import CapsmedError
from capsmed.evaluate.generalisation import (
    MIN_REFERENCE,
    _weighted_auc,
    corruption_error,
    paired_difference,
)
from capsmed.evaluate.run import evaluate_stage
from capsmed.evaluate.shift import evaluate_shift
from capsmed.measures import roc_auc
from capsmed.paths import Layout
from capsmed.train.loop import train_model
from tests.pipeline_helpers import prepare_all, run_cli, tiny_config, write_config

SHIFT = {"shifts": ["rotation", "noise"], "severities": [1, 3]}


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift")
    cfg = tiny_config(root / "results", task="segmentation", models=["unet", "unet_b"],
                      shift=SHIFT, inference={"tta": False},
                      train={"epochs": 2, "batch_size": 2, "samples_per_case": 1})
    cfg["models"]["unet_b"] = {"model": "unet", "args": {"channels": [4, 8], "strides": [2],
                                                          "num_res_units": 0}}
    path = write_config(cfg, root / "c.yaml")
    prepare_all(path)
    from capsmed.config import load_config

    cfg = load_config(path)
    for model in ("unet", "unet_b"):
        train_model(cfg, "ds", model)
    return cfg, path


def test_the_clean_reference_is_the_test_stage_with_the_shift_settings(seg_runs):
    cfg, _ = seg_runs
    clean = evaluate_shift(cfg, "ds", "unet", "none")[0]
    test = evaluate_stage(cfg, "ds", "unet", "test")  # inference.tta is off in this config
    assert clean["metrics"] == test["metrics"] and clean["n_cases"] == test["n_cases"]
    assert clean["shift"] == "none" and clean["severity"] == 0 and clean["inference"]["tta"] is False
    layout = Layout(Path(cfg["results"]))
    rows = list(csv.DictReader((layout.shift_dir("ds", "unet", "none", 0) / "cases.csv").open()))
    # the rows name the original studies, and nothing of the shifted copies is left behind
    assert all(Path(r["image"]).exists() and r["prediction"] == "" for r in rows)
    assert not list((layout.dataset("ds") / "eval/unet/shift/none").glob(".work-*"))


def test_severities_are_deterministic_and_move_the_metric(seg_runs):
    cfg, path = seg_runs
    first = evaluate_shift(cfg, "ds", "unet", "rotation")
    assert sorted(first) == [1, 3]
    again = evaluate_shift(cfg, "ds", "unet", "rotation", severities=[3])
    assert again[3]["metrics"] == first[3]["metrics"]
    assert first[3]["cost"]["shift_seconds_per_case"] > 0
    gallery = np.load(Layout(Path(cfg["results"])).shift_dir("ds", "unet", "rotation", 3)
                      / "gallery.npz")
    assert gallery["image"].shape == gallery["label"].shape == gallery["prediction"].shape
    # the command line, the same function
    assert run_cli("-q", "evaluate-shift", "-c", path, "-d", "ds", "-m", "unet", "--shift",
                   "noise") == 0


def test_a_shift_outside_the_datasets_list_is_named(seg_runs, capsys):
    cfg, path = seg_runs
    with pytest.raises(CapsmedError, match=r"shift 'motion' is not among its shifted stages "
                                           r"\(rotation, noise\)"):
        evaluate_shift(cfg, "ds", "unet", "motion")
    assert run_cli("evaluate-shift", "-c", path, "-d", "ds", "-m", "unet", "--shift",
                   "rotation", "--severity", "7") == 2
    assert "severity" in capsys.readouterr().err


def test_generalisation_summary_and_its_place_in_summary_json(seg_runs):
    from capsmed.summary import build_summary

    cfg, path = seg_runs
    for model in ("unet", "unet_b"):
        evaluate_stage(cfg, "ds", model, "test")
        evaluate_shift(cfg, "ds", model, "none")
        for shift in SHIFT["shifts"]:
            evaluate_shift(cfg, "ds", model, shift)
    assert run_cli("-q", "generalisation", "-c", path, "-d", "ds") == 0
    layout = Layout(Path(cfg["results"]))
    doc = json.loads(layout.generalisation("ds").read_text())
    assert doc["reference"] == "unet" and doc["metric"] == "dice"
    ref = doc["models"]["unet"]
    for shift in SHIFT["shifts"]:  # the reference against itself: 1 where defined
        assert ref["ce"][shift] in (1.0, None)
    b = doc["models"]["unet_b"]
    for shift in SHIFT["shifts"]:
        errors = [1 - b["shifts"][shift][s]["dice"] for s in ("1", "3")]
        ref_errors = [1 - ref["shifts"][shift][s]["dice"] for s in ("1", "3")]
        expected, _ = corruption_error(errors, ref_errors)
        assert b["ce"][shift] == expected
        assert b["paired"][shift]["difference"] == pytest.approx(
            np.mean(errors) * -1 + np.mean(ref_errors), abs=1e-9)
    summary = build_summary(cfg)["datasets"]["ds"]["generalisation"]
    assert summary["reference"] == "unet"
    assert summary["models"]["unet_b"]["mce"] == b["mce"]
    assert summary["models"]["unet_b"]["shifts"]["rotation"]["3"] == {
        "dice": b["shifts"]["rotation"]["3"]["dice"]}


def test_corruption_error_and_its_undefined_cases():
    assert corruption_error([0.2, 0.4], [0.4, 0.8]) == (0.5, None)
    # relative: (0.2 - 0.1) + (0.4 - 0.1) over (0.4 - 0.2) + (0.8 - 0.2)
    assert corruption_error([0.2, 0.4], [0.4, 0.8], 0.1, 0.2)[0] == pytest.approx(0.4 / 0.8)
    value, why = corruption_error([0.2, 0.4], [0.205, 0.2], 0.1, 0.2)
    assert value is None and f"< {MIN_REFERENCE}" in why and "degrades" in why
    value, why = corruption_error([0.2], [0.001])
    assert value is None and "error is 0.0010" in why
    assert corruption_error([0.2], [float("nan")]) == (None, "missing values")


def test_paired_difference_and_weighted_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = rng.random((40, 2))
    p /= p.sum(1, keepdims=True)
    assert _weighted_auc(y, p, np.ones((1, 40)))[0] == pytest.approx(roc_auc(y, p))
    q = np.clip(p + 0.2 * (y[:, None] == np.arange(2)), 0, None)
    res = paired_difference([q], [p], "classification", y, n_boot=200, seed=0)
    assert res["difference"] == pytest.approx(roc_auc(y, q) - roc_auc(y, p))
    assert res["ci95"][0] <= res["difference"] <= res["ci95"][1]
    a, b = rng.random(30), rng.random(30)
    seg = paired_difference([a, a], [b, b], "segmentation", None, n_boot=0, seed=0)
    assert seg == {"difference": pytest.approx(float(np.mean(a - b))), "ci95": None}


def test_learning_curve_reads_each_fraction_and_the_full_model(seg_runs, tmp_path):
    from capsmed.evaluate.generalisation import learning_curve

    cfg, _ = seg_runs
    cfg = dict(cfg)
    cfg["datasets"] = {**cfg["datasets"], "ds": {**cfg["datasets"]["ds"], "train": {
        **cfg["datasets"]["ds"].get("train", {}), "fractions": [0.5, 1.0]}}}
    train_model(cfg, "ds", "unet", fraction="0.5")
    evaluate_stage(cfg, "ds", "unet", "test", fraction="0.5")
    evaluate_stage(cfg, "ds", "unet", "test")
    layout = Layout(Path(cfg["results"]))
    curve = learning_curve(cfg, "ds", ["unet"], layout, None, "dice")
    assert curve["fractions"] == ["0.5", "1.0"]
    half = json.loads((layout.fraction_eval_dir("ds", "unet", "0.5") / "metrics.json").read_text())
    assert curve["models"]["unet"]["0.5"]["dice"] == half["metrics"]["dice"]
    train = json.loads((layout.fraction_model_dir("ds", "unet", "0.5") / "train.json").read_text())
    assert curve["models"]["unet"]["0.5"]["n_train"] == train["train_cases"] <= json.loads(
        (layout.model_dir("ds", "unet") / "train.json").read_text())["train_cases"]
