"""The preprocessing quality-control page of a dataset, from its fingerprint and plan.

The page reads ``results/{ds}/preprocessed/fingerprint.json`` exactly as
:func:`capsmed.data.fingerprint.compute_fingerprint` writes it (``case_ids``, ``spacings``,
``shapes``, ``shapes_after_crop``, ``intensity_per_channel``, ``label_voxels`` or
``class_counts``, ``labels`` or ``classes``), the plan beside it
(:func:`capsmed.data.fingerprint.make_plan`), ``data/cases.json`` and ``splits.json``. A key the
fingerprint lacks (an older or hand-edited file) leaves its section saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report.files import label_names, read_json, task_of, to_float
from capsmed.report.render import fmt_num, rel_href, render_page

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 500
_AXES = ("x", "y", "z", "t")
# Order and wording of the per-channel statistics compute_fingerprint records.
INTENSITY_STATS = (("mean", "Mean"), ("std", "Standard deviation"), ("min", "Minimum"),
                   ("percentile_00_5", "0.5th percentile"), ("median", "Median"),
                   ("percentile_99_5", "99.5th percentile"), ("max", "Maximum"))
# Keys shown by their own sections (the rest of the scalar values are listed as "other").
_SHOWN_KEYS = {"case_ids", "spacings", "shapes", "shapes_after_crop", "intensity",
               "intensity_per_channel", "label_voxels", "class_counts", "labels", "classes",
               "task", "modality", "n_cases"}


def _numbers(value: Any) -> list[float] | None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return None
    out = [to_float(v) for v in value]
    return None if not out or any(v is None for v in out) else out  # type: ignore[return-value]


def _per_axis(vectors: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    n = max((len(v) for v in vectors), default=0)
    return {f"axis {_AXES[i] if i < len(_AXES) else i}": [v[i] for v in vectors if len(v) > i]
            for i in range(n)}


def _per_case(fp: Mapping[str, Any], key: str) -> list[tuple[str, list[float]]]:
    """``[(case id, vector), ...]`` from the per-case list ``fp[key]``, ids from ``case_ids``."""
    raw = fp.get(key)
    if not isinstance(raw, list):
        return []
    ids = fp.get("case_ids") if isinstance(fp.get("case_ids"), list) else []
    rows = []
    for i, value in enumerate(raw):
        vec = _numbers(value)
        if vec:
            rows.append((str(ids[i]) if i < len(ids) else str(i), vec))
    return rows


def _counts(raw: Any, names: Mapping[int, str]) -> dict[str, float]:
    """``{"0": n, ...}`` (``label_voxels`` / ``class_counts``) keyed by label or class name."""
    out: dict[str, float] = {}
    if not isinstance(raw, Mapping):
        return out
    for k, v in raw.items():
        f = to_float(v)
        if f is None:
            continue
        key = str(k)
        label = names.get(int(key), key) if key.lstrip("-").isdigit() else key
        out[label] = out.get(label, 0.0) + f
    return out


def _median_text(rows: Sequence[tuple[str, list[float]]], fmt: str) -> str:
    n = min(len(v) for _, v in rows)
    med = np.median(np.array([v[:n] for _, v in rows], dtype=float), axis=0)
    return " x ".join(format(x, fmt) for x in med)


def _outliers(rows: Sequence[tuple[str, list[float]]], what: str,
              factor: float = 2.0) -> list[tuple[str, str]]:
    """Cases whose value on some axis differs from the median by more than ``factor`` times."""
    if not rows:
        return []
    n = min(len(v) for _, v in rows)
    arr = np.array([v[:n] for _, v in rows], dtype=float)
    med = np.median(arr, axis=0)
    out = []
    for (cid, _), v in zip(rows, arr, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, v / med, 1.0)
        if np.any((ratio > factor) | (ratio < 1 / factor)):
            out.append((cid, f"{what} {' x '.join(f'{x:.3g}' for x in v)} "
                             f"(median {' x '.join(f'{x:.3g}' for x in med)})"))
    return out


def _dataset_section(names: Mapping[int, str], task: str, splits: Mapping[str, Any],
                     plan: Mapping[str, Any]) -> dict[str, Any] | None:
    ds_pairs: list[tuple[str, Any]] = []
    if names:
        ds_pairs.append(("Labels" if task == "segmentation" else "Classes",
                         ", ".join(f"{k}: {v}" for k, v in names.items())))
    if isinstance(splits.get("test"), list):
        ds_pairs.append(("Test cases", len(splits["test"])))
    folds = splits.get("folds")
    if isinstance(folds, list) and folds:
        sizes = [f"{len(f.get('train', []))}/{len(f.get('val', []))}" for f in folds
                 if isinstance(f, Mapping)]
        ds_pairs.append(("Folds (train/val)", ", ".join(sizes)))
    if splits.get("seed") is not None:
        ds_pairs.append(("Split seed", splits["seed"]))
    plan_pairs = [(k, ", ".join(str(x) for x in v) if isinstance(v, list) else v)
                  for k, v in plan.items() if isinstance(v, str | int | float | list)
                  and not isinstance(v, bool) and (not isinstance(v, list) or len(v) <= 8)]
    tables = []
    if ds_pairs:
        tables.append(b.kv_table(ds_pairs, caption="Dataset"))
    if plan_pairs:
        tables.append(b.kv_table(plan_pairs, caption="Preprocessing plan (plan.json)"))
    return b.section("dataset", "Dataset and plan", tables=tables) if tables else None


def _geometry_section(spacing_rows: Sequence[tuple[str, list[float]]],
                      shape_rows: Sequence[tuple[str, list[float]]]) -> dict[str, Any]:
    outliers = _outliers(spacing_rows, "spacing") + _outliers(shape_rows, "shape")
    return b.section(
        "geometry", "Geometry",
        paragraphs=[] if spacing_rows or shape_rows else ["The fingerprint records no spacing or "
                                                          "shape."],
        figs=[b.figure(fig.distribution_figure("Voxel spacing", _per_axis(
                  [v for _, v in spacing_rows]), "mm"),
                  "Histograms of voxel spacing per axis", "Voxel spacing per axis across cases."),
              b.figure(fig.distribution_figure("Image shape", _per_axis(
                  [v for _, v in shape_rows]), "voxels"),
                  "Histograms of image shape per axis", "Image size per axis across cases.")],
        tables=[b.table(["Case", "Geometry far from the median (over 2x)"],
                        [b.row([c, r]) for c, r in outliers[:MAX_TABLE_ROWS]],
                        caption="Unusual geometry")] if outliers else [])


def _intensity_section(fp: Mapping[str, Any], task: str) -> dict[str, Any]:
    channels = [c for c in (fp.get("intensity_per_channel") or []) if isinstance(c, Mapping)]
    if not channels and isinstance(fp.get("intensity"), Mapping):
        channels = [fp["intensity"]]
    if not channels:
        return b.section("intensity", "Intensities",
                         paragraphs=["The fingerprint records no intensity statistics."])
    where = ("voxels inside the labels (all voxels of a case without any label)"
             if task == "segmentation" else "all voxels")
    header = ["Statistic"] + ([f"Channel {i}" for i in range(len(channels))]
                              if len(channels) > 1 else ["Intensity"])
    rows = [b.row([label] + [b.num_cell(fmt_num(c.get(key), 2)) for c in channels])
            for key, label in INTENSITY_STATS if any(key in c for c in channels)]
    return b.section(
        "intensity", "Intensities",
        paragraphs=[f"Statistics over {where}, all cases together; mean and standard deviation "
                    "are exact, percentiles come from at most 10,000 sampled voxels per case."],
        tables=[b.table(header, rows, caption="Image intensities (fingerprint)")])


def _cases_section(spacing_rows: Sequence[tuple[str, list[float]]],
                   shape_rows: Sequence[tuple[str, list[float]]],
                   cropped_rows: Sequence[tuple[str, list[float]]]) -> dict[str, Any] | None:
    ids = list(dict.fromkeys([c for c, _ in shape_rows] + [c for c, _ in spacing_rows]))
    if not ids:
        return None
    spacing, shape, cropped = dict(spacing_rows), dict(shape_rows), dict(cropped_rows)

    def _fmt(vec: list[float] | None, spec: str) -> str:
        return " x ".join(format(x, spec) for x in vec) if vec else ""

    rows = [b.row([cid, _fmt(shape.get(cid), ".0f"), _fmt(cropped.get(cid), ".0f"),
                   _fmt(spacing.get(cid), ".3g")]) for cid in ids[:MAX_TABLE_ROWS]]
    note = f"Showing {MAX_TABLE_ROWS} of {len(ids)} cases." if len(ids) > MAX_TABLE_ROWS else ""
    return b.section("cases", "Cases", details=b.details(
        f"All {len(ids)} fingerprinted cases", tables=[b.table(
            ["Case", "Shape", "Non-zero box", "Spacing (mm)"], rows, note=note)]))


def _lead(dataset: str, n_cases: float, spacing_rows: Sequence[tuple[str, list[float]]],
          shape_rows: Sequence[tuple[str, list[float]]], counts: Mapping[str, float],
          count_kind: str) -> list[str]:
    """The page's opening sentences: case count, median spacing and shape, balance."""
    lead = [f"{dataset}: {int(n_cases) if n_cases else 'unknown number of'} cases fingerprinted."]
    if spacing_rows:
        lead.append(f"Median spacing {_median_text(spacing_rows, '.3g')} mm.")
    if shape_rows:
        lead.append(f"Median shape {_median_text(shape_rows, '.0f')} voxels.")
    total = sum(counts.values())
    if total > 0:
        lead.append("Balance: " + ", ".join(f"{k} {100 * v / total:.1f}%"
                                             for k, v in counts.items()) + f" of {count_kind}.")
    return lead


def _balance_section(counts: Mapping[str, float], task: str, count_kind: str) -> dict[str, Any]:
    what = "label" if task == "segmentation" else "class"
    return b.section("balance", f"{what.capitalize()} balance",
                     paragraphs=[] if counts else [f"The fingerprint records no {what} counts."],
                     figs=[b.figure(fig.count_bars(counts, f"{what.capitalize()} balance",
                                                   count_kind),
                                    f"Bar chart of {what} counts",
                                    f"Number of {count_kind} per {what} with the share of the "
                                    "total.")])


def _other_section(fp: Mapping[str, Any]) -> dict[str, Any] | None:
    """Scalar and short-list fingerprint values that no other section shows."""
    other = [(k, v) for k, v in fp.items() if k not in _SHOWN_KEYS
             and (isinstance(v, str | int | float) or (isinstance(v, list) and len(v) <= 8
                                                       and all(not isinstance(x, Mapping | list)
                                                               for x in v)))]
    if not other:
        return None
    return b.section("other", "Other fingerprint values", tables=[b.kv_table(
        [(k, ", ".join(fmt_num(x, 3) if isinstance(x, float) else str(x) for x in v)
          if isinstance(v, list) else v) for k, v in other])])


def write_qc_report(results_dir: Path, dataset: str) -> Path:
    """Write ``results/{ds}/reports/qc.html``: the preprocessing fingerprint at a glance.

    Shows spacing and shape distributions, the intensity statistics per channel, label or class
    balance, cases whose geometry is far from the median, the preprocessing plan and the splits.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.

    Returns:
        The written report path.

    Raises:
        CapsmedError: ``fingerprint.json`` is missing or unreadable.
    """
    results_dir = Path(results_dir)
    lay = DatasetLayout(results_dir, dataset)
    fp = read_json(lay.fingerprint, required=True)
    if not fp:
        logger.warning("%s is empty", lay.fingerprint)
    plan, cases_doc, splits = read_json(lay.plan), read_json(lay.cases), read_json(lay.splits)
    task = task_of(fp, cases_doc, plan, default="")
    count_key = "label_voxels" if task == "segmentation" else "class_counts"
    n_names = len(fp[count_key]) if isinstance(fp.get(count_key), Mapping) else 0
    names = label_names(task, fp, cases_doc, count=n_names) if task else {}
    out = lay.reports_dir / "qc.html"

    spacing_rows = _per_case(fp, "spacings")
    shape_rows = _per_case(fp, "shapes")
    counts = _counts(fp.get(count_key), names)
    count_kind = "voxels" if task == "segmentation" else "cases"
    n_cases = to_float(fp.get("n_cases")) or len(shape_rows) or len(spacing_rows)
    cards = [b.card("Cases", int(n_cases) if n_cases else "n/a")]
    for k, label in (("task", "Task"), ("modality", "Modality")):
        value = fp.get(k) or cases_doc.get(k) or plan.get(k)
        if value:
            cards.append(b.card(label, value))
    sections = [s for s in (
        _dataset_section(names, task, splits, plan),
        _geometry_section(spacing_rows, shape_rows),
        _intensity_section(fp, task),
        _balance_section(counts, task, count_kind),
        _other_section(fp),
        _cases_section(spacing_rows, shape_rows, _per_case(fp, "shapes_after_crop")),
    ) if s]
    nav = [b.link("All results", rel_href(results_dir / "index.html", out.parent))]
    if (lay.reports_dir / "comparison.html").exists():
        nav.append(b.link("Model comparison", "comparison.html"))
    return render_page(out, "page.html", title=f"{dataset}: preprocessing QC",
                       subtitle=f"fingerprint {lay.fingerprint.name}"
                       + (f" \u00b7 {task}" if task else ""), nav=nav,
                       lead=_lead(dataset, n_cases, spacing_rows, shape_rows, counts, count_kind),
                       note=None, top_cards=cards, sections=sections)
