"""Small pieces: curves, formatting, tolerant readers, image loading."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from capsmed.errors import CapsmedError
from capsmed.report import model_family, stats
from capsmed.report.files import (
    load_volume,
    read_json,
    read_table,
    resolve_path,
    task_of,
)
from capsmed.report.render import (
    fmt_ci,
    fmt_flops,
    fmt_mb,
    fmt_params,
    fmt_seconds,
    lower_is_better,
    metric_label,
)


def test_roc_and_auc_match_a_hand_computed_example():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    fpr, tpr = stats.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert stats.area(fpr, tpr) == pytest.approx(0.75)
    perfect = stats.roc_curve([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert stats.area(*perfect) == pytest.approx(1.0)


def test_roc_ties_and_single_class():
    fpr, tpr = stats.roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    assert stats.area(fpr, tpr) == pytest.approx(0.5)
    fpr, tpr = stats.roc_curve([1, 1], [0.2, 0.9])
    assert np.all(fpr == 0)


def test_pr_curve_and_average_precision():
    rec, prec = stats.pr_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(rec, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(prec, [1, 1, 0.5, 2 / 3, 0.5])
    ap = stats.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


# The numpy versions the page used before scikit-learn, kept as the reference the page expects.
def _numpy_roc(y, s):
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = int(y.sum()), int((~y).sum())
    return (np.r_[0.0, fps / neg] if neg else np.zeros(fps.size + 1),
            np.r_[0.0, tps / pos] if pos else np.zeros(tps.size + 1))


def _numpy_pr(y, s):
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct].astype(float)
    pos = float(y.sum())
    recall = tps / pos if pos else np.zeros_like(tps)
    return np.r_[0.0, recall], np.r_[1.0, tps / (distinct + 1)]


def _numpy_confusion(t, p, n):
    t, p = np.asarray(t, dtype=float), np.asarray(p, dtype=float)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok].astype(int), p[ok].astype(int)
    ok = (t >= 0) & (t < n) & (p >= 0) & (p < n)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (t[ok], p[ok]), 1)
    return cm


@pytest.mark.parametrize("seed", range(20))
def test_scikit_learn_curves_equal_the_numpy_ones_the_page_drew(seed):
    """ROC and PR points equal exactly (every threshold kept); AP equal up to summation order."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y = rng.random(n) < rng.choice([0.0, 0.3, 0.5, 1.0])  # includes no positives / no negatives
    s = np.round(rng.random(n), int(rng.integers(1, 4)))  # ties
    for new, old in ((stats.roc_curve(y, s), _numpy_roc(y, s)),
                     (stats.pr_curve(y, s), _numpy_pr(y, s))):
        for a, b in zip(new, old, strict=True):
            np.testing.assert_array_equal(a, b)
    rec, prec = _numpy_pr(y, s)
    step_ap = float(np.sum(np.diff(rec) * prec[1:]))
    assert stats.average_precision(y, s) == pytest.approx(step_ap, rel=1e-12, abs=1e-15)
    t, p = rng.integers(-1, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
    t[rng.random(n) < 0.1] = np.nan
    np.testing.assert_array_equal(stats.confusion_matrix(t, p, 4), _numpy_confusion(t, p, 4))


def test_curves_of_no_cases_and_non_finite_scores():
    np.testing.assert_array_equal(stats.roc_curve([], []), ([0.0], [0.0]))
    np.testing.assert_array_equal(stats.pr_curve([], []), ([0.0], [1.0]))
    assert math.isnan(stats.average_precision([], []))
    assert stats.average_precision([0, 0], [0.2, 0.7]) == 0.0
    np.testing.assert_array_equal(stats.confusion_matrix([7, np.nan], [0, 1], 2), np.zeros((2, 2)))
    # scikit-learn rejects NaN scores; the page leaves those cases out
    y, s = [0, 1, 1, 0], [0.1, np.nan, 0.8, 0.3]
    np.testing.assert_array_equal(stats.roc_curve(y, s), _numpy_roc([0, 1, 0], [0.1, 0.8, 0.3]))
    assert stats.average_precision(y, s) == 1.0


def test_confusion_reliability_and_ece():
    cm = stats.confusion_matrix([0, 1, 2, 2, np.nan], [0, 2, 2, 2, 1], 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 2]])
    bins = stats.reliability_bins([0.95, 0.95, 0.55, 0.55], [1, 1, 1, 0], n_bins=10)
    assert bins["bin_count"][9] == 2 and bins["bin_count"][5] == 2
    assert bins["bin_accuracy"][5] == pytest.approx(0.5)
    assert bins["bin_accuracy"][0] is None
    # ECE = (2 * |1 - 0.95| + 2 * |0.5 - 0.55|) / 4
    assert stats.expected_calibration_error(bins) == pytest.approx(0.05)


def test_formatting():
    assert fmt_params(812345) == "812.3 K" and fmt_params(4_808_917) == "4.81 M"
    assert fmt_params(None) == "n/a" and fmt_params(512) == "512"
    assert fmt_flops(3.2e9) == "3.20 GFLOPs"
    assert fmt_seconds(0.0123) == "12.3 ms" and fmt_seconds(3725) == "1 h 02 min"
    assert fmt_seconds(75) == "75.0 s" and fmt_seconds(float("nan")) == "n/a"
    assert fmt_mb(1536) == "1.50 GB" and fmt_mb(900) == "900 MB"
    assert fmt_ci([0.78, 0.85], "dice") == "[0.780, 0.850]"
    assert fmt_ci([2.4, 3.9], "hd95") == "[2.40, 3.90]"
    assert fmt_ci(None) == "" and fmt_ci([1]) == "" and fmt_ci([float("nan"), 1]) == ""
    assert metric_label("dice_anterior") == "Dice (anterior)"
    assert metric_label("hd95") == "HD95 (mm)" and metric_label("balanced_accuracy") == \
        "Balanced accuracy"
    assert lower_is_better("hd95_posterior") and lower_is_better("ece")
    assert not lower_is_better("dice") and not lower_is_better("auc")


def test_report_reliability_bins_are_the_ece_bins():
    """The stage page's fallback table bins as the evaluation's ECE does, edges included."""
    from capsmed.evaluate.metrics import classification_metrics

    conf = np.array([0.5, 0.5, 0.7, 0.7, 0.9, 1.0, 0.55, 0.8])
    y = np.array([0, 1, 0, 0, 1, 0, 1, 0])
    probs = np.stack([conf, 1 - conf], axis=1)  # class 0 predicted with confidence conf
    written = classification_metrics(y, probs, n_bins=10)["reliability"]
    assert stats.reliability_bins(conf, probs.argmax(1) == y, n_bins=10) == written
    assert written["bin_count"][4] == 2 and written["bin_count"][6] == 2  # 0.5 and 0.7


def test_model_family_reads_only_the_recorded_family():
    assert model_family({"family": "capsule"}) == "capsule"
    assert model_family({"family": "cnn"}) == "cnn"
    # No guessing from names: without a recorded family it is unknown.
    assert model_family({}) is None and model_family(None) is None
    assert model_family({"family": "transformer"}) is None


def test_read_table_keeps_ids_as_text(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("case_id,dice,hd95,uncertainty,class\n001,0.5,inf,,1\nNA,,3.0,/x.nii.gz,0\n")
    df = read_table(path)
    assert list(df["case_id"]) == ["001", "NA"]
    assert math.isinf(df["hd95"][0]) and math.isnan(df["dice"][1])
    assert list(df["uncertainty"]) == ["", "/x.nii.gz"]
    assert list(df["class"]) == [1.0, 0.0]
    assert read_table(tmp_path / "missing.csv").empty
    with pytest.raises(CapsmedError, match="missing.csv"):
        read_table(tmp_path / "missing.csv", required=True)


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(CapsmedError, match="metrics.json"):
        read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(CapsmedError, match="JSON object"):
        read_json(bad)
    assert read_json(tmp_path / "absent.json") == {}


def test_resolve_path(tmp_path):
    (tmp_path / "predictions").mkdir()
    target = tmp_path / "predictions" / "a.nii.gz"
    target.write_bytes(b"x")
    assert resolve_path("predictions/a.nii.gz", tmp_path) == target
    assert resolve_path(str(target)) == target
    # a results folder that moved: the bare file name is found in a base folder
    assert resolve_path("/old/place/a.nii.gz", tmp_path / "predictions") == target
    assert resolve_path("", tmp_path) is None and resolve_path(float("nan")) is None


def test_load_volume_2d_4d_and_reorientation(tmp_path):
    two_d = tmp_path / "2d.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(12, dtype=np.float32).reshape(3, 4), np.eye(4)), two_d)
    v = load_volume(two_d)
    assert v.data.shape == (3, 4, 1) and v.shape == (3, 4)
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.diag([2, 1, 3, 1])), four_d)
    v = load_volume(four_d)
    assert v.data.shape == (4, 5, 6) and v.channels == 2 and v.spacing == (2.0, 1.0, 3.0)
    assert v.voxel_ml == pytest.approx(0.006)
    # an LPS image is flipped to RAS for display
    lps = tmp_path / "lps.nii.gz"
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(data, np.diag([-1, -1, 1, 1])), lps)
    v = load_volume(lps)
    assert v.axcodes == ("L", "P", "S") and v.data[3, 4, 0] == 1
    assert load_volume(tmp_path) is None and load_volume(tmp_path / "absent.nii.gz") is None
    # the spacing shown is the affine's, as every stage reads it, not a disagreeing pixdim
    odd = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([1.5, 1.0, 2.0, 1.0]))
    odd.header["pixdim"][1:4] = 1.0
    nib.save(odd, tmp_path / "odd.nii.gz")
    assert load_volume(tmp_path / "odd.nii.gz").zooms == (1.5, 1.0, 2.0)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    assert load_volume(broken) is None


def test_study_file_names_are_safe_and_distinct():
    """Plain ids are kept; any other id gets a name of safe characters that no other id gets."""
    import re

    from capsmed.report import study_filename

    ids = ["case_017", "<script>alert(1)</script>", "a b", "a_b", "a  b", "../x", "..", "ü", ""]
    names = [study_filename(i) for i in ids]
    assert names[0] == "case_017.html" and names[3] == "a_b.html"
    assert len(set(names)) == len(ids), names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.html", name), name


def test_label_names_one_rule_for_every_page():
    from capsmed.report.files import label_names

    cases = {"labels": {"0": "background", "1": "liver"}, "classes": {"0": "no", "1": "yes"}}
    assert label_names("segmentation", {}, cases) == {0: "background", 1: "liver"}
    assert label_names("classification", {"classes": ["a", "b"]}, cases) == {0: "a", 1: "b"}
    assert label_names("segmentation") == {0: "background", 1: "foreground"}
    assert label_names("segmentation", count=3) == {0: "background", 1: "label 1", 2: "label 2"}
    assert label_names("classification", {}, count=2) == {0: "class 0", 1: "class 1"}


def test_task_follows_one_rule_on_every_page():
    """The first document naming a task wins; else prob_ columns mean classification."""
    assert task_of({}, {"task": "classification"}, {"task": "segmentation"}) == "classification"
    assert task_of({}, columns=["case_id", "prob_0", "prob_1"]) == "classification"
    assert task_of({}, columns=["case_id", "dice"]) == "segmentation"
    assert task_of({}, default="") == ""


def _entry(model, cls=None, args=None, dice=None, ci=None, params=100, flops=1000):
    train = {"model_class": cls or model} if cls or args is not None else {}
    if args is not None:
        train["model_args"] = args
    return {"model": model, "train": train, "family": "capsule",
            "metrics": {"test": {"dice": dice}} if dice is not None else {},
            "ci95": {"test": {"dice": ci}} if ci else {},
            "costs": {"params": params, "flops": flops}}


def test_ablations_pair_entries_of_one_class_by_the_options_that_differ():
    from capsmed.report.comparison import _ablation_sentence, ablations

    ref = _entry("capsunet", args={"routing_iterations": 3, "capsule_block": "capsule"},
                 dice=0.866, ci=[0.85, 0.88])
    one = _entry("capsunet_1iter", "capsunet", {"routing_iterations": 1,
                                                 "capsule_block": "capsule"},
                 dice=0.864, ci=[0.85, 0.88])
    conv = _entry("capsunet_conv", "capsunet", {"routing_iterations": 3, "capsule_block": "conv"},
                  dice=0.80, ci=[0.78, 0.82], params=101)
    same = _entry("capsunet_again", "capsunet", {"routing_iterations": 3,
                                                  "capsule_block": "capsule"})
    old = _entry("capsunet_old", "capsunet")  # a train.json from before model_args: no pair
    pairs = ablations([one, ref, conv, same, old, _entry("unet", args={})])
    assert [(r["model"], v["model"], c) for r, v, c in pairs] == [
        ("capsunet", "capsunet_1iter", {"routing_iterations": (1, 3)}),
        ("capsunet", "capsunet_conv", {"capsule_block": ("conv", "capsule")})]
    assert _ablation_sentence(ref, one, pairs[0][2], "test", "dice") == (
        "Ablation of capsunet: capsunet_1iter (routing_iterations 1 instead of 3; the same "
        "parameters, the same FLOPs) reaches Dice 0.864 against 0.866 (0.002 worse); the 95% intervals "
        "overlap, so this test set does not show that the change matters.")
    assert _ablation_sentence(ref, conv, pairs[1][2], "test", "dice") == (
        "Ablation of capsunet: capsunet_conv (capsule_block conv instead of capsule; 1.010x the "
        "parameters, the same FLOPs) reaches Dice 0.800 against 0.866 (0.066 worse) and the 95% "
        "intervals do not overlap.")
    assert _ablation_sentence(ref, same, {"x": (1, 2)}, "test", "dice").endswith(
        ": no test Dice for both yet.")
    # without an entry named like the class, the first listed one is the reference
    assert [(r["model"], v["model"]) for r, v, _ in ablations([one, conv])] == [
        ("capsunet_1iter", "capsunet_conv")]
