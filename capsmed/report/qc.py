"""The preprocessing quality-control page of a dataset, from its fingerprint.

``results/{ds}/preprocessed/fingerprint.json`` is read loosely; every key below is optional:

- ``cases``: ``[{"case_id", "shape", "spacing", "intensity_percentiles", "class",
  "label_counts"}, ...]``; ``intensity_percentiles`` is ``{"0.5": v, "50": v, "99.5": v}`` or a list
  matching a top-level ``percentiles`` list.
- ``spacings`` / ``shapes`` (or ``shapes_after_crop``): per-case lists, used when ``cases`` lacks them.
- ``intensity_percentiles`` (dataset level, same forms), ``intensity_histogram``
  ``{"edges" or "bins", "counts"}``, nnU-Net's ``foreground_intensity_properties_per_channel``.
- ``label_counts`` / ``class_counts`` / ``label_balance``: ``{label index or name: count}``.
- ``rejected``: ``[{"case_id", "reason"}, ...]``, a list of ids, or ``{case_id: reason}``.

Scalar top-level keys that are not shown elsewhere (``n_cases``, ``modality``, ...) are listed too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report.files import Layout, name_map, read_json, to_float
from capsmed.report.render import fmt_num, rel_href, render_page

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 500
_AXES = ("x", "y", "z", "t")
_SHOWN_KEYS = {"cases", "spacings", "shapes", "shapes_after_crop", "intensity_percentiles",
               "intensity_histogram", "foreground_intensity_properties_per_channel",
               "label_counts", "class_counts", "label_balance", "rejected", "percentiles",
               "labels", "classes"}


def _numbers(value: Any) -> list[float] | None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return None
    out = [to_float(v) for v in value]
    return None if not out or any(v is None for v in out) else out  # type: ignore[return-value]


def _per_axis(vectors: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    n = max((len(v) for v in vectors), default=0)
    return {f"axis {_AXES[i] if i < len(_AXES) else i}": [v[i] for v in vectors if len(v) > i]
            for i in range(n)}


def _percentile_map(value: Any, levels: Sequence[Any] | None) -> dict[str, float]:
    """Percentiles as ``{"p0.5": v, ...}`` from a dict or a list (with ``levels``)."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            f = to_float(v)
            if f is None:
                continue
            key = str(k)
            out[key if key.startswith(("p", "q")) else f"p{key}"] = f
    elif isinstance(value, Sequence) and not isinstance(value, str):
        vals = [to_float(v) for v in value]
        names = [f"p{lv}" for lv in levels] if levels and len(levels) == len(vals) else [
            f"q{i}" for i in range(len(vals))]
        out = {n: v for n, v in zip(names, vals, strict=True) if v is not None}
    return out


def _level(name: str) -> float:
    f = to_float(name.lstrip("pq").replace("_", "."))
    return f if f is not None else float("inf")


def _counts(raw: Any, names: Mapping[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        items = list(enumerate(raw))
    else:
        return out
    for k, v in items:
        if isinstance(v, Mapping):
            v = next((v[x] for x in ("voxels", "count", "cases", "n") if x in v), None)
        f = to_float(v)
        if f is None:
            continue
        key = str(k)
        label = names.get(int(key), key) if key.lstrip("-").isdigit() else key
        out[label] = out.get(label, 0.0) + f
    return out


def _rejected(fp: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    raw = fp.get("rejected")
    out: list[tuple[str, str]] = []
    if isinstance(raw, Mapping):
        out = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        for item in raw:
            if isinstance(item, Mapping):
                reason = item.get("reason") or item.get("reasons") or item.get("problem") or ""
                if isinstance(reason, list):
                    reason = "; ".join(str(r) for r in reason)
                out.append((str(item.get("case_id", item.get("id", item.get("image", "?")))),
                            str(reason) or "no reason recorded"))
            else:
                out.append((str(item), "no reason recorded"))
    for c in cases:
        if c.get("rejected"):
            out.append((str(c.get("case_id", "?")), str(c.get("reason") or "no reason recorded")))
    return out


def _outliers(ids: Sequence[str], vectors: Sequence[Sequence[float]], what: str,
              factor: float = 2.0) -> list[tuple[str, str]]:
    """Cases whose value on some axis differs from the median by more than ``factor`` times."""
    if not vectors:
        return []
    n = min(len(v) for v in vectors)
    arr = np.array([list(v)[:n] for v in vectors], dtype=float)
    med = np.median(arr, axis=0)
    out = []
    for cid, v in zip(ids, arr, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, v / med, 1.0)
        if np.any((ratio > factor) | (ratio < 1 / factor)):
            out.append((cid, f"{what} {' x '.join(f'{x:.3g}' for x in v)} "
                             f"(median {' x '.join(f'{x:.3g}' for x in med)})"))
    return out


def write_qc_report(results_dir: Path, dataset: str) -> Path:
    """Write ``results/{ds}/reports/qc.html``: the preprocessing fingerprint at a glance.

    Shows spacing and shape distributions, intensity percentiles (or histogram), label or class
    balance, cases whose geometry is far from the median, the rejected cases with the reason, the
    preprocessing plan and the splits.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.

    Returns:
        The written report path.

    Raises:
        CapsmedError: ``fingerprint.json`` is missing or unreadable.
    """
    results_dir = Path(results_dir)
    lay = Layout(results_dir, dataset)
    fp_path = lay.dataset_dir / "preprocessed" / "fingerprint.json"
    fp = read_json(fp_path, required=True)
    plan = read_json(lay.dataset_dir / "preprocessed" / "plan.json")
    cases_doc = read_json(lay.dataset_dir / "data" / "cases.json")
    splits = read_json(lay.dataset_dir / "splits.json")
    task = str(fp.get("task") or cases_doc.get("task") or plan.get("task") or "")
    names = (name_map(cases_doc, "labels") or name_map(cases_doc, "classes")
             or name_map(fp, "labels") or name_map(fp, "classes"))
    out = lay.reports_dir / "qc.html"

    cases = [c for c in (fp.get("cases") or []) if isinstance(c, Mapping)]
    ids = [str(c.get("case_id", i)) for i, c in enumerate(cases)]
    spacing_rows = [(i, _numbers(c.get("spacing"))) for i, c in zip(ids, cases, strict=True)]
    spacing_rows = [(i, v) for i, v in spacing_rows if v]
    shape_rows = [(i, _numbers(c.get("shape"))) for i, c in zip(ids, cases, strict=True)]
    shape_rows = [(i, v) for i, v in shape_rows if v]
    if not spacing_rows:
        vs = [_numbers(v) for v in (fp.get("spacings") or [])]
        spacing_rows = [(str(i), v) for i, v in enumerate(vs) if v]
    if not shape_rows:
        vs = [_numbers(v) for v in (fp.get("shapes") or fp.get("shapes_after_crop") or [])]
        shape_rows = [(str(i), v) for i, v in enumerate(vs) if v]
    levels = fp.get("percentiles") if isinstance(fp.get("percentiles"), list) else None
    per_case_pct = {i: _percentile_map(c.get("intensity_percentiles")
                                       or (c.get("intensity") or {}).get("percentiles"), levels)
                    for i, c in zip(ids, cases, strict=True)}
    per_case_pct = {k: v for k, v in per_case_pct.items() if v}
    rejected = _rejected(fp, cases)
    counts = {}
    for key in ("label_counts", "class_counts", "label_balance", "label_voxels"):
        counts = _counts(fp.get(key), names)
        if counts:
            break
    count_kind = "voxels" if task == "segmentation" else "cases"
    if not counts:
        for c in cases:
            if c.get("class") is not None:
                counts_key = names.get(int(c["class"]), str(c["class"])) if str(
                    c["class"]).lstrip("-").isdigit() else str(c["class"])
                counts[counts_key] = counts.get(counts_key, 0.0) + 1
            for k, v in _counts(c.get("label_counts"), names).items():
                counts[k] = counts.get(k, 0.0) + v

    n_cases = len(cases) or len(spacing_rows) or len(shape_rows) or to_float(fp.get("n_cases"))
    lead = []
    summary = f"{dataset}: {int(n_cases) if n_cases else 'unknown number of'} cases fingerprinted"
    summary += f", {len(rejected)} rejected." if rejected else ", none rejected."
    lead.append(summary)
    if spacing_rows:
        med = np.median(np.array([v[:3] for _, v in spacing_rows if len(v) >= len(
            spacing_rows[0][1][:3])], dtype=float), axis=0)
        lead.append("Median spacing " + " x ".join(f"{x:.3g}" for x in med) + " mm.")
    if shape_rows:
        med = np.median(np.array([v[:3] for _, v in shape_rows if len(v) >= len(
            shape_rows[0][1][:3])], dtype=float), axis=0)
        lead.append("Median shape " + " x ".join(f"{x:.0f}" for x in med) + " voxels.")
    if counts:
        total = sum(counts.values())
        if total > 0:
            lead.append("Balance: " + ", ".join(f"{k} {100 * v / total:.1f}%"
                                                 for k, v in counts.items()) + f" of {count_kind}.")

    cards = [b.card("Cases", int(n_cases) if n_cases else "n/a"),
             b.card("Rejected", len(rejected))]
    for key, label in (("task", "Task"), ("modality", "Modality")):
        value = fp.get(key) or cases_doc.get(key) or plan.get(key)
        if value:
            cards.append(b.card(label, value))

    sections = []
    ds_pairs: list[tuple[str, Any]] = []
    if names:
        ds_pairs.append(("Labels" if task == "segmentation" else "Classes",
                         ", ".join(f"{k}: {v}" for k, v in names.items())))
    if splits:
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
    if tables:
        sections.append(b.section("dataset", "Dataset and plan", tables=tables))

    outliers = _outliers([i for i, _ in spacing_rows], [v for _, v in spacing_rows], "spacing")
    outliers += _outliers([i for i, _ in shape_rows], [v for _, v in shape_rows], "shape")
    sections.append(b.section(
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
                        caption="Unusual geometry")] if outliers else []))

    figs, tables, paragraphs = [], [], []
    if per_case_pct:
        keys = sorted({k for v in per_case_pct.values() for k in v}, key=_level)
        figs.append(b.figure(fig.percentile_figure(
            {k: [v[k] for v in per_case_pct.values() if k in v] for k in keys}),
            "Box plots of intensity percentiles across cases",
            "Each box summarises one intensity percentile over the cases."))
    dataset_pct = _percentile_map(fp.get("intensity_percentiles"), levels)
    if dataset_pct:
        tables.append(b.table(["Percentile", "Intensity"],
                              [b.row([k, b.num_cell(fmt_num(v, 2))]) for k, v in
                               sorted(dataset_pct.items(), key=lambda kv: _level(kv[0]))],
                              caption="Dataset intensity percentiles"))
    hist = fp.get("intensity_histogram")
    if isinstance(hist, Mapping):
        edges = hist.get("edges", hist.get("bins"))
        if isinstance(edges, list) and isinstance(hist.get("counts"), list):
            figs.append(b.figure(fig.histogram_figure(edges, hist["counts"], "Intensity histogram"),
                                 "Histogram of image intensities", "Intensity histogram."))
    props = fp.get("foreground_intensity_properties_per_channel")
    if isinstance(props, Mapping):
        for ch, p in props.items():
            if isinstance(p, Mapping):
                tables.append(b.table(["Statistic", "Value"],
                                      [b.row([k, b.num_cell(fmt_num(v, 2))]) for k, v in p.items()
                                       if to_float(v) is not None],
                                      caption=f"Foreground intensity, channel {ch}"))
    if not (figs or tables):
        paragraphs.append("The fingerprint records no intensity statistics.")
    sections.append(b.section("intensity", "Intensities", paragraphs=paragraphs, tables=tables,
                              figs=figs))

    sections.append(b.section(
        "balance", "Label balance" if task == "segmentation" else "Class balance",
        paragraphs=[] if counts else ["The fingerprint records no label or class counts."],
        figs=[b.figure(fig.count_bars(counts, "Label balance" if task == "segmentation"
                                      else "Class balance", count_kind),
                       "Bar chart of label or class counts",
                       f"Number of {count_kind} per {'label' if task == 'segmentation' else 'class'}"
                       " with the share of the total.")]))

    sections.append(b.section(
        "rejected", "Rejected cases",
        paragraphs=[] if rejected else ["No case was rejected."],
        tables=[b.table(["Case", "Reason"], [b.row([c, r]) for c, r in rejected],
                        caption=f"{len(rejected)} rejected")] if rejected else []))

    other = [(k, v) for k, v in fp.items() if k not in _SHOWN_KEYS and k not in ("task", "modality")
             and (isinstance(v, str | int | float) or (isinstance(v, list) and len(v) <= 8
                                                       and all(not isinstance(x, Mapping | list)
                                                               for x in v)))]
    if other:
        sections.append(b.section("other", "Other fingerprint values", tables=[b.kv_table(
            [(k, ", ".join(str(x) for x in v) if isinstance(v, list) else v) for k, v in other])]))

    if cases:
        pct_keys = sorted({k for v in per_case_pct.values() for k in v}, key=_level)[:5]
        rows = []
        for cid, c in list(zip(ids, cases, strict=True))[:MAX_TABLE_ROWS]:
            sp, sh = _numbers(c.get("spacing")), _numbers(c.get("shape"))
            rows.append(b.row([cid, " x ".join(f"{x:.0f}" for x in sh) if sh else "",
                               " x ".join(f"{x:.3g}" for x in sp) if sp else ""]
                              + [b.num_cell(fmt_num(per_case_pct.get(cid, {}).get(k), 2))
                                 for k in pct_keys]))
        note = (f"Showing {MAX_TABLE_ROWS} of {len(cases)} cases." if len(cases) > MAX_TABLE_ROWS
                else "")
        sections.append(b.section("cases", "Cases", details=b.details(
            f"All {len(cases)} fingerprinted cases", tables=[b.table(
                ["Case", "Shape", "Spacing (mm)"] + pct_keys, rows, note=note)])))

    nav = [b.link("All results", rel_href(results_dir / "index.html", out.parent))]
    if (lay.reports_dir / "comparison.html").exists():
        nav.append(b.link("Model comparison", "comparison.html"))
    if not fp:
        logger.warning("%s is empty", fp_path)
    return render_page(out, "page.html", title=f"{dataset}: preprocessing QC",
                       subtitle=f"fingerprint {fp_path.name}" + (f" \u00b7 {task}" if task else ""),
                       nav=nav, lead=lead, note=None, top_cards=cards, sections=sections)
