"""Dataset sources: turn a dataset config into ``cases.json`` (PLAN.md, "Data API").

``prepare_dataset`` validates the source (every problem at once), materialises the synthetic demo
and MedMNIST archives as NIfTI under ``out_dir/images`` (and ``out_dir/labels``), and references
file-based sources (MSD folders, CSV manifests, DICOM folders) in place, never copying or changing
them; a ``dicomweb`` source's series are retrieved once into ``out_dir/dicomweb`` and then read as
a ``dicom`` source. It writes ``out_dir/cases.json``::

    {"task": "segmentation" | "classification",
     "spatial_dims": 2 | 3,
     "labels": {"0": "background", "1": ...}        # segmentation
     "label_codes": {"1": {"category", "type", "modifier"?}}  # when the config gives SNOMED codes
     "classes": {"0": "...", "1": "..."}            # classification
     "modality": "MRI" | "CT" | "US" | "other",
     "cases": [{"case_id", "image", "label" | "class", "patient_id", "split"?}, ...]}

Running it again with the same config and seed rewrites nothing (a small ``materialised.json``
records what was written; files are only regenerated when it differs or a file is missing).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsmed.data._io import json_dumps, save_nifti, stable_hash, write_text_if_changed
from capsmed.data.labels import label_codes
from capsmed.data.validate import Scan, normalise_config, scan_config
from capsmed.errors import CapsmedError

logger = logging.getLogger(__name__)

CASES_FILE = "cases.json"
MARKER_FILE = "materialised.json"


def _raise_problems(ds_cfg: Mapping[str, Any], problems: list[str]) -> None:
    where = ds_cfg.get("path") if isinstance(ds_cfg, Mapping) else None
    head = f"dataset {where}" if where else "dataset config"
    raise CapsmedError(f"{head}: {len(problems)} problem(s):\n" + "\n".join(
        f"  {line}" for line in problems))


def _marker_ok(out_dir: Path, key: str, cases: list[dict]) -> bool:
    """Whether ``out_dir`` already holds exactly the files of ``key`` (same config, all present)."""
    marker = out_dir / MARKER_FILE
    try:
        if json.loads(marker.read_text()).get("key") != key:
            return False
    except (OSError, ValueError):
        return False
    return all(Path(c["image"]).is_file() and ("label" not in c or Path(c["label"]).is_file())
               for c in cases)


def _finish_materialised(out_dir: Path, key: str, cases: list[dict]) -> None:
    """Record what was written and remove NIfTI files of an earlier, different materialisation."""
    keep = {Path(c[k]).name for c in cases for k in ("image", "label") if k in c}
    for sub in ("images", "labels"):
        folder = out_dir / sub
        if folder.is_dir():
            for f in folder.glob("*.nii.gz"):
                if f.name not in keep:
                    f.unlink()
    write_text_if_changed(out_dir / MARKER_FILE, json_dumps({"key": key, "n_cases": len(cases)}))


def _synthetic_cases(ds_cfg: Mapping[str, Any], scan: Scan, out_dir: Path, seed: int) -> list[dict]:
    from capsmed.data.synthetic import class_sequence, write_synthetic_dataset

    syn = dict(ds_cfg.get("synthetic") or {})
    size = list(syn["size"])  # normalise_config filled in the schema's defaults
    n = int(syn["num_cases"])
    if ds_cfg.get("max_cases"):
        n = min(n, int(ds_cfg["max_cases"]))
    k = int(syn["num_classes"])
    s = int(syn.get("seed", seed))
    noise = float(syn["noise"])
    task = scan.task or "segmentation"
    key = stable_hash({"kind": "synthetic", "task": task, "size": size, "n": n, "k": k, "seed": s,
                       "noise": noise, "version": 1})
    cases = []
    classes = class_sequence(n, k, s) if task == "classification" else None
    for i in range(n):
        cid = f"case_{i:03d}"
        case: dict[str, Any] = {"case_id": cid,
                                "image": str((out_dir / "images" / f"{cid}.nii.gz").resolve())}
        if classes is None:
            case["label"] = str((out_dir / "labels" / f"{cid}.nii.gz").resolve())
        else:
            case["class"] = classes[i]
        case["patient_id"] = cid
        cases.append(case)
    if _marker_ok(out_dir, key, cases):
        logger.info("synthetic data in %s is up to date", out_dir)
        return cases
    written = write_synthetic_dataset(task, size, n, k, s, noise, out_dir)
    assert written == cases
    _finish_materialised(out_dir, key, cases)
    return cases


def _npz_cases(scan: Scan, out_dir: Path) -> list[dict]:
    st = scan.path.stat()
    key = stable_hash({"kind": "medmnist", "path": str(scan.path), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "ids": [c["case_id"] for c in scan.cases],
                       "version": 1})
    cases = []
    for c in scan.cases:
        case = {"case_id": c["case_id"],
                "image": str((out_dir / "images" / f"{c['case_id']}.nii.gz").resolve()),
                "class": c["class"], "patient_id": c["patient_id"], "split": c["split"]}
        cases.append(case)
    if _marker_ok(out_dir, key, cases):
        logger.info("MedMNIST data in %s is up to date", out_dir)
        return cases
    assert scan.arrays is not None
    for c, case in zip(scan.cases, cases, strict=True):
        images, _ = scan.arrays[c["split"]]
        save_nifti(images[c["index"]], Path(case["image"]))
    _finish_materialised(out_dir, key, cases)
    logger.info("wrote %d MedMNIST images from %s under %s", len(cases), scan.path, out_dir)
    return cases


def _cache_dicomweb(ds_cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Source ``dicomweb``: retrieve the listed series once, then read them as a ``dicom`` source.

    The series go to ``out_dir/dicomweb`` (see :func:`capsmed.data.dicomweb.cache_dicomweb_dataset`).
    """
    from capsmed.data._io import resolve
    from capsmed.data.dicomweb import cache_dicomweb_dataset

    if not ds_cfg.get("path") or not ds_cfg.get("dicomweb_url"):
        raise CapsmedError("dataset config: source dicomweb needs 'path' (a CSV of study/series "
                           "UIDs) and 'dicomweb_url'")
    manifest = cache_dicomweb_dataset(resolve(ds_cfg["path"]), str(ds_cfg["dicomweb_url"]),
                                      out_dir / "dicomweb")
    return {**{k: v for k, v in ds_cfg.items() if k != "dicomweb_url"}, "source": "dicom",
            "path": str(manifest)}


def prepare_dataset(ds_cfg: Mapping[str, Any], out_dir: str | os.PathLike, seed: int) -> dict:
    """Validate a dataset source, materialise it if needed and write ``out_dir/cases.json``.

    Args:
        ds_cfg: the dataset config (``source``, ``task``, ``spatial_dims``, ``path``,
            ``modality``, ``labels``, ``classes``, ``synthetic``, ``preprocess``, ``split``,
            ``max_cases``); relative paths are resolved against the working directory.
            ``max_cases`` keeps the first N cases (MedMNIST: the first ones of each official split,
            in proportion).
        out_dir: the dataset's data folder (e.g. ``results/{ds}/data``); created.
        seed: run seed; the synthetic generator uses ``synthetic.seed`` when set, else this.

    Returns:
        The cases document that was written (see the module docstring).

    Raises:
        CapsmedError: the config or the data has problems; the message lists every one, one per
            line, naming the file.
    """
    if isinstance(ds_cfg, Mapping) and ds_cfg.get("source") == "dicomweb":
        ds_cfg = _cache_dicomweb(ds_cfg, Path(out_dir).resolve())
    ds_cfg = normalise_config(ds_cfg) if isinstance(ds_cfg, Mapping) else ds_cfg
    problems, scan = scan_config(ds_cfg)
    if problems or scan is None:
        _raise_problems(ds_cfg, problems or ["dataset config: cannot be read"])
    assert scan is not None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if scan.kind == "synthetic":
        cases = _synthetic_cases(ds_cfg, scan, out, seed)
    elif scan.kind == "medmnist":
        cases = _npz_cases(scan, out)
    else:
        cases = [dict(c) for c in scan.cases]
    task = scan.task or ds_cfg.get("task")
    doc: dict[str, Any] = {"task": task, "spatial_dims": scan.spatial_dims}
    if task == "segmentation":
        doc["labels"] = scan.labels
        codes = label_codes(ds_cfg.get("labels") if isinstance(ds_cfg, Mapping) else None)
        if codes:  # the SEG's coded concepts (capsmed.data.labels); the names stay plain
            doc["label_codes"] = {str(k): v for k, v in codes.items()}
    else:
        doc["classes"] = scan.classes
    doc["modality"] = scan.modality
    doc["cases"] = cases
    if write_text_if_changed(out / CASES_FILE, json_dumps(doc)):
        logger.info("wrote %s (%d cases)", out / CASES_FILE, len(cases))
    return doc


def load_cases(path: str | os.PathLike) -> dict:
    """Read a ``cases.json`` written by :func:`prepare_dataset`.

    Args:
        path: the ``cases.json`` file or the folder holding it.

    Returns:
        The cases document.

    Raises:
        CapsmedError: the file is missing or malformed.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CASES_FILE
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise CapsmedError(f"{p}: cannot be read ({exc}); run `capsmed prepare` first") from exc
    except ValueError as exc:
        raise CapsmedError(f"{p}: malformed JSON ({exc})") from exc
    missing = [k for k in ("task", "spatial_dims", "modality", "cases") if k not in doc]
    if missing:
        raise CapsmedError(f"{p}: not a cases.json: missing key(s) {', '.join(missing)}")
    return doc
