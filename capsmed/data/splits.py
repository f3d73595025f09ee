"""Train / validation / test splits grouped by patient, deterministic by seed, written once.

Order of decisions (:func:`make_splits`):

1. Official split: when ``use_official`` (default true) and cases carry ``"split"`` (MedMNIST), the
   cases marked ``test`` are the test set; the rest is the development pool. With ``folds == 1`` the
   official ``train``/``val`` cases form the one fold (a validation part is carved out of ``train``
   when there is no ``val``).
2. Otherwise a held-out test set of about ``test_fraction`` of the patients: classification uses the
   first fold of a shuffled ``StratifiedGroupKFold`` with ``round(1 / test_fraction)`` folds (class
   balance kept), segmentation a ``GroupShuffleSplit``.
3. The development pool is then split into ``folds`` cross-validation folds
   (``StratifiedGroupKFold`` for classification, shuffled ``GroupKFold`` for segmentation) or, with
   ``folds == 1``, one train/validation split with ``val_fraction`` (same method as step 2).

Cases are grouped by ``patient_id``: no patient is ever on both sides of a split. The split file
records a hash of the split config, the seed and the cases; :func:`load_or_create_splits` refuses to
reuse a file made from different inputs rather than silently rewriting it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.config import dataset_defaults, dataset_schema_problems
from capsmed.data._io import json_dumps, stable_hash, write_text_if_changed
from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

#: The split keys that change a split (``fold`` and ``cross_validate`` only choose what to train).
SPLIT_KEYS = ("test_fraction", "folds", "val_fraction", "use_official")


def _normalise_cfg(split_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The split keys of a ``split`` block, checked by the config schema, defaults from it."""
    given = {k: v for k, v in (split_cfg or {}).items() if v is not None}
    problems = dataset_schema_problems({"split": given})
    if problems:
        raise CapsmedError("\n".join(problems))
    defaults = dataset_defaults("split")
    return {k: given.get(k, defaults[k]) for k in SPLIT_KEYS}


def split_config_hash(cases_doc: Mapping[str, Any], split_cfg: Mapping[str, Any] | None,
                      seed: int) -> str:
    """Hash of everything a split depends on: split config (defaults filled), seed and cases."""
    cfg = _normalise_cfg(split_cfg)
    cases = [[c["case_id"], c.get("patient_id", c["case_id"]), c.get("class"), c.get("split")]
             for c in cases_doc["cases"]]
    return stable_hash({"split": cfg, "seed": int(seed), "task": cases_doc.get("task"),
                        "cases": cases})


def _holdout(idx: np.ndarray, groups: np.ndarray, y: np.ndarray | None, fraction: float,
             seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``idx`` into (keep, held out) with about ``fraction`` of the groups held out.

    Stratified by ``y`` (classification) with ``StratifiedGroupKFold``; else ``GroupShuffleSplit``.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise CapsmedError(f"dataset config: split.{what} needs at least 2 patients to split, "
                           f"the dataset has {n_groups}")
    if y is not None:
        n_splits = min(max(2, round(1 / fraction)), n_groups)
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            keep, held = next(sgkf.split(idx, y[idx], groups[idx]))
    else:
        gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        keep, held = next(gss.split(idx, groups=groups[idx]))
    return idx[keep], idx[held]


def _kfold(idx: np.ndarray, groups: np.ndarray, y: np.ndarray | None, folds: int,
           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(np.unique(groups[idx]))
    if n_groups < folds:
        raise CapsmedError(f"dataset config: split.folds is {folds} but only {n_groups} "
                           "patients remain after the test split")
    if y is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            parts = list(splitter.split(idx, y[idx], groups[idx]))
    else:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = list(splitter.split(idx, groups=groups[idx]))
    return [(idx[tr], idx[va]) for tr, va in parts]


def make_splits(cases_doc: Mapping[str, Any], split_cfg: Mapping[str, Any] | None,
                seed: int) -> dict:
    """Make the test set and the train/validation folds of a dataset.

    Args:
        cases_doc: the ``cases.json`` document (cases with ``case_id``, ``patient_id``, and
            ``class`` for classification, ``split`` for official splits).
        split_cfg: ``{"test_fraction": 0.2, "folds": 1, "val_fraction": 0.2,
            "use_official": true}`` (missing keys take these defaults).
        seed: random seed (scikit-learn ``random_state``).

    Returns:
        ``{"seed", "config_hash", "test": [case ids], "folds": [{"train": [...], "val": [...]},
        ...]}``; ids are sorted; one fold when ``folds == 1``.

    Raises:
        CapsmedError: too few patients for the requested split, or bad split values.
    """
    cfg = _normalise_cfg(split_cfg)
    cases = list(cases_doc["cases"])
    if not cases:
        raise CapsmedError("cases.json: empty dataset: nothing to split")
    ids = np.array([c["case_id"] for c in cases])
    groups = np.array([str(c.get("patient_id") or c["case_id"]) for c in cases])
    y = np.array([int(c["class"]) for c in cases]) if cases_doc.get("task") == "classification" \
        and all("class" in c for c in cases) else None
    folds = int(cfg["folds"])
    all_idx = np.arange(len(cases))
    official = bool(cfg["use_official"]) and any("split" in c for c in cases)
    fold_parts: list[tuple[np.ndarray, np.ndarray]]
    if official:
        tags = np.array([c.get("split", "train") for c in cases])
        test_idx = all_idx[tags == "test"]
        pool = all_idx[tags != "test"]
        if folds == 1 and (tags[pool] == "val").any():
            fold_parts = [(pool[tags[pool] != "val"], pool[tags[pool] == "val"])]
        elif folds == 1:
            fold_parts = [_holdout(pool, groups, y, float(cfg["val_fraction"]), seed,
                                   "val_fraction")]
        else:
            fold_parts = _kfold(pool, groups, y, folds, seed)
    else:
        pool, test_idx = _holdout(all_idx, groups, y, float(cfg["test_fraction"]), seed,
                                  "test_fraction")
        if folds == 1:
            fold_parts = [_holdout(pool, groups, y, float(cfg["val_fraction"]), seed + 1,
                                   "val_fraction")]
        else:
            fold_parts = _kfold(pool, groups, y, folds, seed)
    out = {"seed": int(seed), "config_hash": split_config_hash(cases_doc, split_cfg, seed),
           "test": sorted(ids[test_idx].tolist()),
           "folds": [{"train": sorted(ids[tr].tolist()), "val": sorted(ids[va].tolist())}
                     for tr, va in fold_parts]}
    logger.info("splits: %d test, %s", len(out["test"]),
                ", ".join(f"fold {i}: {len(f['train'])} train / {len(f['val'])} val"
                          for i, f in enumerate(out["folds"])))
    return out


def load_or_create_splits(path: str | os.PathLike, cases_doc: Mapping[str, Any],
                          split_cfg: Mapping[str, Any] | None, seed: int) -> dict:
    """Read the split file, or make and write it when absent (write-once).

    Args:
        path: the splits file (``results/{ds}/splits.json``).
        cases_doc: the ``cases.json`` document.
        split_cfg: the dataset config's ``split`` mapping.
        seed: random seed.

    Returns:
        The splits document.

    Raises:
        CapsmedError: the file exists but was made from a different split config, seed or case
            list (it is never rewritten silently), or it is malformed.
    """
    p = Path(path)
    expected = split_config_hash(cases_doc, split_cfg, seed)
    if p.exists():
        try:
            doc = json.loads(p.read_text())
            found = doc["config_hash"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CapsmedError(f"{p}: malformed splits file ({exc}); delete it to make new "
                               "splits") from exc
        if found != expected:
            raise CapsmedError(
                f"{p}: was made from a different split config, seed or case list (config_hash "
                f"{found}, now {expected}); delete the file to make new splits (earlier results "
                "then no longer match) or change the results folder")
        return doc
    doc = make_splits(cases_doc, split_cfg, seed)
    write_text_if_changed(p, json_dumps(doc))
    return doc


def stage_case_ids(splits: Mapping[str, Any], stage: str, fold: int) -> list[str]:
    """The case ids of a dataset stage (``train``, ``val`` or ``test``) of one fold.

    Args:
        splits: ``splits.json`` content.
        stage: stage name.
        fold: fold index (0 with one fold).

    Returns:
        Case ids in split order.
    """
    return list(splits["test"] if stage == "test" else splits["folds"][fold][stage])


def stage_cases(cases_doc: Mapping[str, Any], splits: Mapping[str, Any], stage: str,
                fold: int) -> list[dict]:
    """The case dicts of a dataset stage of one fold, in split order (see :func:`fold_cases`)."""
    return fold_cases(cases_doc, stage_case_ids(splits, stage, fold))


def fold_cases(cases_doc: Mapping[str, Any], ids: Sequence[str]) -> list[dict]:
    """The case dicts of ``ids`` (e.g. ``splits["folds"][0]["train"]``), in ``ids`` order.

    Raises:
        CapsmedError: an id is not in the cases document (splits and cases.json disagree).
    """
    by_id = {c["case_id"]: c for c in cases_doc["cases"]}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise CapsmedError(
            f"splits.json names cases missing from cases.json: {', '.join(missing[:5])}; "
            "the dataset changed since the split was written")
    return [by_id[i] for i in ids]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def minority_class_of(cases: Sequence[Mapping[str, Any]]) -> int:
    """The rarer class of ``cases`` (fewest cases; the lower index on a tie)."""
    counts: dict[int, int] = {}
    for c in cases:
        counts[int(c["class"])] = counts.get(int(c["class"]), 0) + 1
    return min(counts, key=lambda k: (counts[k], k))


def _subset_order(groups: list[str], strata: list[int], seed: int) -> list[str]:
    """One fixed order of the patients, whose every prefix is stratified (see fraction_cases)."""
    order = np.random.default_rng(seed).permutation(len(groups))
    by_stratum: dict[int, list[int]] = {}
    for pos in order:
        by_stratum.setdefault(strata[pos], []).append(int(pos))
    keys = {}
    for members in by_stratum.values():
        for rank, pos in enumerate(members):
            keys[pos] = rank / len(members)
    tie = {int(pos): i for i, pos in enumerate(order)}
    return [groups[p] for p in sorted(keys, key=lambda p: (keys[p], tie[p]))]


def fraction_cases(cases: Sequence[Mapping[str, Any]], fraction: float, *, seed: int, task: str,
                   minority: bool = False, minority_class: int | None = None,
                   where: str = "training cases") -> list[dict]:
    """A learning-curve subset of a fold's training cases: nested, grouped, stratified.

    Cases are grouped by patient (``patient_id``, else ``case_id``, as :func:`make_splits` groups
    them): a patient's cases are in or out together. The patients are put in one fixed order per
    ``seed`` (a ``numpy`` permutation of the sorted patient ids) and a subset is the shortest
    prefix of that order that holds ``n = max(1, floor(fraction * N + 1/2))`` of the ``N`` cases,
    so the subsets of one seed are nested: the 0.1 subset lies inside the 0.25 one, which lies
    inside the 0.5 one. With one case per patient, a subset has exactly ``n`` cases (7 cases at
    0.5: 4).

    Classification is stratified: within each class (of a patient: its most frequent class, the
    lower index on a tie) the patients keep the permutation's order, the ``r``-th of ``n_c`` gets
    the key ``r / n_c``, and the order sorts by key (ties by permutation position). Every prefix
    then holds each class in proportion (to within one patient), and the first ones hold one
    patient of every class: a classification subset holds at least one case per class.

    ``minority``: the class-imbalance subset. Every case of the other classes is kept, and of the
    minority class (``minority_class``, default :func:`minority_class_of` the cases) the shortest
    prefix of its patients, in the permutation's order, with ``max(1, floor(fraction * N_min +
    1/2))`` of its ``N_min`` cases (nested likewise); a patient's minority cases go in or out
    together.

    Args:
        cases: The fold's training cases (``case_id``, optional ``patient_id``, ``class`` for
            classification).
        fraction: The share in (0, 1]; 1 keeps every case.
        seed: The config's seed.
        task: ``segmentation`` or ``classification``.
        minority: Make the class-imbalance subset (classification only).
        minority_class: The class thinned out by ``minority`` (None: the rarer one).
        where: What the cases are, for messages (e.g. ``"dataset X, fold 0"``).

    Returns:
        The chosen cases, in the order of ``cases``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], no cases, or ``minority`` for segmentation.
        CapsmedError: ``minority_class`` is not a class of the cases.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    if not cases:
        raise ValueError("fraction_cases needs at least one case")
    classify = task == "classification"
    if minority and not classify:
        raise ValueError("the minority subset is for classification; the task is " + task)

    def patient(c: Mapping[str, Any]) -> str:
        return str(c.get("patient_id") or c["case_id"])

    if minority:
        classes = sorted({int(c["class"]) for c in cases})
        chosen = minority_class_of(cases) if minority_class is None else int(minority_class)
        if chosen not in classes:
            raise CapsmedError(f"{where}: train.minority_class {chosen} is not a class of the "
                               f"training cases (classes {', '.join(map(str, classes))})")
        pool = [c for c in cases if int(c["class"]) == chosen]
    else:
        pool = list(cases)
    members: dict[str, list[Mapping[str, Any]]] = {}
    for c in pool:
        members.setdefault(patient(c), []).append(c)
    groups = sorted(members)
    if classify and not minority:
        strata = []
        for g in groups:
            counts: dict[int, int] = {}
            for c in members[g]:
                counts[int(c["class"])] = counts.get(int(c["class"]), 0) + 1
            strata.append(max(counts, key=lambda k: (counts[k], -k)))
    else:
        strata = [0] * len(groups)
    target = max(1, _round_half_up(fraction * len(pool)))
    need_strata = len(set(strata)) if classify and not minority else 1
    keep: set[str] = set()
    count = 0
    for i, g in enumerate(_subset_order(groups, strata, seed)):
        if count >= target and i >= need_strata:
            break
        keep.add(g)
        count += len(members[g])
    chosen_ids = {c["case_id"] for g in keep for c in members[g]}
    if minority:  # every case of the other classes
        chosen_ids |= {c["case_id"] for c in cases if int(c["class"]) != chosen}
    out = [dict(c) for c in cases if c["case_id"] in chosen_ids]
    logger.info("%s: %s subset %s: %d of %d cases", where, "minority" if minority else "fraction",
                fraction, len(out), len(cases))
    return out
