"""Fixture generator: fake but consistent evaluation files for report tests (no torch needed).

``make_results(root)`` writes, under ``root``, the files of PLAN.md's "Evaluation files" for one 3D
segmentation dataset (``demo_seg3d``: tiny 16x20x12 NIfTI images, labels, predictions, uncertainty
maps) and one 2D classification dataset (``demo_cls2d``: 28x28 NIfTI images, probabilities, capsule
lengths and reconstructions), each with a capsule model and a CNN baseline, plus fingerprints, plans,
splits, histories and train.json files. Two test studies have hostile ids.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from capsmed.evaluate.evidence import evidence_disagreement
from capsmed.evaluate.uncertainty import calibrate, case_uncertainty, tta_cost

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror=alert(1)>'
HOSTILE_IDS = (HOSTILE_SCRIPT, HOSTILE_IMG)

SEG = "demo_seg3d"
CLS = "demo_cls2d"
SEG_MODELS = ("ucaps", "unet")
CLS_MODELS = ("capsnet", "seed_cnn")
SEG_LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
CLS_CLASSES = {"0": "benign", "1": "malignant"}
SPACING = (1.5, 1.0, 2.0)
SHAPE = (16, 20, 12)

# Headline numbers the tests look for, per dataset and model (test stage).
SEG_METRICS = {"ucaps": {"dice": 0.812, "hd95": 3.1, "assd": 0.9},
               "unet": {"dice": 0.834, "hd95": 2.7, "assd": 0.8}}
SEG_CI = {"ucaps": {"dice": [0.78, 0.85], "hd95": [2.4, 3.9]},
          "unet": {"dice": [0.801, 0.866], "hd95": [2.1, 3.3]}}
CLS_METRICS = {"capsnet": {"accuracy": 0.875, "balanced_accuracy": 0.867, "auc": 0.906, "f1": 0.857,
                           "sensitivity": 0.833, "specificity": 0.9, "ece": 0.071},
               "seed_cnn": {"accuracy": 0.75, "balanced_accuracy": 0.733, "auc": 0.844, "f1": 0.7,
                            "sensitivity": 0.667, "specificity": 0.8, "ece": 0.112}}
CLS_CI = {"capsnet": {"auc": [0.712, 0.988], "accuracy": [0.62, 1.0]},
          "seed_cnn": {"auc": [0.61, 0.97], "accuracy": [0.5, 0.94]}}
TRAIN = {"ucaps": {"params": 812345, "flops": 3.2e9, "train_seconds": 3725.0,
                   "peak_memory_mb": 2048.0},
         "unet": {"params": 4_808_917, "flops": 1.1e10, "train_seconds": 1800.0,
                  "peak_memory_mb": 3100.0},
         "capsnet": {"params": 161_000, "flops": 2.1e7, "train_seconds": 320.0,
                     "peak_memory_mb": 400.0},
         "seed_cnn": {"params": 1_200_000, "flops": 1.5e7, "train_seconds": 120.0,
                      "peak_memory_mb": 350.0}}


def safe_name(case_id: str) -> str:
    """File stem for a case id (hostile ids get a hash)."""
    if case_id.replace("_", "").isalnum():
        return case_id
    return "hostile_" + hashlib.md5(case_id.encode()).hexdigest()[:8]


def _save_nifti(path: Path, data: np.ndarray, spacing=SPACING) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing[: data.ndim], *([1.0] * (3 - data.ndim)), 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _history(path: Path, metric: str, rng: np.random.Generator, epochs: int = 6) -> None:
    rows = []
    for e in range(1, epochs + 1):
        rows.append({"epoch": e, "train_loss": round(1.2 / e + rng.uniform(0, 0.02), 4),
                     "val_loss": round(1.3 / e + 0.05 + rng.uniform(0, 0.02), 4),
                     f"val_{metric}": round(0.5 + 0.3 * (1 - 1 / e), 4),
                     "lr": 1e-3 * 0.8 ** (e - 1), "seconds": 12.5})
    _write_csv(path, rows)


def _train_json(path: Path, model: str, seed: int = 0) -> None:
    from capsmed.models import MODEL_REGISTRY

    doc = {"model": model, **TRAIN[model], "family": MODEL_REGISTRY[model].family, "epochs": 6,
           "best_epoch": 5, "seed": seed,
           "versions": {"capsmed": "0.1.0", "torch": "2.13.0", "monai": "1.6.1",
                        "numpy": "2.4.6"},
           "config_hash": "c0ffee" + model, "checkpoint_sha256": "ab" * 32,
           "date": "2026-01-02 03:04"}
    _write_json(path, doc)


def _preprocess(ds_dir: Path, size_divisible: int, fixed_size: int | None) -> None:
    """fingerprint.json and plan.json as ``capsmed preprocess`` writes them (the real writers)."""
    from capsmed.data.fingerprint import compute_fingerprint, make_plan

    cases_doc = json.loads((ds_dir / "data" / "cases.json").read_text())
    fp = compute_fingerprint(cases_doc)
    _write_json(ds_dir / "preprocessed" / "fingerprint.json", fp)
    _write_json(ds_dir / "preprocessed" / "plan.json",
                make_plan(fp, {"preprocess": {"normalization": "zscore"}}, size_divisible,
                          fixed_size))


def _splits(ds_dir: Path, train: list[str], val: list[str], test: list[str]) -> None:
    _write_json(ds_dir / "splits.json", {"seed": 0, "config_hash": "123", "test": test,
                                         "folds": [{"train": train, "val": val}]})


# ----------------------------------------------------------------------------- segmentation


def _blob(centre, radius, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, SPACING, strict=True))
    return d2 <= radius**2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def make_segmentation(root: Path) -> None:
    ds = root / SEG
    rng = np.random.default_rng(1)
    train_ids = [f"case_{i:03d}" for i in range(4)]
    val_ids = ["case_004"]
    test_ids = ["case_005", "case_006", HOSTILE_SCRIPT, HOSTILE_IMG]
    all_ids = train_ids + val_ids + test_ids
    images, labels = {}, {}
    for n, cid in enumerate(all_ids):
        centre = (8 + n % 3 - 1, 10 + (n % 2), 6)
        lab = np.zeros(SHAPE, np.uint8)
        lab[_blob(centre, 4.5 + 0.3 * n)] = 1
        lab[_blob((centre[0], centre[1] + 3, centre[2]), 2.5)] = 2
        img = rng.normal(100, 10, SHAPE).astype(np.float32) + 80 * (lab > 0)
        images[cid] = _save_nifti(ds / "data" / "images" / f"{safe_name(cid)}.nii.gz", img)
        labels[cid] = _save_nifti(ds / "data" / "labels" / f"{safe_name(cid)}.nii.gz", lab)
    _write_json(ds / "data" / "cases.json", {
        "task": "segmentation", "spatial_dims": 3, "labels": SEG_LABELS, "modality": "MRI",
        "cases": [{"case_id": c, "image": images[c], "label": labels[c], "patient_id": c}
                  for c in all_ids]})
    _splits(ds, train_ids, val_ids, test_ids)
    _preprocess(ds, size_divisible=8, fixed_size=None)
    stages = {"train": train_ids, "val": val_ids, "test": test_ids}
    for m_i, model in enumerate(SEG_MODELS):
        mdir = ds / "models" / model
        _train_json(mdir / "train.json", model)
        _history(mdir / "history.csv", "dice", rng)
        for stage, ids in stages.items():
            edir = ds / "eval" / model / stage
            rows = []
            for n, cid in enumerate(ids):
                lab = np.asarray(nib.load(labels[cid]).dataobj)
                pred = np.roll(lab, shift=m_i + (n % 2) + (stage == "val"), axis=0)
                if stage == "test" and n == 1:
                    pred[pred == 2] = 0  # missed structure -> infinite HD95
                stem = safe_name(cid)
                _save_nifti(edir / "predictions" / f"{stem}.nii.gz", pred.astype(np.uint8))
                unc, unc_cols = "", {}
                if model == "ucaps" and stage in ("val", "test"):
                    u = np.clip(np.abs(pred.astype(float) - lab) * 0.6
                                + rng.uniform(0, 0.05, SHAPE), 0, 1).astype(np.float32)
                    unc = _save_nifti(edir / "predictions" / f"{stem}_uncertainty.nii.gz", u)
                    # the evaluation's own summaries, from per-pass label maps (shifted copies)
                    passes = [np.roll(pred, s, axis=1) for s in (0, 1, -1, 0)]
                    counts = np.stack([np.bincount(p.ravel(), minlength=3) for p in passes])
                    unc_cols = case_uncertainty(u, pred, lab, counts,
                                                float(np.prod(SPACING)) / 1000,
                                                {1: "anterior", 2: "posterior"})
                voxel_ml = float(np.prod(SPACING)) / 1000
                row = {"case_id": cid, "image": images[cid], "label": labels[cid],
                       "prediction": f"predictions/{stem}.nii.gz"}
                dices, hds = [], []
                for k, name in ((1, "anterior"), (2, "posterior")):
                    d = _dice(pred == k, lab == k)
                    hd = float("inf") if not (pred == k).any() else round(1.0 + n + k * 0.5, 2)
                    row[f"dice_{name}"], row[f"hd95_{name}"] = round(d, 4), hd
                    dices.append(d)
                    hds.append(hd)
                row["dice"] = round(float(np.mean(dices)), 4)
                row["hd95"] = float(np.mean(hds))
                row["assd"] = round(0.5 + 0.1 * n, 3)
                for k, name in ((1, "anterior"), (2, "posterior")):
                    pv, tv = (pred == k).sum() * voxel_ml, (lab == k).sum() * voxel_ml
                    row[f"volume_ml_{name}"] = round(float(pv), 4)
                    row[f"volume_true_ml_{name}"] = round(float(tv), 4)
                    row[f"volume_error_ml_{name}"] = round(float(pv - tv), 4)
                row["uncertainty"] = unc
                row.update(unc_cols)
                if stage == "test":
                    row.update(_evidence_maps(edir / "predictions" / stem, model, pred, lab))
                rows.append(row)
            calibration = calibrate(rows) if stage == "val" else None
            rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
            _write_csv(edir / "cases.csv", rows)
            base = SEG_METRICS[model] if stage == "test" else {
                "dice": 0.9 - 0.05 * STAGE_INDEX[stage], "hd95": 2.0, "assd": 0.6}
            metrics = {**base, "dice_anterior": base["dice"] + 0.01,
                       "dice_posterior": base["dice"] - 0.01}
            _write_json(edir / "metrics.json", {
                "dataset": SEG, "model": model, "stage": stage, "task": "segmentation",
                "n_cases": len(ids), "metrics": metrics,
                "ci95": SEG_CI[model] if stage == "test" else {},
                "cost": {"inference_seconds_per_case": 0.42 + m_i, "peak_memory_mb": 900.0,
                         **(tta_cost([[0.1, 0.11, 0.1, 0.12]]) if model == "ucaps" else {})},
                "labels": SEG_LABELS,
                "evidence_kind": "capsule lengths" if model == "ucaps" else "softmax",
                **({"uncertainty_calibration": calibration} if calibration else {})})


STAGE_INDEX = {"train": 0, "val": 1, "test": 2}


def _evidence_maps(stem: Path, model: str, pred: np.ndarray, lab: np.ndarray) -> dict:
    """Channels-last evidence and probability maps as ``capsmed evaluate`` saves them.

    ``ucaps``: capsule lengths at 1/4 resolution (blocks of 4 voxels) from the true labels, so they
    disagree with the (shifted) prediction; ``unet``: its softmax, equal to its probabilities.
    """
    onehot = np.stack([pred == k for k in range(3)]).astype(np.float32)
    probs = 0.1 + 0.7 * onehot
    if model == "ucaps":
        coarse = np.stack([lab == k for k in range(3)]).astype(np.float32)[:, ::4, ::4, ::4]
        evidence = 0.05 + 0.85 * np.repeat(np.repeat(np.repeat(coarse, 4, 1), 4, 2), 4, 3)[
            :, :SHAPE[0], :SHAPE[1], :SHAPE[2]]
    else:
        evidence = probs
    out = {"evidence": _save_nifti(Path(f"{stem}_evidence.nii.gz"), np.moveaxis(evidence, 0, -1)),
           "probability_maps": _save_nifti(Path(f"{stem}_probs.nii.gz"),
                                           np.moveaxis(probs, 0, -1))}
    if model == "ucaps":
        out["evidence_disagreement"] = evidence_disagreement(evidence, pred)
    return out


# ----------------------------------------------------------------------------- classification


def make_classification(root: Path) -> None:
    ds = root / CLS
    rng = np.random.default_rng(2)
    train_ids = [f"img_{i:03d}" for i in range(6)]
    val_ids = [f"img_{i:03d}" for i in range(6, 8)]
    test_ids = [f"img_{i:03d}" for i in range(8, 12)] + list(HOSTILE_IDS)
    all_ids = train_ids + val_ids + test_ids
    truth = {cid: i % 2 for i, cid in enumerate(all_ids)}
    images = {}
    yy, xx = np.mgrid[:28, :28]
    for cid in all_ids:
        img = rng.uniform(0, 60, (28, 28)) + 150 * (((yy - 14) ** 2 + (xx - 14) ** 2)
                                                    < (25 + 40 * truth[cid]))
        images[cid] = _save_nifti(ds / "data" / "images" / f"{safe_name(cid)}.nii.gz",
                                  img.astype(np.float32), spacing=(1.0, 1.0))
    _write_json(ds / "data" / "cases.json", {
        "task": "classification", "spatial_dims": 2, "classes": CLS_CLASSES,
        "modality": "other",
        "cases": [{"case_id": c, "image": images[c], "class": truth[c], "patient_id": c}
                  for c in all_ids]})
    _splits(ds, train_ids, val_ids, test_ids)
    _preprocess(ds, size_divisible=1, fixed_size=28)
    stages = {"train": train_ids, "val": val_ids, "test": test_ids}
    for m_i, model in enumerate(CLS_MODELS):
        mdir = ds / "models" / model
        _train_json(mdir / "train.json", model)
        _history(mdir / "history.csv", "auc", rng)
        for stage, ids in stages.items():
            edir = ds / "eval" / model / stage
            rows = []
            for cid in ids:
                t = truth[cid]
                p1 = float(np.clip(0.8 * t + 0.1 + rng.normal(0, 0.2 + 0.1 * m_i), 0.02, 0.98))
                pred = int(p1 >= 0.5)
                row = {"case_id": cid, "image": images[cid], "class": t, "predicted": pred,
                       "confidence": round(max(p1, 1 - p1), 4), "prob_0": round(1 - p1, 4),
                       "prob_1": round(p1, 4)}
                if model == "capsnet":
                    row["length_0"] = round(0.9 * (1 - p1), 4)
                    row["length_1"] = round(0.9 * p1, 4)
                    recon = edir / "predictions" / f"{safe_name(cid)}_recon.npy"
                    recon.parent.mkdir(parents=True, exist_ok=True)
                    img = np.asarray(nib.load(images[cid]).dataobj, dtype=np.float32)
                    np.save(recon, (img / img.max())[None] * 0.9)
                    row["reconstruction"] = str(recon)
                rows.append(row)
            _write_csv(edir / "cases.csv", rows)
            base = CLS_METRICS[model] if stage == "test" else {
                "accuracy": 0.95, "auc": 0.97, "ece": 0.05}
            _write_json(edir / "metrics.json", {
                "dataset": CLS, "model": model, "stage": stage, "task": "classification",
                "n_cases": len(ids), "metrics": base,
                "ci95": CLS_CI[model] if stage == "test" else {},
                "cost": {"inference_seconds_per_case": 0.004 * (m_i + 1), "peak_memory_mb": 120},
                "classes": CLS_CLASSES, "confusion_matrix": [[4, 1], [1, 4]],
                "reliability": {"bin_confidence": [0.55, 0.65, 0.75, 0.85, 0.95],
                                "bin_accuracy": [0.5, 0.6, 0.8, 0.8, 1.0],
                                "bin_count": [2, 1, 2, 3, 2]},
                "roc": {"fpr": [0, 0, 0.2, 0.4, 1], "tpr": [0, 0.5, 0.8, 1, 1]},
                "pr": {"precision": [1, 1, 0.8, 0.71, 0.5], "recall": [0, 0.5, 0.8, 1, 1]}})


def make_results(root: Path) -> Path:
    """Write both fake datasets under ``root`` and return it."""
    make_segmentation(root)
    make_classification(root)
    return root


@pytest.fixture(scope="session")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with evaluation files for two datasets (nothing rendered yet)."""
    return make_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="session")
def rendered(results_root: Path) -> dict:
    """Render every report once (as the CLI does) and return the paths and the summary."""
    from capsmed.report import (
        write_comparison_report,
        write_index,
        write_qc_report,
        write_stage_report,
        write_study_reports,
    )

    out: dict = {"stage": {}, "studies": {}, "qc": {}, "comparison": {}}
    summary: dict = {"datasets": {}}
    for ds, task, models in ((SEG, "segmentation", SEG_MODELS),
                             (CLS, "classification", CLS_MODELS)):
        out["qc"][ds] = write_qc_report(results_root, ds)
        out["comparison"][ds] = write_comparison_report(results_root, ds, list(models))
        ds_doc = {"task": task, "models": {}}
        for model in models:
            train = json.loads((results_root / ds / "models" / model / "train.json").read_text())
            m_doc = {"family": train["family"], "params": train["params"], "flops": train["flops"],
                     "stages": {}, "studies": {}}
            for stage in ("train", "val", "test"):
                path = write_stage_report(results_root, ds, model, stage)
                out["stage"][(ds, model, stage)] = path
                doc = json.loads((results_root / ds / "eval" / model / stage /
                                  "metrics.json").read_text())
                m_doc["stages"][stage] = {"metrics": doc["metrics"], "ci95": doc["ci95"],
                                          "n_cases": doc["n_cases"],
                                          "report": path.relative_to(results_root).as_posix()}
            studies = write_study_reports(results_root, ds, model, "test")
            out["studies"][(ds, model)] = studies
            m_doc["studies"] = {cid: p.relative_to(results_root).as_posix()
                                for cid, p in studies.items()}
            ds_doc["models"][model] = m_doc
        if ds == SEG:  # as capsmed summarize writes it; the other dataset relies on the files
            ds_doc["comparison"] = f"{ds}/reports/comparison.html"
            ds_doc["qc"] = f"{ds}/reports/qc.html"
        summary["datasets"][ds] = ds_doc
    (results_root / "summary.json").write_text(json.dumps(summary))
    out["summary"] = summary
    out["index"] = write_index(results_root, summary)
    out["root"] = results_root
    return out


@pytest.fixture(scope="session")
def facts() -> SimpleNamespace:
    """The constants the fixture files were written with (expected values for assertions)."""
    return SimpleNamespace(
        HOSTILE_IDS=HOSTILE_IDS, HOSTILE_SCRIPT=HOSTILE_SCRIPT, HOSTILE_IMG=HOSTILE_IMG, SEG=SEG,
        CLS=CLS, SEG_MODELS=SEG_MODELS, CLS_MODELS=CLS_MODELS, SEG_METRICS=SEG_METRICS,
        SEG_CI=SEG_CI, CLS_METRICS=CLS_METRICS, CLS_CI=CLS_CI, TRAIN=TRAIN, SHAPE=SHAPE,
        SPACING=SPACING, safe_name=safe_name, save_nifti=_save_nifti)


@pytest.fixture(scope="session")
def generalisation_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real tiny runs with shifted stages, summarised and drawn by the CLI (one per task).

    ``{task: (config, config path, generalisation page)}``; see ``generalisation_runs.py``.
    """
    from capsmed.paths import Layout
    from tests.pipeline_helpers import run_cli
    from tests.report.generalisation_runs import build_run

    out = {}
    for task in ("segmentation", "classification"):
        cfg, path = build_run(tmp_path_factory.mktemp(f"gen-{task}"), task)
        assert run_cli("-q", "report-generalisation", "-c", path, "-d", "ds") == 0
        out[task] = (cfg, path, Layout(Path(cfg["results"])).generalisation_report("ds"))
    return out
