"""Splits: no patient leakage, determinism, stratification, official splits, write-once file."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from capsmed.data.splits import fold_cases, load_or_create_splits, make_splits
from capsmed.errors import CapsmedError


def _doc(n=60, task="classification", patients=None, classes=None, official=False):
    cases = []
    for i in range(n):
        c = {"case_id": f"c{i:03d}", "image": f"/x/{i}.nii.gz",
             "patient_id": f"p{(patients or (lambda j: j))(i)}"}
        if task == "classification":
            c["class"] = (classes or (lambda j: int(j % 4 == 0)))(i)
        else:
            c["label"] = f"/x/{i}_seg.nii.gz"
        if official:
            c["split"] = ("train", "train", "train", "val", "test")[i % 5]
        cases.append(c)
    return {"task": task, "spatial_dims": 2, "modality": "other", "cases": cases}


def _patients(doc, ids):
    by_id = {c["case_id"]: c["patient_id"] for c in doc["cases"]}
    return {by_id[i] for i in ids}


def _assert_partition(doc, splits):
    all_ids = {c["case_id"] for c in doc["cases"]}
    for fold in splits["folds"]:
        parts = [set(splits["test"]), set(fold["train"]), set(fold["val"])]
        assert set().union(*parts) == all_ids
        assert sum(len(p) for p in parts) == len(all_ids)
        pats = [_patients(doc, p) for p in parts]
        assert not (pats[0] & pats[1]) and not (pats[0] & pats[2]) and not (pats[1] & pats[2])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("folds", [1, 4])
def test_no_patient_in_two_splits(task, folds):
    doc = _doc(60, task, patients=lambda i: i // 3)  # 3 cases per patient
    splits = make_splits(doc, {"test_fraction": 0.2, "folds": folds, "val_fraction": 0.25}, 7)
    assert len(splits["folds"]) == folds
    _assert_partition(doc, splits)
    assert 9 <= len(splits["test"]) <= 15
    if folds > 1:  # every non-test case is validated exactly once
        vals = [i for f in splits["folds"] for i in f["val"]]
        assert len(vals) == len(set(vals)) == 60 - len(splits["test"])


def test_deterministic_by_seed():
    doc = _doc(40, patients=lambda i: i // 2)
    cfg = {"test_fraction": 0.25, "folds": 3}
    a, b, c = make_splits(doc, cfg, 1), make_splits(doc, cfg, 1), make_splits(doc, cfg, 2)
    assert a == b
    assert a["test"] != c["test"] or a["folds"] != c["folds"]
    assert a["seed"] == 1 and a["config_hash"] != c["config_hash"]
    assert a["test"] == sorted(a["test"])


def test_stratified_classes():
    doc = _doc(100, classes=lambda i: int(i % 4 == 0))  # 25 % positives
    splits = make_splits(doc, {"test_fraction": 0.2, "folds": 1, "val_fraction": 0.25}, 0)
    cls = {c["case_id"]: c["class"] for c in doc["cases"]}
    for ids in (splits["test"], splits["folds"][0]["train"], splits["folds"][0]["val"]):
        share = Counter(cls[i] for i in ids)[1] / len(ids)
        assert 0.2 <= share <= 0.3, share
    cv = make_splits(doc, {"test_fraction": 0.2, "folds": 4}, 0)
    for fold in cv["folds"]:
        share = Counter(cls[i] for i in fold["val"])[1] / len(fold["val"])
        assert 0.15 <= share <= 0.35


def test_official_split_kept():
    doc = _doc(50, official=True)
    splits = make_splits(doc, {"use_official": True, "folds": 1}, 0)
    tags = {c["case_id"]: c["split"] for c in doc["cases"]}
    assert {tags[i] for i in splits["test"]} == {"test"}
    assert {tags[i] for i in splits["folds"][0]["train"]} == {"train"}
    assert {tags[i] for i in splits["folds"][0]["val"]} == {"val"}
    cv = make_splits(doc, {"use_official": True, "folds": 3}, 0)
    assert cv["test"] == splits["test"] and len(cv["folds"]) == 3
    _assert_partition(doc, cv)
    ignored = make_splits(doc, {"use_official": False, "test_fraction": 0.2}, 0)
    assert {tags[i] for i in ignored["test"]} != {"test"}
    for c in doc["cases"]:  # official split without val: carve val out of train
        if c["split"] == "val":
            c["split"] = "train"
    carved = make_splits(doc, {"use_official": True, "val_fraction": 0.2}, 0)
    assert carved["test"] == splits["test"] and carved["folds"][0]["val"]
    _assert_partition(doc, carved)


def test_too_few_patients():
    doc = _doc(6, task="segmentation", patients=lambda i: i // 3)
    with pytest.raises(CapsmedError, match="split.folds is 4 but only"):
        make_splits(doc, {"test_fraction": 0.1, "folds": 4}, 0)
    doc = _doc(2, task="segmentation", patients=lambda i: 0)
    with pytest.raises(CapsmedError, match="needs at least 2 patients"):
        make_splits(doc, {}, 0)
    with pytest.raises(CapsmedError, match="split.folds: 0 is less than the minimum of 1"):
        make_splits(doc, {"folds": 0}, 0)
    with pytest.raises(CapsmedError, match="empty dataset"):
        make_splits({"task": "segmentation", "cases": []}, {}, 0)


def test_load_or_create_is_write_once(tmp_path):
    doc = _doc(30)
    path = tmp_path / "splits.json"
    cfg = {"test_fraction": 0.2, "folds": 1, "val_fraction": 0.2, "use_official": True,
           "fold": 0}
    first = load_or_create_splits(path, doc, cfg, 0)
    assert json.loads(path.read_text()) == first
    mtime = path.stat().st_mtime_ns
    assert load_or_create_splits(path, doc, {**cfg, "fold": 2}, 0) == first  # fold: not a split key
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(CapsmedError, match="delete the file .* or change the results folder"):
        load_or_create_splits(path, doc, {**cfg, "test_fraction": 0.3}, 0)
    with pytest.raises(CapsmedError, match="different split config, seed or case list"):
        load_or_create_splits(path, doc, cfg, 1)
    with pytest.raises(CapsmedError, match="different split config"):
        load_or_create_splits(path, _doc(29), cfg, 0)
    assert json.loads(path.read_text()) == first  # never rewritten
    path.write_text("{oops")
    with pytest.raises(CapsmedError, match="malformed splits file"):
        load_or_create_splits(path, doc, cfg, 0)


def test_fold_cases():
    doc = _doc(5)
    assert [c["case_id"] for c in fold_cases(doc, ["c003", "c001"])] == ["c003", "c001"]
    with pytest.raises(CapsmedError, match="missing from cases.json"):
        fold_cases(doc, ["zzz"])


# --- learning-curve subsets (fraction_cases) -------------------------------------------------


def _cases(n, classes=None, patients=None, task="classification"):
    return _doc(n, task=task, classes=classes, patients=patients)["cases"]


def _ids(cases):
    return {c["case_id"] for c in cases}


def test_fraction_subsets_are_nested_for_one_seed():
    from capsmed.data.splits import fraction_cases

    cases = _cases(61)
    subsets = [_ids(fraction_cases(cases, f, seed=3, task="classification"))
               for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert small < large
    assert subsets[-1] == _ids(cases)
    other_seed = _ids(fraction_cases(cases, 0.25, seed=4, task="classification"))
    assert other_seed != subsets[1]  # the order depends on the seed
    # ... and not on the order the cases come in
    assert _ids(fraction_cases(cases[::-1], 0.25, seed=3, task="classification")) == subsets[1]


@pytest.mark.parametrize(("n", "fraction", "size"),
                         [(7, 0.5, 4), (9, 0.5, 5), (10, 0.25, 3), (11, 0.1, 1), (3, 0.01, 1),
                          (13, 0.3, 4)])
def test_fraction_subset_sizes_round_half_up(n, fraction, size):
    from capsmed.data.splits import fraction_cases

    seg = fraction_cases(_cases(n, task="segmentation"), fraction, seed=0, task="segmentation")
    assert len(seg) == size


def test_fraction_subsets_keep_patients_together():
    from capsmed.data.splits import fraction_cases

    cases = _cases(40, patients=lambda j: j // 3, task="segmentation")  # 3 cases per patient
    for f in (0.1, 0.25, 0.5):
        chosen = fraction_cases(cases, f, seed=1, task="segmentation")
        pats = {c["patient_id"] for c in chosen}
        assert _ids(chosen) == {c["case_id"] for c in cases if c["patient_id"] in pats}
        # the shortest prefix of patients reaching round(f * 40) cases
        target = int(f * 40 + 0.5)
        assert target <= len(chosen) < target + 3


def test_fraction_subsets_are_stratified_by_class():
    from capsmed.data.splits import fraction_cases

    cases = _cases(80, classes=lambda j: int(j % 4 == 0))  # 20 of class 1, 60 of class 0
    for f, expect in ((0.25, (15, 5)), (0.5, (30, 10)), (0.1, (6, 2))):
        counts = Counter(c["class"] for c in fraction_cases(cases, f, seed=2,
                                                             task="classification"))
        assert abs(counts[0] - expect[0]) <= 1 and abs(counts[1] - expect[1]) <= 1
        assert counts[0] + counts[1] == int(f * 80 + 0.5)


def test_fraction_subset_holds_every_class():
    from capsmed.data.splits import fraction_cases

    cases = _cases(50, classes=lambda j: 2 if j == 7 else int(j % 2))  # class 2: one case
    chosen = fraction_cases(cases, 0.02, seed=0, task="classification")
    assert {c["class"] for c in chosen} == {0, 1, 2} and len(chosen) == 3
    # segmentation needs only one case
    assert len(fraction_cases(_cases(50, task="segmentation"), 0.02, seed=0,
                              task="segmentation")) == 1


def test_minority_subset_keeps_the_other_classes_and_thins_the_rarer_one():
    from capsmed.data.splits import fraction_cases

    cases = _cases(60, classes=lambda j: int(j % 4 == 0))  # 15 of class 1 (the rarer), 45 of 0
    subsets = [fraction_cases(cases, f, seed=0, task="classification", minority=True)
               for f in (0.2, 0.5, 1.0)]
    for f, chosen in zip((0.2, 0.5, 1.0), subsets, strict=True):
        counts = Counter(c["class"] for c in chosen)
        assert counts[0] == 45 and counts[1] == int(f * 15 + 0.5)
    assert _ids(subsets[0]) < _ids(subsets[1]) < _ids(subsets[2]) == _ids(cases)
    named = fraction_cases(cases, 0.2, seed=0, task="classification", minority=True,
                           minority_class=0)
    counts = Counter(c["class"] for c in named)
    assert counts == {1: 15, 0: 9}


def test_minority_class_must_be_a_class_of_the_cases():
    from capsmed.data.splits import fraction_cases

    with pytest.raises(CapsmedError, match=r"dataset d: train.minority_class 5 is not a class of "
                                           r"the training cases \(classes 0, 1\)"):
        fraction_cases(_cases(20), 0.5, seed=0, task="classification", minority=True,
                       minority_class=5, where="dataset d")


def test_fraction_cases_argument_checks():
    from capsmed.data.splits import fraction_cases

    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]; got 1.5"):
        fraction_cases(_cases(10), 1.5, seed=0, task="classification")
    with pytest.raises(ValueError, match="needs at least one case"):
        fraction_cases([], 0.5, seed=0, task="classification")
    with pytest.raises(ValueError, match="minority subset is for classification"):
        fraction_cases(_cases(10, task="segmentation"), 0.5, seed=0, task="segmentation",
                       minority=True)
