"""The report of one model on one dataset stage (train, val or test)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capsmed.errors import CapsmedError
from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report import stats
from capsmed.report.files import (
    STAGES,
    class_column,
    label_names,
    read_json,
    read_table,
    resolve_path,
    task_of,
    to_float,
)
from capsmed.report.render import (
    fmt_ci,
    fmt_flops,
    fmt_mb,
    fmt_metric,
    fmt_num,
    fmt_params,
    fmt_seconds,
    is_number,
    metric_label,
    ordered_metrics,
    rel_href,
    render_page,
    study_filename,
)
from capsmed.report.study import read_calibration, segmentation_figure

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 500
#: Headline metrics per task, in order of preference.
PRIMARY_METRICS = {"segmentation": ("dice", "hd95"),
                   "classification": ("auc", "balanced_accuracy", "accuracy")}


def primary_metric(task: str, metrics: Mapping[str, Any]) -> str | None:
    """The metric a task is judged by: Dice for segmentation, else AUC / balanced accuracy."""
    for name in PRIMARY_METRICS.get(task, ()):
        if is_number(metrics.get(name)):
            return name
    return None


def headline_text(name: str, metrics: Mapping[str, Any], ci95: Mapping[str, Any]) -> str:
    """``Dice 0.812 (95% CI 0.780 to 0.850)`` for one metric."""
    value = fmt_metric(metrics.get(name), name)
    unit = " mm" if name.startswith(("hd95", "assd")) else ""
    label = metric_label(name).replace(" (mm)", "")
    ci = ci95.get(name)
    ci_text = fmt_ci(ci, name)
    if ci_text:
        lo, hi = ci_text.strip("[]").split(", ")
        return f"{label} {value}{unit} (95% CI {lo} to {hi})"
    return f"{label} {value}{unit}"


def cost_pairs(train: Mapping[str, Any], cost: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Rows of the cost table from ``train.json`` and the ``cost`` block of ``metrics.json``."""
    return [
        ("Parameters", fmt_params(train.get("params"))),
        ("FLOPs per forward pass", fmt_flops(train.get("flops"))),
        ("Training time", fmt_seconds(train.get("train_seconds"))),
        ("Epochs (best)", f"{train.get('epochs', 'n/a')} ({train.get('best_epoch', 'n/a')})"),
        ("Peak memory, training", fmt_mb(train.get("peak_memory_mb"))),
        ("Inference time per case", fmt_seconds(cost.get("inference_seconds_per_case"))),
        ("Peak memory, inference", fmt_mb(cost.get("peak_memory_mb"))),
    ] + ([("Inference device", str(cost["device"]))] if cost.get("device") else []) + (
        [("Test-time augmentation", tta_text(cost))] if cost.get("tta_passes") else [])


def tta_text(cost: Mapping[str, Any]) -> str:
    """``4 passes per case: +1.2 s per case, 3.9x one pass`` from ``metrics.json``'s cost."""
    text = f"{cost.get('tta_passes')} passes per case"
    if is_number(cost.get("tta_extra_seconds_per_case")):
        text += f": +{fmt_seconds(cost['tta_extra_seconds_per_case'])} per case"
    if is_number(cost.get("tta_time_factor")):
        text += f", {float(cost['tta_time_factor']):.1f}x the time of one pass"
    return text


def _metrics_table(metrics_doc: Mapping[str, Any]) -> dict[str, Any]:
    rows = []
    for r in ordered_metrics(metrics_doc.get("metrics") or {}, metrics_doc.get("ci95") or {}):
        rows.append(b.row([r["label"], b.num_cell(fmt_metric(r["value"], r["name"])),
                           b.num_cell(fmt_ci(r["ci"], r["name"]) or "n/a"),
                           "lower is better" if r["lower_better"] else "higher is better"]))
    return b.table(["Metric", "Value", "95% CI", ""], rows,
                   note="Values and 95% confidence intervals as computed by `capsmed evaluate` "
                        f"over the {metrics_doc.get('n_cases', 'n/a')} cases of this stage.")


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@functools.lru_cache(maxsize=32)
def _learning_curves(path: Path, mtime_ns: int, best_epoch: float | None) -> str | None:
    """Learning-curve figure of a history.csv, cached: every stage report of a model shows it."""
    history = read_table(path)
    return fig.learning_curves({c: history[c].to_numpy(dtype=float) for c in history.columns
                                if pd.api.types.is_numeric_dtype(history[c])}, best_epoch)


def _history_section(history: pd.DataFrame, train: Mapping[str, Any], history_path: Path | None
                     ) -> dict[str, Any]:
    if history.empty:
        return b.section("training", "Training", paragraphs=["No history.csv was found."])
    best = to_float(train.get("best_epoch"))
    uri = _learning_curves(history_path, _mtime(history_path), best) if history_path else None
    paragraphs = []
    if "seconds" in history.columns:
        total = float(np.nansum(history["seconds"].to_numpy(dtype=float)))
        paragraphs.append(f"{len(history)} epochs in {fmt_seconds(total)}"
                          + (f"; best checkpoint at epoch {int(best)}." if best is not None
                             else "."))
    return b.section("training", "Training", paragraphs=paragraphs, figs=[b.figure(
        uri, "Learning curves: training and validation loss and validation metrics by epoch",
        "Learning curves from history.csv; the dashed line marks the best epoch.")])


def _study_link(case_id: str, report_dir: Path, studies_dir: Path, stage: str) -> str | None:
    target = studies_dir / study_filename(case_id)
    if stage == "test" or target.exists():
        return rel_href(target, report_dir)
    return None


# ----------------------------------------------------------------------------- classification


def _classification_sections(metrics_doc: Mapping[str, Any], cases: pd.DataFrame,
                             names: Mapping[int, str], links: Mapping[str, str | None]
                             ) -> list[dict[str, Any]]:
    n = len(names)
    truth = cases["class"].to_numpy(dtype=float) if "class" in cases.columns and \
        pd.api.types.is_numeric_dtype(cases["class"]) else np.array([])
    prob_cols = {k: class_column(cases.columns, "prob", k, v) for k, v in names.items()}
    probs = {k: cases[c].to_numpy(dtype=float) for k, c in prob_cols.items() if c is not None}
    pred = cases["predicted"].to_numpy(dtype=float) if "predicted" in cases.columns and \
        pd.api.types.is_numeric_dtype(cases["predicted"]) else np.array([])

    figs = []
    roc, pr = metrics_doc.get("roc"), metrics_doc.get("pr")
    auc = to_float((metrics_doc.get("metrics") or {}).get("auc"))
    ok = np.isfinite(truth) if truth.size else np.array([], bool)
    # Binary tasks: the positive class (1); multiclass: each class against the rest.
    targets = [k for k in ([1] if n == 2 else list(names)) if k in probs]
    roc_curves, pr_curves = [], []
    if n == 2 and isinstance(roc, Mapping) and roc.get("fpr") and roc.get("tpr"):
        a = auc if auc is not None else stats.area(roc["fpr"], roc["tpr"])
        roc_curves.append((names.get(1, "positive"), roc["fpr"], roc["tpr"], a))
    elif truth.size:
        for k in targets:
            fpr, tpr = stats.roc_curve(truth[ok] == k, probs[k][ok])
            roc_curves.append((names[k], fpr, tpr, stats.area(fpr, tpr)))
    if n == 2 and isinstance(pr, Mapping) and pr.get("precision") and pr.get("recall"):
        rec = np.asarray(pr["recall"], dtype=float)
        prec = np.asarray(pr["precision"], dtype=float)
        order = np.argsort(rec, kind="mergesort")
        prevalence = float(np.mean(truth[ok] == 1)) if ok.any() else float("nan")
        ap = stats.average_precision(truth[ok] == 1, probs[1][ok]) if ok.any() and 1 in probs \
            else float("nan")
        pr_curves.append((names.get(1, "positive"), rec[order], prec[order], ap, prevalence))
    elif truth.size:
        for k in targets:
            y = truth[ok] == k
            rec, prec = stats.pr_curve(y, probs[k][ok])
            pr_curves.append((names[k], rec, prec, stats.average_precision(y, probs[k][ok]),
                              float(y.mean()) if y.size else float("nan")))
    figs.append(b.figure(fig.roc_figure(roc_curves), "ROC curves",
                         "ROC curve" + (" per class (one against the rest)" if n > 2 else "")))
    figs.append(b.figure(fig.pr_figure(pr_curves), "Precision-recall curves",
                         "Precision-recall curve" + (" per class" if n > 2 else "")))

    cm = metrics_doc.get("confusion_matrix")
    if not cm and truth.size and pred.size:
        cm = stats.confusion_matrix(truth, pred, n)
    cm_arr = np.asarray(cm, dtype=float) if cm is not None and len(cm) else None
    if cm_arr is not None:
        figs.append(b.figure(fig.confusion_figure(cm_arr, list(names.values())),
                             "Confusion matrix of true against predicted classes",
                             "Confusion matrix: rows are the true class, columns the prediction."))
    rel = metrics_doc.get("reliability")
    if not (isinstance(rel, Mapping) and rel.get("bin_count")) and "confidence" in cases.columns \
            and truth.size and pred.size:
        rel = stats.reliability_bins(cases["confidence"].to_numpy(dtype=float), truth == pred)
    ece = to_float((metrics_doc.get("metrics") or {}).get("ece"))
    if isinstance(rel, Mapping) and rel.get("bin_count"):
        if ece is None:
            ece = stats.expected_calibration_error(rel)
        figs.append(b.figure(fig.reliability_figure(rel.get("bin_confidence", []),
                                                    rel.get("bin_accuracy", []),
                                                    rel.get("bin_count", []), ece),
                             "Reliability diagram of accuracy against confidence",
                             "Calibration: bars near the diagonal mean the confidence can be "
                             "taken at face value."))
    tables = []
    if cm_arr is not None and cm_arr.shape == (n, n):
        rows = []
        for k, name in names.items():
            tp = cm_arr[k, k]
            support, predicted = cm_arr[k].sum(), cm_arr[:, k].sum()
            rows.append(b.row([name, b.num_cell(int(support)), b.num_cell(int(predicted)),
                               b.num_cell(fmt_num(tp / support if support else np.nan)),
                               b.num_cell(fmt_num(tp / predicted if predicted else np.nan))]))
        tables.append(b.table(["Class", "True cases", "Predicted", "Recall", "Precision"], rows,
                              caption="Per class"))
    sections = [b.section("curves", "Discrimination and calibration", tables=tables, figs=figs)]

    # Cases: confidently wrong first.
    df = cases.copy()
    correct = (truth == pred) if truth.size and pred.size else np.ones(len(df), bool)
    conf = df["confidence"].to_numpy(dtype=float) if "confidence" in df.columns else \
        np.zeros(len(df))
    order = np.lexsort((-np.nan_to_num(conf), correct))
    rows = []
    for i in order[:MAX_TABLE_ROWS]:
        r = df.iloc[i]
        cid = str(r["case_id"])
        t = names.get(int(truth[i]), str(truth[i])) if truth.size and np.isfinite(truth[i]) else ""
        p = names.get(int(pred[i]), str(pred[i])) if pred.size and np.isfinite(pred[i]) else \
            str(r.get("predicted", ""))
        ok = bool(correct[i])
        rows.append(b.row([b.cell(cid, href=links.get(cid)), t, p,
                           b.num_cell(fmt_num(conf[i])),
                           b.cell("yes" if ok else "no", cls="" if ok else "bad")]))
    note = (f"Showing {MAX_TABLE_ROWS} of {len(df)} cases; all are in cases.csv."
            if len(df) > MAX_TABLE_ROWS else "")
    sections.append(b.section("cases", "Cases", paragraphs=[
        "Wrong predictions first, most confident first."],
        tables=[b.table(["Case", "True class", "Predicted", "Confidence", "Correct"], rows,
                        note=note)]))
    return sections


# ----------------------------------------------------------------------------- segmentation


def _case_dice(cases: pd.DataFrame, fg: Mapping[int, str]) -> np.ndarray:
    if "dice" in cases.columns:
        return cases["dice"].to_numpy(dtype=float)
    cols = [c for c in (class_column(cases.columns, "dice", k, v) for k, v in fg.items()) if c]
    if not cols:
        return np.full(len(cases), np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean(cases[cols].to_numpy(dtype=float), axis=1)


def _segmentation_sections(cases: pd.DataFrame, names: Mapping[int, str],
                           links: Mapping[str, str | None], bases: list[Path]
                           ) -> list[dict[str, Any]]:
    fg = {k: v for k, v in names.items() if k != 0}
    dice_groups, hd_groups, volumes = {}, {}, {}
    for k, name in fg.items():
        c = class_column(cases.columns, "dice", k, name)
        if c:
            dice_groups[name] = cases[c].to_numpy(dtype=float)
        c = class_column(cases.columns, "hd95", k, name)
        if c:
            hd_groups[name] = cases[c].to_numpy(dtype=float)
        cp = class_column(cases.columns, "volume_ml", k, name)
        ct = class_column(cases.columns, "volume_true_ml", k, name)
        if cp and ct:
            volumes[name] = (cases[cp].to_numpy(dtype=float), cases[ct].to_numpy(dtype=float))
    if not dice_groups and "dice" in cases.columns:
        dice_groups["mean"] = cases["dice"].to_numpy(dtype=float)
    if not hd_groups and "hd95" in cases.columns:
        hd_groups["mean"] = cases["hd95"].to_numpy(dtype=float)
    paragraphs = []
    n_inf = sum(int(np.sum(~np.isfinite(v) & ~np.isnan(v))) for v in hd_groups.values())
    if n_inf:
        paragraphs.append(f"{n_inf} HD95 values are infinite (structure missed or predicted "
                          "where there is none) and are left out of the box plot.")
    sections = [b.section("distributions", "Per-class results", paragraphs=paragraphs, figs=[
        b.figure(fig.box_figure([("Dice per class", dice_groups), ("HD95 per class (mm)",
                                                                   hd_groups)]),
                 "Box plots of Dice and HD95 per class over cases",
                 "Each dot is a case; boxes show the quartiles."),
        b.figure(fig.volume_agreement(volumes), "Scatter of predicted against true volumes",
                 "Predicted against true structure volume; the dotted line is perfect agreement."),
    ])]

    dice = _case_dice(cases, fg)
    ok = np.flatnonzero(np.isfinite(dice))
    gallery: list[dict[str, Any] | None] = []
    unreadable: list[str] = []
    if ok.size:
        order = ok[np.argsort(dice[ok], kind="mergesort")]
        picks = [("Best", order[-1]), ("Median", order[len(order) // 2]), ("Worst", order[0])]
        seen: set[int] = set()
        for rank, i in picks:
            if i in seen:
                continue
            seen.add(i)
            r = cases.iloc[i]
            cid = str(r["case_id"])
            seg = segmentation_figure(resolve_path(r.get("image"), *bases),
                                      resolve_path(r.get("prediction"), *bases)
                                      or resolve_path(f"predictions/{cid}.nii.gz", *bases),
                                      resolve_path(r.get("label"), *bases), names)
            caption = f"{rank} case by Dice: {cid} (Dice {fmt_metric(dice[i], 'dice')})."
            if not seg["uri"]:
                unreadable.append(f"{rank} case {cid}: its images could not be read.")
            gallery.append(b.figure(
                seg["uri"], f"{rank} case {cid}: slices with prediction and ground truth overlaid",
                caption, href=links.get(cid), link_text="Study report"))
    sections.append(b.section(
        "gallery", "Best, median and worst cases",
        paragraphs=(["Orthogonal slices through the predicted structure; top row prediction, "
                     "bottom row ground truth."] if gallery else ["No per-case Dice available."])
        + unreadable,
        figs=gallery))

    # Case table, worst first.
    order = np.argsort(np.nan_to_num(dice, nan=-1.0), kind="mergesort")
    dcols = [(name, class_column(cases.columns, "dice", k, name)) for k, name in fg.items()]
    dcols = [(n, c) for n, c in dcols if c]
    vcols = [(name, class_column(cases.columns, "volume_ml", k, name)) for k, name in fg.items()]
    vcols = [(n, c) for n, c in vcols if c]
    header = ["Case", "Dice"] + [f"Dice {n}" for n, _ in dcols] + ["HD95 (mm)"] + [
        f"Volume {n} (mL)" for n, _ in vcols]
    rows = []
    for i in order[:MAX_TABLE_ROWS]:
        r = cases.iloc[i]
        cid = str(r["case_id"])
        cells = [b.cell(cid, href=links.get(cid)), b.num_cell(fmt_metric(dice[i], "dice"))]
        cells += [b.num_cell(fmt_metric(r[c], "dice")) for _, c in dcols]
        cells.append(b.num_cell(fmt_metric(r.get("hd95"), "hd95")))
        cells += [b.num_cell(fmt_num(r[c], 2)) for _, c in vcols]
        rows.append(b.row(cells))
    note = (f"Showing {MAX_TABLE_ROWS} of {len(cases)} cases; all are in cases.csv."
            if len(cases) > MAX_TABLE_ROWS else "")
    sections.append(b.section("cases", "Cases", paragraphs=["Lowest Dice first."],
                              tables=[b.table(header, rows, note=note)]))
    return sections


def evidence_text(cases: pd.DataFrame, kind: str | None) -> str | None:
    """How often capsule evidence and the final prediction disagree, over a stage's cases."""
    if "evidence_disagreement" not in cases.columns:
        if kind == "softmax":
            return ("This CNN has no capsules; its study reports show its softmax maps where "
                    "capsule models show their capsule lengths.")
        return None
    v = pd.to_numeric(cases["evidence_disagreement"], errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    n_any = int(np.sum(v > 0))
    return (f"Capsule evidence and final prediction: the class capsules' strongest class differs "
            f"from the final label on {100 * v.mean():.1f}% of the structure voxels on average "
            f"(median {100 * np.median(v):.1f}%, largest {100 * v.max():.1f}%); they disagree "
            f"somewhere in {n_any} of {v.size} studies.")


def _uncertainty_section(cases: pd.DataFrame, names: Mapping[int, str],
                         links: Mapping[str, str | None], calibration: Mapping[str, Any] | None,
                         cost: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Studies ranked by uncertainty, most uncertain first, with the calibrated flag.

    Returns:
        ``(section, lead sentence)``; ``(None, None)`` when ``cases.csv`` has no
        ``uncertainty_mean`` (test-time augmentation did not run).
    """
    if "uncertainty_mean" not in cases.columns:
        return None, None
    u = pd.to_numeric(cases["uncertainty_mean"], errors="coerce").to_numpy(dtype=float)
    ok = np.flatnonzero(np.isfinite(u))
    if not ok.size:
        return None, None
    order = ok[np.argsort(-u[ok], kind="mergesort")]
    top = to_float((calibration or {}).get("study_threshold"))
    fg = {k: v for k, v in names.items() if k != 0}
    scols = [(n, class_column(cases.columns, "volume_spread_ml", k, n)) for k, n in fg.items()]
    scols = [(n, c) for n, c in scols if c]
    dice = _case_dice(cases, fg)
    paragraphs = [
        "Each study's uncertainty is the mean, inside its predicted structures, of the voxel "
        "entropy of the mean test-time-augmentation probabilities (0 certain, 1 evenly spread). "
        "Most uncertain first: check these studies before the others."]
    if cost.get("tta_passes"):
        paragraphs.append(f"Test-time augmentation: {tta_text(cost)}.")
    lead = None
    if top is not None and calibration:
        n_flag = int(np.sum(u[ok] > top))
        voxel = (f"A voxel counts as uncertain above an entropy of "
                 f"{fmt_num(calibration.get('voxel_threshold'), 2)}, the threshold that best "
                 "separated wrongly from rightly labelled voxels on the validation stage "
                 f"(Youden's J {fmt_num(calibration.get('youden_j'), 2)}"
                 if is_number(calibration.get("voxel_threshold")) else
                 "On the validation stage no entropy threshold separated wrongly from rightly "
                 "labelled voxels better than chance (Youden's J "
                 f"{fmt_num(calibration.get('youden_j'), 2)}")
        paragraphs.append(
            f"A study is flagged when it is more uncertain than every one of the "
            f"{calibration.get('n_cases', 'n/a')} validation studies (highest "
            f"{fmt_num(top)}). {voxel}; entropy finds wrong voxels with AUC "
            f"{fmt_num(calibration.get('voxel_auc'), 2)}).")
        lead = (f"{n_flag} of {ok.size} studies are more uncertain than any validation study"
                + ("; they head the uncertainty ranking." if n_flag else "."))
    else:
        paragraphs.append("No calibration from the validation stage is available (evaluate the "
                          "val stage with test-time augmentation), so no study is flagged.")
    header = ["Rank", "Case", "Uncertainty", "Flag", "Dice"] + [
        f"TTA spread {n} (mL)" for n, _ in scols]
    rows = []
    for rank, i in enumerate(order[:MAX_TABLE_ROWS], start=1):
        r = cases.iloc[i]
        cid = str(r["case_id"])
        flagged = top is not None and u[i] > top
        cells = [b.num_cell(rank), b.cell(cid, href=links.get(cid)), b.num_cell(fmt_num(u[i])),
                 b.cell("above validation range" if flagged else "", cls="warn" if flagged
                        else ""), b.num_cell(fmt_metric(dice[i], "dice"))]
        cells += [b.num_cell(fmt_num(r[c], 2)) for _, c in scols]
        rows.append(b.row(cells))
    note = (f"Showing {MAX_TABLE_ROWS} of {ok.size} studies; all are in cases.csv."
            if ok.size > MAX_TABLE_ROWS else "")
    return b.section("uncertainty", "Studies by uncertainty", paragraphs=paragraphs,
                     tables=[b.table(header, rows, note=note)]), lead


# ----------------------------------------------------------------------------- page


def _stage_lead(dataset: str, model: str, stage: str, task: str, n_cases: int, metrics: dict,
                ci95: dict, train: dict, cost: dict) -> list[str]:
    """The page's opening sentences: the headline metrics, then the model's cost."""
    lead_parts = [headline_text(m, metrics, ci95) for m in PRIMARY_METRICS.get(task, ())
                  if is_number(metrics.get(m))][:2]
    lead = []
    if lead_parts:
        cases_word = "case" if n_cases == 1 else "cases"
        lead.append(f"On the {n_cases} {stage} {cases_word} of {dataset}, {model} reaches "
                    + " and ".join(lead_parts) + ".")
    cost_bits = []
    if is_number(train.get("params")):
        cost_bits.append(f"{fmt_params(train['params'])} parameters")
    if is_number(train.get("flops")):
        cost_bits.append(f"{fmt_flops(train['flops'])} per forward pass")
    if is_number(train.get("train_seconds")):
        cost_bits.append(f"trained in {fmt_seconds(train['train_seconds'])}")
    if is_number(cost.get("inference_seconds_per_case")):
        cost_bits.append(f"{fmt_seconds(cost['inference_seconds_per_case'])} per case at inference")
    if cost_bits:
        lead.append("Cost: " + ", ".join(cost_bits) + ".")
    return lead


def _stage_cards(task: str, metrics: dict, ci95: dict, n_cases: int, stage: str, train: dict,
                 cost: dict) -> list[dict[str, str]]:
    """The cards under the title: headline metrics with their intervals, cases, cost."""
    cards = [b.card(metric_label(m).replace(" (mm)", ""),
                    fmt_metric(metrics[m], m) + (" mm" if m.startswith("hd95") else ""),
                    ("95% CI " + fmt_ci(ci95.get(m), m)) if fmt_ci(ci95.get(m), m) else "")
             for m in PRIMARY_METRICS.get(task, ()) if is_number(metrics.get(m))]
    cards.append(b.card("Cases", n_cases, stage))
    if is_number(train.get("params")):
        cards.append(b.card("Parameters", fmt_params(train["params"])))
    if is_number(cost.get("inference_seconds_per_case")):
        cards.append(b.card("Inference", fmt_seconds(cost["inference_seconds_per_case"]),
                            "per case"))
    return cards


def _segmentation_page_sections(lay: DatasetLayout, model: str, edir: Path, metrics_doc: dict,
                                cases: pd.DataFrame, names: Mapping[int, str],
                                links: Mapping[str, str | None]
                                ) -> tuple[list[dict[str, Any]], list[str]]:
    """A segmentation stage's sections and the sentences they add to the lead.

    The uncertainty and evidence sections go before the case table, which stays last.
    ``edir`` is the stage's evaluation folder; figures' paths resolve against it, the results
    folder, the dataset folder and its ``predictions``.
    """
    bases = [edir, Path(lay.results_dir), lay.dataset_dir, edir / "predictions"]
    sections = _segmentation_sections(cases, names, links, bases)
    lead = []
    unc_section, unc_lead = _uncertainty_section(cases, names, links,
                                                 read_calibration(lay, model),
                                                 metrics_doc.get("cost") or {})
    if unc_section is not None:
        sections.insert(len(sections) - 1, unc_section)
    if unc_lead:
        lead.append(unc_lead)
    ev_text = evidence_text(cases, metrics_doc.get("evidence_kind"))
    if ev_text:
        sections.insert(len(sections) - 1, b.section(
            "evidence", "What the capsules saw", paragraphs=[ev_text]))
    return sections, lead


def _provenance_section(metrics_doc: dict, train: dict) -> dict[str, Any]:
    """Seed, config hash, checkpoint hash, training date and package versions."""
    record = {**{k: metrics_doc[k] for k in ("checkpoint_sha256",) if metrics_doc.get(k)},
              **{k: v for k, v in train.items() if v not in (None, "")}}
    prov = [(label, record[k]) for k, label in (
        ("seed", "Seed"), ("config_hash", "Config hash"),
        ("checkpoint_sha256", "Checkpoint SHA-256"), ("date", "Trained")) if k in record]
    versions = train.get("versions")
    prov_tables = [b.kv_table(prov)] if prov else []
    if isinstance(versions, Mapping) and versions:
        prov_tables.append(b.table(["Package", "Version"],
                                   [b.row([k, v]) for k, v in sorted(versions.items())]))
    return b.section("provenance", "Provenance", tables=prov_tables,
                     paragraphs=[] if prov_tables else ["No train.json was found."])


def _stage_nav(lay: DatasetLayout, model: str, stage: str,
               report_dir: Path) -> list[dict[str, str]]:
    """Links to the results index, the model's other stages, the comparison and QC pages."""
    nav = [b.link("All results", rel_href(Path(lay.results_dir) / "index.html", report_dir))]
    for other in STAGES:
        if other != stage and lay.stage_report(model, other).exists():
            nav.append(b.link(f"{other} stage", f"{other}.html"))
    for page, text in (("comparison.html", "Model comparison"), ("qc.html", "Preprocessing QC")):
        if (lay.reports_dir / page).exists():
            nav.append(b.link(text, rel_href(lay.reports_dir / page, report_dir)))
    return nav


def write_stage_report(results_dir: Path, dataset: str, model: str, stage: str, *,
                       fold: int | None = None) -> Path:
    """Write ``results/{ds}/reports/{model}/{stage}.html``.

    Shows the headline metrics with 95% CIs, the model's cost, learning curves and, for
    classification, ROC / PR curves, the confusion matrix and a reliability diagram; for segmentation,
    Dice and HD95 box plots per class, volume agreement and a gallery of the best, median and worst
    cases. Every case is listed and linked to its study report.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.
        model: Model name.
        stage: ``train``, ``val`` or ``test``.
        fold: The reported fold of a dataset with several folds (its files live in ``fold{k}``
            folders); ``None`` with one fold.

    Returns:
        The written report path.

    Raises:
        CapsmedError: ``stage`` is unknown or ``metrics.json`` is missing or unreadable.
    """
    if stage not in STAGES:
        raise CapsmedError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    results_dir = Path(results_dir)
    lay = DatasetLayout(results_dir, dataset, fold)
    edir = lay.eval_dir(model, stage)
    metrics_doc = read_json(edir / "metrics.json", required=True)
    cases = read_table(edir / "cases.csv")
    train = read_json(lay.model_dir(model) / "train.json")
    history = read_table(lay.model_dir(model) / "history.csv")
    cases_doc = read_json(lay.cases)
    task = task_of(metrics_doc, cases_doc)
    names = label_names(task, metrics_doc, cases_doc,
                        count=len(metrics_doc.get("confusion_matrix") or []))
    out = lay.stage_report(model, stage)
    metrics = metrics_doc.get("metrics") or {}
    ci95 = metrics_doc.get("ci95") or {}
    cost = metrics_doc.get("cost") or {}
    n_cases = metrics_doc.get("n_cases", len(cases))

    lead = _stage_lead(dataset, model, stage, task, n_cases, metrics, ci95, train, cost)
    report_dir = out.parent
    links = {str(cid): _study_link(str(cid), report_dir, lay.studies_dir(model), stage)
             for cid in (cases["case_id"] if "case_id" in cases.columns else [])}
    sections = [
        b.section("metrics", "Metrics", tables=[_metrics_table(metrics_doc)]),
        b.section("cost", "Cost", tables=[b.kv_table(cost_pairs(train, cost))]),
        _history_section(history, train, lay.model_dir(model) / "history.csv"),
    ]
    if cases.empty:
        sections.append(b.section("cases", "Cases", paragraphs=[
            f"No per-case table ({edir / 'cases.csv'}) was found."]))
    elif task == "classification":
        sections += _classification_sections(metrics_doc, cases, names, links)
    else:
        seg_sections, seg_lead = _segmentation_page_sections(lay, model, edir, metrics_doc,
                                                             cases, names, links)
        sections += seg_sections
        lead += seg_lead
    sections.append(_provenance_section(metrics_doc, train))
    return render_page(out, "page.html", title=f"{dataset}: {model}, {stage} stage",
                       subtitle=f"{task} \u00b7 {n_cases} cases",
                       nav=_stage_nav(lay, model, stage, report_dir), lead=lead, note=None,
                       top_cards=_stage_cards(task, metrics, ci95, n_cases, stage, train, cost),
                       sections=sections)
