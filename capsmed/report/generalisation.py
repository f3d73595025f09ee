"""The generalisation page of a dataset: every model under graded shifts and with less training data.

The page reads what the pipeline writes:

- ``results/{ds}/generalisation.json``
  (:func:`capsmed.evaluate.generalisation.summarise_generalisation`; its docstring gives the
  shape): per model the metric per shift and severity with its 95% interval (and the ECE for
  classifiers), the clean pass, the corruption errors ``ce`` / ``relative_ce`` with their means
  ``mce`` / ``relative_mce`` and the reasons a ratio is ``undefined``, the paired bootstrap
  differences against the reference, and the learning curve;
- beside each shifted stage (:meth:`capsmed.paths.Layout.shift_dir`): ``metrics.json`` (the
  clean pass's interval, the cost per case) and ``gallery.npz`` (the first test case's middle
  slice: image, label and prediction, or the class probabilities);
- ``train.json`` of each model (its family: capsule or CNN).

:func:`shift_line` is the one sentence the comparison page and the index carry about it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report.comparison import family_label, model_family
from capsmed.report.files import read_json, read_table
from capsmed.report.render import (
    fmt_ci,
    fmt_metric,
    fmt_num,
    fmt_seconds,
    is_number,
    metric_label,
    rel_href,
    render_page,
)

logger = logging.getLogger(__name__)

#: The shift of the clean reference pass, at severity 0 (:data:`capsmed.evaluate.shift.CLEAN`).
CLEAN = "none"
#: Severities the gallery shows where they ran (else every severity that ran).
GALLERY_SEVERITIES = (1, 3, 5)

CE_DEFINITION = (
    "Corruption error (Hendrycks & Dietterich 2019, ImageNet-C; Di Salvo et al. 2024, "
    "MedMNIST-C), with the error E = 1 - {metric} on the test cases: CE of a shift = the sum over "
    "its severities of the model's E divided by the same sum for the reference model {ref}, so the "
    "reference scores 1 and below 1 means fewer errors under that shift. Relative CE first "
    "subtracts each model's clean error, from the shifted stages' own severity-0 pass (same "
    "inference settings, no shift), from its errors at every severity: below 1 means the model "
    "degrades less than the reference. mCE and relative mCE are the means over the shifts where "
    "the ratio is defined. A ratio is undefined where the reference's mean error (CE) or mean "
    "degradation (relative CE) over the severities is under {min_ref}: dividing by it would "
    "print a meaningless number.")


def _value(x: Any) -> float | None:
    return float(x) if is_number(x) else None


def _ratio(x: Any) -> str:
    return fmt_num(x, 3) if is_number(x) else "undefined"


def shift_line(reference: str | None, models: Mapping[str, Mapping[str, Any]],
               capsules: Collection[str] | None = None) -> str | None:
    """One sentence on the models' relative mCE against the reference (comparison page, index).

    Args:
        reference: The reference model (``generalisation.json``'s ``reference``), or None.
        models: Per model, a mapping with ``relative_mce`` and ``mce`` (the ``models`` of
            ``generalisation.json``, or of ``summary.json``'s ``generalisation`` section).
        capsules: The capsule models; where some are among ``models``, only they are named,
            else every model but the reference.

    Returns:
        E.g. ``"Under shift: capsunet's relative mCE 0.580 against unet (mCE 1.023; below 1:
        it degrades less)."``, or None without a reference or another model.
    """
    if not reference or reference not in models:
        return None
    others = [m for m in models if m != reference]
    if capsules is not None and any(m in capsules for m in others):
        others = [m for m in others if m in capsules]
    if not others:
        return None
    if len(others) == 1:
        m = models[others[0]]
        return (f"Under shift: {others[0]}'s relative mCE {_ratio(m.get('relative_mce'))} "
                f"against {reference} (mCE {_ratio(m.get('mce'))}; below 1: it degrades less).")
    return (f"Under shift, relative mCE against {reference} (below 1: degrades less): "
            + ", ".join(f"{m} {_ratio(models[m].get('relative_mce'))}" for m in others) + ".")


# ----------------------------------------------------------------------------- reading


def _stage_doc(lay: DatasetLayout, model: str, shift: str, severity: int) -> dict[str, Any]:
    """A shifted stage's ``metrics.json`` ({} when absent)."""
    return read_json(lay.layout.shift_dir(lay.dataset, model, shift, severity, lay.fold)
                     / "metrics.json")


def _gallery(lay: DatasetLayout, model: str, shift: str, severity: int) -> dict[str, Any] | None:
    """A shifted stage's ``gallery.npz`` as a dict of arrays, or None when absent."""
    path = lay.layout.shift_dir(lay.dataset, model, shift, severity, lay.fold) / "gallery.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable gallery (%s)", path, exc)
        return None


def _shift_text(name: str, kind: str | None, severities: Sequence[int]) -> str:
    """What a shift does and its parameter at each shown severity (capsmed.data.shifts)."""
    from capsmed.data.shifts import SHIFTS  # numpy only; the one home of the shifts' definitions

    shift = SHIFTS.get(name)
    if shift is None:
        return ""
    table = shift.table.get(kind or "", shift.table.get("*"))
    params = ""
    if table is not None:
        params = "; parameter " + ", ".join(f"{table[s - 1]} at severity {s}" for s in severities
                                            if 1 <= s <= len(table))
    return f"{name}: {shift.doc}{params} (source: {shift.source})."


# ----------------------------------------------------------------------------- sections


def _curves(doc: Mapping[str, Any], shift: str, key: str, families: Mapping[str, str | None],
            clean_ci: Mapping[str, Any]) -> list[fig.Curve]:
    """Per model, ``key`` (the metric or ``ece``) at severity 0 (clean) and each severity."""
    sev = [int(s) for s in doc["severities"]]
    out = []
    for model, m in doc["models"].items():
        per = m["shifts"].get(shift, {})
        y = [_value(m["clean"].get(key))] + [_value(per.get(str(s), {}).get(key)) for s in sev]
        cis = [clean_ci.get(model) if key == doc["metric"] else None] + [
            per.get(str(s), {}).get("ci95") if key == doc["metric"] else None for s in sev]
        lo = [c[0] if fmt_ci(c) else np.nan for c in cis]
        hi = [c[1] if fmt_ci(c) else np.nan for c in cis]
        out.append(fig.Curve(model, families.get(model) == "capsule", [0] + sev,
                             [np.nan if v is None else v for v in y], lo, hi))
    return out


def _severity_section(doc: Mapping[str, Any], families: Mapping[str, str | None],
                      clean_ci: Mapping[str, Any]) -> dict[str, Any]:
    metric, sev = doc["metric"], [int(s) for s in doc["severities"]]
    ref = doc.get("reference")
    figs = [b.figure(
        fig.curve_panels([(s, _curves(doc, s, metric, families, clean_ci)) for s in doc["shifts"]],
                         "severity (0: clean)", metric_label(metric), [0] + sev, reference=ref),
        f"{metric_label(metric)} against severity for every model, one panel per shift",
        f"{metric_label(metric)} on the test cases against severity, one panel per shift; bands: "
        "95% bootstrap intervals over the cases; circles and solid lines are capsule networks.")]
    if doc["task"] == "classification":
        figs.append(b.figure(
            fig.curve_panels([(s, _curves(doc, s, "ece", families, clean_ci))
                              for s in doc["shifts"]], "severity (0: clean)", "ECE",
                             [0] + sev, reference=ref),
            "Expected calibration error against severity for every model, one panel per shift",
            "Calibration under shift: expected calibration error (lower is better) against "
            "severity."))
    rows = []
    for model, m in doc["models"].items():
        rows.append(b.row([model, "clean", "0", b.num_cell(
            fmt_metric(m["clean"].get(metric), metric) + _ci_text(clean_ci.get(model)))]
            + ([b.num_cell(fmt_metric(m["clean"].get("ece"), "ece"))]
               if doc["task"] == "classification" else [])))
        for shift in doc["shifts"]:
            for s in sev:
                e = m["shifts"].get(shift, {}).get(str(s), {})
                rows.append(b.row([model, shift, str(s), b.num_cell(
                    fmt_metric(e.get(metric), metric) + _ci_text(e.get("ci95")))]
                    + ([b.num_cell(fmt_metric(e.get("ece"), "ece"))]
                       if doc["task"] == "classification" else [])))
    header = ["Model", "Shift", "Severity", f"{metric_label(metric)} [95% CI]"] + (
        ["ECE"] if doc["task"] == "classification" else [])
    tta = "with" if doc.get("tta") else "without"
    return b.section(
        "severity", f"{metric_label(metric)} against severity",
        paragraphs=[f"Every model on the test cases under each shift at severities "
                    f"{', '.join(map(str, sev))}, predicted and scored as the test stage does, "
                    f"{tta} test-time augmentation. Severity 0 is the clean pass with the same "
                    "settings."],
        figs=figs,
        details=b.details("All values", tables=[b.table(header, rows)]))


def _ci_text(ci: Any) -> str:
    text = fmt_ci(ci)
    return f" {text}" if text else ""


def _ce_section(doc: Mapping[str, Any], families: Mapping[str, str | None]) -> dict[str, Any]:
    ref, metric = doc.get("reference"), doc["metric"]
    tables = []
    reasons: dict[tuple[str, str], str] = {}
    for key, mean_key, title in (("ce", "mce", "Corruption error (CE)"),
                                 ("relative_ce", "relative_mce", "Relative corruption error")):
        rows = []
        for model, m in doc["models"].items():
            cells = [b.cell(model + (" (reference)" if model == ref else "")),
                     family_label(families.get(model))]
            for shift in doc["shifts"]:
                v = (m.get(key) or {}).get(shift)
                why = (m.get("undefined") or {}).get(shift) or (m.get("undefined") or {}).get(
                    "all", "")
                if not is_number(v):
                    reasons[(shift, why)] = why
                cells.append(b.num_cell(_ratio(v), cls="" if is_number(v) else "warn",
                                        title="" if is_number(v) else why))
            mean = m.get(mean_key)
            cells.append(b.num_cell(_ratio(mean), cls="" if is_number(mean) else "warn"))
            rows.append(b.row(cells))
        tables.append(b.table(["Model", "Family"] + list(doc["shifts"])
                              + ["mCE" if key == "ce" else "Relative mCE"], rows, caption=title))
    paragraphs = [CE_DEFINITION.format(metric=metric_label(metric), ref=ref or "(none)",
                                       min_ref=fmt_num(doc.get("min_reference", 0.01), 2))]
    if ref:
        paragraphs.append(f"Reference model: {ref} ({family_label(families.get(ref))}), the "
                          "dataset's CNN baseline of this run unless shift.reference names "
                          "another.")
    undefined = sorted({(s, w) for (s, w) in reasons if w})
    if undefined:
        paragraphs.append("Undefined: " + "; ".join(
            f"{s} ({w})" if s != "all" else w for s, w in undefined) + ".")
    return b.section("corruption-error", "Corruption error (mCE)", paragraphs=paragraphs,
                     tables=tables)


def _verdict(d: Mapping[str, Any]) -> str:
    """``better``, ``worse`` (the interval excludes 0) or ``not separated`` / ``no interval``."""
    ci = d.get("ci95")
    if not fmt_ci(ci):
        return "no interval"
    if ci[0] > 0:
        return "better, separated"
    if ci[1] < 0:
        return "worse, separated"
    return "not separated"


def _paired_section(doc: Mapping[str, Any], others: Sequence[str]) -> dict[str, Any] | None:
    ref, metric = doc.get("reference"), doc["metric"]
    if not ref or not others:
        return None
    rows = []
    for shift in doc["shifts"]:
        cells = [shift]
        for model in others:
            d = (doc["models"][model].get("paired") or {}).get(shift) or {}
            verdict = _verdict(d)
            text = (f"{d['difference']:+.3f}" if is_number(d.get("difference")) else "n/a") \
                + _ci_text(d.get("ci95"))
            cells.append(b.num_cell(f"{text} {verdict}",
                                    cls={"better, separated": "good",
                                         "worse, separated": "bad"}.get(verdict, "")))
        rows.append(b.row(cells))
    return b.section(
        "paired", f"Paired differences against {ref}",
        paragraphs=[f"Per shift, each model's {metric_label(metric)} minus {ref}'s, averaged over "
                    "the severities, with a 95% paired bootstrap interval over the test cases "
                    "(the same resampled cases for both models). Separated means the interval "
                    "excludes 0."],
        tables=[b.table(["Shift"] + [f"{m} - {ref}" for m in others], rows,
                        note="Difference [95% CI]; green: better and separated, red: worse "
                             "and separated.")])


def _curve_section(doc: Mapping[str, Any], families: Mapping[str, str | None]
                   ) -> dict[str, Any] | None:
    """The learning curves, with their table; None without any.

    One panel over the share of the training cases, and one over the share of the minority
    class (``minority`` labels: class imbalance) where present.
    """
    from capsmed.config import parse_fraction  # the one reader of subset labels

    curve = doc.get("learning_curve") or {}
    if not curve.get("models"):
        return None
    metric = doc["metric"]
    labels = [str(f) for f in curve.get("fractions") or []]
    kinds = {f: parse_fraction(f) for f in labels}
    groups = [(title, [f for f in labels if kinds[f][0] == kind or f == "1.0"])
              for kind, title in (("fraction", "share of the training cases"),
                                  ("minority", "share of the minority class"))]
    groups = [(t, fs) for t, fs in groups if [f for f in fs if f != "1.0"]]
    panels = []
    for title, fractions in groups:
        curves = []
        for model, per in curve["models"].items():
            entries = [per.get(f) or {} for f in fractions]
            cis = [e.get("ci95") for e in entries]
            curves.append(fig.Curve(
                model, families.get(model) == "capsule", [kinds[f][1] for f in fractions],
                [v if (v := _value(e.get(metric))) is not None else np.nan for e in entries],
                [c[0] if fmt_ci(c) else np.nan for c in cis],
                [c[1] if fmt_ci(c) else np.nan for c in cis]))
        panels.append((title, curves))
    rows = []
    for model, per in curve["models"].items():
        cells = [model, family_label(families.get(model))]
        for f in labels:
            e = per.get(f) or {}
            cells.append(b.num_cell(
                fmt_metric(e.get(metric), metric) + _ci_text(e.get("ci95"))
                + (f" (n={int(e['n_train'])})" if is_number(e.get("n_train")) else "")
                if e else "n/a"))
        rows.append(b.row(cells))
    xticks = sorted({kinds[f][1] for f in labels})
    return b.section(
        "learning-curve", "Learning curves",
        paragraphs=["Every model trained on nested subsets of its training cases (grouped by "
                    "patient, stratified by class for classification; the same validation and "
                    "test cases, the same epochs and time budget), tested on the test cases; "
                    "minority subsets keep every case of the other classes and a share of the "
                    "minority class. 1.0 is the ordinary model."],
        figs=[b.figure(fig.curve_panels(panels, "share", metric_label(metric), xticks,
                                        columns=2, reference=doc.get("reference")),
                       f"{metric_label(metric)} against the share of training cases per model",
                       f"Test {metric_label(metric)} against the share of training cases; "
                       "bands: 95% bootstrap intervals.")],
        tables=[b.table(["Model", "Family"] + labels, rows,
                        note="Value [95% CI] (n: training cases) per subset.")])


def _classification_text(model: str, g: Mapping[str, Any], truth: int | None,
                         classes: Mapping[str, str]) -> str:
    probs = np.asarray(g.get("probabilities", []), dtype=float).ravel()
    if not probs.size:
        return f"{model}: n/a"
    if truth is not None and 0 <= truth < probs.size:
        return f"{model}: p(true)={probs[truth]:.2f}"
    k = int(np.argmax(probs))
    return f"{model}: {classes.get(str(k), k)} {probs[k]:.2f}"


def _true_class(lay: DatasetLayout, model: str, shift: str, severity: int, case_id: str
                ) -> int | None:
    table = read_table(lay.layout.shift_dir(lay.dataset, model, shift, severity, lay.fold)
                       / "cases.csv")
    if table.empty or "class" not in table or "case_id" not in table:
        return None
    hit = table[table["case_id"].astype(str) == case_id]
    return int(hit["class"].iloc[0]) if len(hit) and is_number(hit["class"].iloc[0]) else None


def _gallery_section(lay: DatasetLayout, doc: Mapping[str, Any], kinds: Mapping[str, str]
                     ) -> tuple[dict[str, Any] | None, int]:
    """One figure per shift: the first test case, clean and at severities 1, 3 and 5."""
    sev = [int(s) for s in doc["severities"]]
    shown = [s for s in GALLERY_SEVERITIES if s in sev] or sev
    models = list(doc["models"])
    subsections, n_images, case = [], 0, None
    for shift in doc["shifts"]:
        stages = [(CLEAN, 0, "clean")] + [(shift, s, f"severity {s}") for s in shown]
        if doc["task"] == "segmentation":
            rows = []
            for model in models:
                panels = []
                for name, s, title in stages:
                    g = _gallery(lay, model, name, s)
                    if g is not None and "image" in g:
                        case = case or str(g.get("case_id", ""))
                        panels.append(fig.GalleryPanel(title, g["image"], g.get("label"),
                                                       g.get("prediction")))
                rows.append((model, panels))
            caption = ("Middle slice of the first test case; white outline: the true labels, "
                       "colour: each model's prediction.")
        else:
            panels = []
            for name, s, title in stages:
                galleries = {m: _gallery(lay, m, name, s) for m in models}
                galleries = {m: g for m, g in galleries.items() if g is not None and "image" in g}
                if not galleries:
                    continue
                first = next(iter(galleries.values()))
                case = case or str(first.get("case_id", ""))
                truth = _true_class(lay, next(iter(galleries)), name, s, str(first["case_id"]))
                classes = _stage_doc(lay, next(iter(galleries)), name, s).get("classes") or {}
                panels.append(fig.GalleryPanel(title, first["image"], text=[
                    _classification_text(m, g, truth, classes) for m, g in galleries.items()]))
            rows = [("image", panels)]
            caption = ("The first test case; under each image every model's predicted "
                       "probability of the true class.")
        uri = fig.shift_gallery(rows)
        if uri:
            n_images += 1
        subsections.append(b.subsection(
            shift, paragraphs=[_shift_text(shift, kinds.get(shift), shown)],
            figs=[b.figure(uri, f"The first test case under {shift} at severities "
                                f"{', '.join(map(str, shown))}", caption)]))
    if not subsections:
        return None, 0
    return b.section(
        "gallery", "Gallery",
        paragraphs=[f"Test case {case or 'n/a'} (the first of the test cases) as each shift "
                    f"changes it, clean and at severities {', '.join(map(str, shown))}."],
        subsections=subsections), n_images


def _cost(lay: DatasetLayout, doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per model: shifted stages, cases, mean shift and inference seconds per case, total."""
    stages = [(CLEAN, 0)] + [(s, int(k)) for s in doc["shifts"] for k in doc["severities"]]
    out = {}
    for model in doc["models"]:
        shift_s, infer_s, total, n_stages, cases = [], [], 0.0, 0, 0
        for shift, k in stages:
            d = _stage_doc(lay, model, shift, k)
            cost = d.get("cost") or {}
            a, c = _value(cost.get("shift_seconds_per_case")), _value(
                cost.get("inference_seconds_per_case"))
            if a is None and c is None:
                continue
            n = int(d.get("n_cases") or 0)
            n_stages += 1
            cases = max(cases, n)
            shift_s.append(a or 0.0)
            infer_s.append(c or 0.0)
            total += n * ((a or 0.0) + (c or 0.0))
        if n_stages:
            out[model] = {"stages": n_stages, "cases": cases, "shift": float(np.mean(shift_s)),
                          "inference": float(np.mean(infer_s)), "total": total}
    return out


def _cost_section(costs: Mapping[str, Mapping[str, float]]) -> dict[str, Any] | None:
    if not costs:
        return None
    rows = [b.row([model, b.num_cell(str(c["stages"])), b.num_cell(str(c["cases"])),
                   b.num_cell(fmt_seconds(c["shift"])), b.num_cell(fmt_seconds(c["inference"])),
                   b.num_cell(fmt_seconds(c["shift"] + c["inference"])),
                   b.num_cell(fmt_seconds(c["total"]))]) for model, c in costs.items()]
    return b.section(
        "cost", "Cost of the shifted stages",
        paragraphs=["Wall time per test case, from each shifted stage's metrics.json "
                    "(cost.shift_seconds_per_case: reading and shifting the study; "
                    "cost.inference_seconds_per_case: predicting it), averaged over the stages; "
                    "the total adds cases x seconds over every stage, the clean pass included."],
        tables=[b.table(["Model", "Stages", "Cases", "Shift per case", "Inference per case",
                         "Per case", "Total"], rows)])


# ----------------------------------------------------------------------------- lead


def _over(ratios: Mapping[str, Any] | None, shifts: Sequence[str]) -> str:
    """`` (over 1 of 2 shifts)`` where a mean leaves out undefined ratios, else ``""``."""
    defined = sum(is_number((ratios or {}).get(s)) for s in shifts)
    return "" if defined in (0, len(shifts)) else f" (over {defined} of {len(shifts)} shifts)"


def _lead(dataset: str, doc: Mapping[str, Any], families: Mapping[str, str | None],
          others: Sequence[str], costs: Mapping[str, Mapping[str, float]]) -> list[str]:
    metric, ref = doc["metric"], doc.get("reference")
    label = metric_label(metric)
    if not doc["models"]:
        lead = [f"{dataset}: no shifted stages were run (shift.enabled is false for this "
                "dataset)."]
    else:
        lead = [f"{dataset}: {len(doc['models'])} models on the test cases under "
                f"{len(doc['shifts'])} shifts ({', '.join(doc['shifts'])}) at severities "
                f"{', '.join(str(s) for s in doc['severities'])}, judged by {label}"
                + (f", against the reference {ref} ({family_label(families.get(ref))})."
                   if ref else "; there is no reference model (no CNN baseline), so no "
                               "corruption error.")]
    undefined: dict[str, str] = {}
    for model in others:
        m = doc["models"][model]
        sentence = (f"{model} ({family_label(families.get(model))}) against {ref}: mCE "
                    f"{_ratio(m.get('mce'))}{_over(m.get('ce'), doc['shifts'])} and relative "
                    f"mCE {_ratio(m.get('relative_mce'))}"
                    f"{_over(m.get('relative_ce'), doc['shifts'])} (below 1: fewer errors, and "
                    "less degradation, than the reference).")
        groups: dict[str, list[str]] = {}
        for shift in doc["shifts"]:
            d = (m.get("paired") or {}).get(shift) or {}
            text = shift
            if is_number(d.get("difference")):
                text += f" ({d['difference']:+.3f}{_ci_text(d.get('ci95'))})"
            groups.setdefault(_verdict(d), []).append(text)
        parts = [f"{v} on {', '.join(groups[v])}" for v in
                 ("better, separated", "worse, separated", "not separated", "no interval")
                 if groups.get(v)]
        if parts:
            sentence += (f" {label} minus {ref}'s, averaged over severities, paired bootstrap "
                         "95% interval: " + "; ".join(parts) + ".")
        lead.append(sentence)
        for shift, why in (m.get("undefined") or {}).items():
            undefined.setdefault(shift, why)
    if ref and not others:
        lead.append(f"Only the reference {ref} was evaluated under shift; add a capsule model "
                    "to compare.")
    if undefined:
        lead.append("Undefined (the reference barely errs or degrades there, so a ratio would "
                    "mean nothing): "
                    + "; ".join(f"{s}: {w}" if s != "all" else w for s, w in undefined.items())
                    + ".")
    curve = doc.get("learning_curve") or {}
    fractions = [str(f) for f in curve.get("fractions") or []]
    if curve.get("models") and len(fractions) > 1:
        low = fractions[0]
        lead.append(f"Learning curve, trained on subset {low} of the training cases: "
                    + ", ".join(f"{model} {label} "
                                f"{fmt_metric((per.get(low) or {}).get(metric), metric)}"
                                for model, per in curve["models"].items()) + ".")
    if costs:
        per_case = np.mean([c["shift"] + c["inference"] for c in costs.values()])
        lead.append(f"Cost: {fmt_seconds(per_case)} per test case and shifted stage on average "
                    "(shifting and inference), "
                    f"{fmt_seconds(sum(c['total'] for c in costs.values()))} for all stages of "
                    "all models.")
    return lead


# ----------------------------------------------------------------------------- page


def write_generalisation_report(results_dir: Path, dataset: str, *, fold: int | None = None
                                ) -> Path:
    """Write ``results/{ds}/reports/generalisation.html`` from ``generalisation.json``.

    Says per model how it does against the reference under shift (mCE, relative mCE, where the
    paired bootstrap separates it), draws the metric (and for classifiers the ECE) against
    severity per shift with 95% bands, tabulates the corruption errors with their definitions,
    the paired differences and the learning curves, shows a gallery of the first test case under
    every shift, and what the shifted stages cost.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.
        fold: The reported fold of a dataset with several folds (where its shifted stages live);
            ``None`` with one fold.

    Returns:
        The written page.

    Raises:
        CapsmedError: ``generalisation.json`` is missing or unreadable (run ``capsmed
            generalisation`` first).
    """
    results_dir = Path(results_dir)
    lay = DatasetLayout(results_dir, dataset, fold)
    path = lay.layout.generalisation(dataset)
    if not path.is_file():
        raise CapsmedError(f"{path}: file not found (run `capsmed generalisation -d {dataset}` "
                           "first)")
    doc = read_json(path, required=True)
    doc.setdefault("models", {})
    doc.setdefault("shifts", [])
    doc.setdefault("severities", [])
    doc["metric"] = doc.get("metric") or ("dice" if doc.get("task") == "segmentation" else "auc")
    out = lay.layout.generalisation_report(dataset)
    names = list(dict.fromkeys(list(doc["models"])
                               + list((doc.get("learning_curve") or {}).get("models") or {})))
    families = {m: model_family(read_json(lay.model_dir(m) / "train.json")) for m in names}
    ref = doc.get("reference")
    others = sorted((m for m in doc["models"] if ref and m != ref),
                    key=lambda m: (families.get(m) != "capsule", list(doc["models"]).index(m)))
    clean_docs = {m: _stage_doc(lay, m, CLEAN, 0) for m in doc["models"]}
    clean_ci = {m: (d.get("ci95") or {}).get(doc["metric"]) for m, d in clean_docs.items()}
    kinds = {}
    for shift in doc["shifts"]:
        for m in doc["models"]:
            kind = _stage_doc(lay, m, shift, int(doc["severities"][0])).get("shift_kind") \
                if doc["severities"] else None
            if kind:
                kinds[shift] = kind
                break
    costs = _cost(lay, doc)
    sections: list[dict[str, Any] | None] = []
    if doc["models"]:
        sections.append(_severity_section(doc, families, clean_ci))
        sections.append(_ce_section(doc, families))
        sections.append(_paired_section(doc, others))
    sections.append(_curve_section(doc, families))
    if doc["models"]:
        sections.append(_gallery_section(lay, doc, kinds)[0])
        sections.append(_cost_section(costs))
    nav = [b.link("All results", rel_href(results_dir / "index.html", out.parent))]
    for page, text in (("comparison", "Model comparison"), ("qc", "Preprocessing QC")):
        if (lay.reports_dir / f"{page}.html").exists():
            nav.append(b.link(text, f"{page}.html"))
    return render_page(out, "page.html", title=f"{dataset}: generalisation",
                       subtitle=f"{doc.get('task', '')} \u00b7 under shift and with less data",
                       nav=nav, lead=_lead(dataset, doc, families, others, costs), note=None,
                       top_cards=[], sections=[s for s in sections if s is not None])
