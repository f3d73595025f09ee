"""The model comparison page of a dataset: capsule networks and CNN baselines side by side."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsmed.errors import CapsmedError
from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report import figures as fig
from capsmed.report.files import STAGES, read_json, task_of, to_float
from capsmed.report.render import (
    fmt_ci,
    fmt_flops,
    fmt_mb,
    fmt_metric,
    fmt_params,
    fmt_seconds,
    is_number,
    lower_is_better,
    metric_label,
    metric_sort_key,
    rel_href,
    render_page,
)
from capsmed.report.stage import PRIMARY_METRICS, headline_text, primary_metric

logger = logging.getLogger(__name__)

_COST_KEYS = ("params", "flops", "train_seconds", "inference_seconds_per_case", "peak_memory_mb")
#: Display names of the model families ``train.json`` records (``CapsmedModel.family``).
FAMILY_LABELS = {"capsule": "capsule", "cnn": "CNN"}


def model_family(train: Mapping[str, Any] | None) -> str | None:
    """The family ``capsmed train`` recorded for a model: ``"capsule"``, ``"cnn"`` or None.

    ``train.json`` (and the model entry of ``summary.json``) carries ``"family"``, the
    ``family`` class attribute of the model's registry class; without it the family is unknown.
    """
    family = (train or {}).get("family")
    return family if family in FAMILY_LABELS else None


def family_label(family: str | None) -> str:
    """``"capsule"``, ``"CNN"`` or ``"unknown"`` for a :func:`model_family` value."""
    return FAMILY_LABELS.get(family or "", "unknown")


_RATIO_WORDS = {"params": ("fewer parameters", "more parameters"),
                "flops": ("fewer FLOPs", "more FLOPs"),
                "train_seconds": ("faster training", "slower training"),
                "inference_seconds_per_case": ("faster inference per case",
                                               "slower inference per case"),
                "peak_memory_mb": ("less peak training memory", "more peak training memory")}


_FAMILY_WORDS = {"capsule": "capsule network", "cnn": "CNN baseline"}


def _ratio_text(key: str, a: float | None, b_: float | None) -> str | None:
    """``5.9x fewer parameters`` for the cost ``key`` of model a against model b."""
    if a is None or b_ is None or a <= 0 or b_ <= 0 or key not in _RATIO_WORDS:
        return None
    less, more = _RATIO_WORDS[key]
    if a == b_:
        return f"the same {less.split(' ', 1)[1]}"
    return f"{b_ / a:.1f}x {less}" if a < b_ else f"{a / b_:.1f}x {more}"


def _score(e: Mapping[str, Any], stage: str, metric: str) -> float | None:
    """A model entry's ``metric`` on ``stage``, or None."""
    v = e["metrics"].get(stage, {}).get(metric)
    return float(v) if is_number(v) else None


def _interval(e: Mapping[str, Any], stage: str, metric: str) -> tuple[float, float] | None:
    """A model entry's 95% interval of ``metric`` on ``stage``, or None."""
    c = e["ci95"].get(stage, {}).get(metric)
    if isinstance(c, list | tuple) and len(c) == 2 and all(is_number(x) for x in c):
        return float(c[0]), float(c[1])
    return None


def _overlap(a: Mapping[str, Any], b_: Mapping[str, Any], stage: str, metric: str) -> bool | None:
    """Whether two entries' 95% intervals overlap; None when either has none."""
    c1, c2 = _interval(a, stage, metric), _interval(b_, stage, metric)
    if c1 is None or c2 is None:
        return None
    return c1[0] <= c2[1] and c2[0] <= c1[1]


def _separation(a: Mapping[str, Any], b_: Mapping[str, Any], stage: str, metric: str) -> str:
    """`` and the 95% intervals overlap, so ...`` for two entries, or "" without intervals."""
    overlap = _overlap(a, b_, stage, metric)
    if overlap is None:
        return ""
    return (" and the 95% intervals overlap, so this test set does not separate them" if overlap
            else " and the 95% intervals do not overlap")


def _verdict(stage: str, entries: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """Plain sentences: which model is best, by how much, and what the capsules cost."""
    scored = [e for e in entries if is_number(e["metrics"].get(stage, {}).get(metric))]
    if not scored:
        return [f"No {stage} metrics are available yet for these models."]
    low = lower_is_better(metric)

    def value(e: dict[str, Any]) -> float:
        return float(e["metrics"][stage][metric])

    scored.sort(key=value, reverse=not low)
    best = scored[0]
    out = [f"Best on the {stage} stage by {metric_label(metric)}: {best['model']} "
           f"({_FAMILY_WORDS.get(best['family'] or '', 'family unknown')}), "
           + headline_text(metric, best["metrics"][stage], best["ci95"].get(stage, {})) + "."]
    if len(scored) > 1:
        second = scored[1]
        diff = value(best) - value(second)
        label = metric_label(metric).replace(" (mm)", "")
        out.append(f"Runner-up: {second['model']}, {label} {fmt_metric(value(second), metric)}; "
                   f"difference {fmt_metric(abs(diff), metric)}"
                   + _separation(best, second, stage, metric) + ".")
    caps = [e for e in scored if e["family"] == "capsule"]
    cnns = [e for e in scored if e["family"] == "cnn"]
    if caps and cnns:
        c, n = caps[0], cnns[0]
        diff = value(c) - value(n)
        better = (diff < 0) if low else (diff > 0)
        word = "better" if better else ("worse" if diff != 0 else "equal")
        out.append(f"Best capsule network {c['model']} against best CNN {n['model']}: "
                   f"{metric_label(metric)} {fmt_metric(value(c), metric)} against "
                   f"{fmt_metric(value(n), metric)} ({fmt_metric(abs(diff), metric)} {word}).")
        costs = [t for t in (_ratio_text(k, to_float(c["costs"].get(k)), to_float(n["costs"].get(k)))
                             for k in _RATIO_WORDS) if t]
        if costs:
            out.append(f"Cost of {c['model']} relative to {n['model']}: " + ", ".join(costs) + ".")
        fewer_params = _less(c, n, "params")
        fewer_flops = _less(c, n, "flops")
        if fewer_params is not None or fewer_flops is not None:
            answer = []
            if fewer_params is not None:
                answer.append("fewer parameters" if fewer_params else "more parameters")
            if fewer_flops is not None:
                answer.append("less computation" if fewer_flops else "more computation")
            out.append("Do capsule networks need fewer parameters and less computation here? "
                       f"Measured: {c['model']} needs " + " and ".join(answer) + f" than "
                       f"{n['model']}.")
    elif caps or cnns:
        out.append("Only " + ("capsule networks" if caps else "CNN baselines") + " were evaluated; "
                   "add the other family to answer whether capsules are cheaper.")
    return out


#: An ablation: (reference entry, variant entry, {option: (variant value, reference value)}).
_Pair = tuple[Mapping[str, Any], Mapping[str, Any], dict[str, tuple[Any, Any]]]


def ablations(entries: Sequence[Mapping[str, Any]]) -> list[_Pair]:
    """Pairs of entries built from one model class that differ in some options: ablations.

    Two config entries of one registry class (``train.json``'s ``model_class``), both with the
    ``model_args`` that ``capsmed train`` records, form an ablation when their options differ,
    e.g. ``capsunet`` and ``capsunet_1iter: {model: capsunet, args: {routing_iterations: 1}}``.
    The reference of a class is its entry named like the class, else the first one listed.

    Args:
        entries: The page's model entries, in the config's order.

    Returns:
        ``(reference, variant, {option: (variant value, reference value)})`` per variant.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in entries:
        cls, args = e["train"].get("model_class"), e["train"].get("model_args")
        if isinstance(cls, str) and isinstance(args, Mapping):
            groups.setdefault(cls, []).append(e)
    out = []
    for cls, group in groups.items():
        reference = next((e for e in group if e["model"] == cls), group[0])
        ref_args = reference["train"]["model_args"]
        for e in group:
            args = e["train"]["model_args"]
            changed = {k: (args.get(k), ref_args.get(k)) for k in sorted(set(args) | set(ref_args))
                       if args.get(k) != ref_args.get(k)}
            if e is not reference and changed:
                out.append((reference, e, changed))
    return out


def _changes_text(changed: Mapping[str, tuple[Any, Any]]) -> str:
    """``routing_iterations 1 instead of 3`` for the options an ablation changes."""
    return ", ".join(f"{k} {v!s} instead of {r!s}" for k, (v, r) in changed.items())


def _ablation_sentence(reference: Mapping[str, Any], variant: Mapping[str, Any],
                       changed: Mapping[str, tuple[Any, Any]], stage: str, metric: str) -> str:
    """One plain sentence: what the ablation changed, its cost, and whether it mattered."""
    costs = []
    for key, word in (("params", "parameters"), ("flops", "FLOPs")):
        v, r = to_float(variant["costs"].get(key)), to_float(reference["costs"].get(key))
        if v is not None and r is not None and r > 0:
            costs.append(f"the same {word}" if v == r else f"{v / r:.3f}x the {word}")
    head = (f"Ablation of {reference['model']}: {variant['model']} ({_changes_text(changed)}"
            + "".join(f"; {c}" for c in costs[:1]) + "".join(f", {c}" for c in costs[1:]) + ")")
    v, r = _score(variant, stage, metric), _score(reference, stage, metric)
    if v is None or r is None:
        return head + f": no {stage} {metric_label(metric)} for both yet."
    diff = v - r
    better = (diff < 0) if lower_is_better(metric) else (diff > 0)
    word = "better" if better else ("worse" if diff else "equal")
    sentence = (f"{head} reaches {metric_label(metric)} {fmt_metric(v, metric)} against "
                f"{fmt_metric(r, metric)} ({fmt_metric(abs(diff), metric)} {word})")
    if _overlap(variant, reference, stage, metric):
        return sentence + ("; the 95% intervals overlap, so this test set does not show that "
                           "the change matters.")
    return sentence + _separation(variant, reference, stage, metric) + "."


def _ablation_section(pairs: Sequence[_Pair], stage: str, metric: str) -> dict[str, Any] | None:
    """A table of the ablations (:func:`ablations`) on the judged stage; None without one."""
    if not pairs:
        return None
    rows = []
    for reference, variant, changed in pairs:
        v, r = _score(variant, stage, metric), _score(reference, stage, metric)
        ci = fmt_ci(variant["ci95"].get(stage, {}).get(metric), metric)
        rows.append(b.row([
            variant["model"], reference["model"], _changes_text(changed),
            family_label(variant["family"]),
            b.num_cell(fmt_params(variant["costs"].get("params"))),
            b.num_cell(fmt_flops(variant["costs"].get("flops"))),
            b.num_cell(fmt_metric(v, metric) + (f" {ci}" if ci else "") if v is not None
                       else "n/a"),
            b.num_cell(fmt_metric(r, metric) if r is not None else "n/a"),
            b.num_cell(f"{v - r:+.3f}" if v is not None and r is not None else "n/a")]))
    return b.section(
        "ablations", "Ablations",
        paragraphs=["Entries of one model class that differ in some options, trained on the same "
                    "data with the same recipe: one routing iteration (uniform couplings) or a "
                    "fixed-weight block (capsule_block conv or linear) in place of routing keeps "
                    "the parameters and FLOPs, so a variant level with its reference says that "
                    "routing is not what makes the model accurate here. "
                    f"{metric_label(metric)} on the {stage} stage."],
        tables=[b.table(["Variant", "Reference", "Changed options", "Family", "Parameters",
                         "FLOPs", f"{metric_label(metric)} [95% CI]", "Reference value",
                         "Difference"], rows)])


def _less(a: dict[str, Any], b_: dict[str, Any], key: str) -> bool | None:
    x, y = to_float(a["costs"].get(key)), to_float(b_["costs"].get(key))
    if x is None or y is None:
        return None
    return x < y


def _crossval_section(lay: DatasetLayout, models: Sequence[str], fold: int | None) -> Any | None:
    """A table of each model's cross-validation result (``cv/{model}.json``), if any."""
    docs = {m: read_json(lay.crossval(m)) for m in models}
    docs = {m: d for m, d in docs.items() if d.get("mean")}
    if not docs:
        return None
    names = sorted({k for d in docs.values() for k, v in d["mean"].items() if is_number(v)},
                   key=metric_sort_key)
    rows = []
    for model, doc in docs.items():
        cells = [model, b.num_cell(str(len(doc.get("per_fold") or [])))]
        for m in names:
            mean, sd = doc["mean"].get(m), (doc.get("sd") or {}).get(m)
            text = fmt_metric(mean, m) if is_number(mean) else "n/a"
            if is_number(mean) and is_number(sd):
                text += f" \u00b1 {fmt_metric(sd, m)}"
            cells.append(b.num_cell(text))
        rows.append(b.row(cells))
    shown = "" if fold is None else (
        f" The other sections show fold {fold}, the fold evaluated on every stage.")
    return b.section(
        "crossval", "Cross-validation (validation cases of each fold)",
        paragraphs=["Each fold's model is evaluated on that fold's validation cases; the table "
                    "gives the mean \u00b1 standard deviation over folds." + shown],
        tables=[b.table(["Model", "Folds"] + [metric_label(m) for m in names], rows)])


def _model_entry(lay: DatasetLayout, model: str) -> dict[str, Any]:
    """What the page shows of one model: train.json, metrics and CIs per stage, costs, family."""
    train = read_json(lay.model_dir(model) / "train.json")
    metrics, ci95, costs = {}, {}, {k: train.get(k) for k in _COST_KEYS}
    task = ""
    stage_cost: dict[str, Any] = {}
    for stage in STAGES:
        doc = read_json(lay.eval_dir(model, stage) / "metrics.json")
        if not doc:
            continue
        task = task or str(doc.get("task") or "")
        metrics[stage] = doc.get("metrics") or {}
        ci95[stage] = doc.get("ci95") or {}
        stage_cost[stage] = doc.get("cost") or {}
    # Inference cost: from the test stage where present.
    for stage in ("test", "val", "train"):
        c = stage_cost.get(stage) or {}
        if is_number(c.get("inference_seconds_per_case")):
            costs["inference_seconds_per_case"] = c["inference_seconds_per_case"]
            costs["inference_peak_memory_mb"] = c.get("peak_memory_mb")
            break
    return {"model": model, "train": train, "metrics": metrics, "ci95": ci95, "costs": costs,
            "family": model_family(train), "task": task}


def _metrics_section(entries: Sequence[dict[str, Any]], stage: str, lay: DatasetLayout,
                     out: Path) -> dict[str, Any] | None:
    """Every model's metrics with 95% CIs on one stage, the best value per metric in green."""
    names = sorted({m for e in entries for m, v in e["metrics"].get(stage, {}).items()
                    if not isinstance(v, Mapping | list)}, key=metric_sort_key)
    if not names:
        return None
    best: dict[str, float] = {}
    for m in names:
        vals = [float(e["metrics"][stage][m]) for e in entries
                if is_number(e["metrics"].get(stage, {}).get(m))]
        if vals:
            best[m] = min(vals) if lower_is_better(m) else max(vals)
    rows = []
    for e in entries:
        if stage not in e["metrics"]:
            continue
        # Every stage with a metrics.json gets a stage report (written before or after this).
        href = rel_href(lay.stage_report(e["model"], stage), out.parent)
        cells = [b.cell(e["model"], href=href), family_label(e["family"])]
        for m in names:
            v = e["metrics"][stage].get(m)
            ci = fmt_ci(e["ci95"][stage].get(m), m)
            text = fmt_metric(v, m) + (f" {ci}" if ci else "")
            is_best = is_number(v) and m in best and float(v) == best[m]
            cells.append(b.num_cell(text, cls="good" if is_best else ""))
        rows.append(b.row(cells))
    return b.section(
        f"metrics-{stage}", f"Metrics, {stage} stage",
        tables=[b.table(["Model", "Family"] + [metric_label(m) for m in names], rows,
                        note="Value [95% CI]; the best value per metric is in green.")])


def _cost_section(entries: Sequence[dict[str, Any]], judged: str, metric: str
                  ) -> dict[str, Any]:
    """Parameters, FLOPs, time and memory per model, and the metric-against-cost figures."""
    rows = []
    for e in entries:
        c, t = e["costs"], e["train"]
        rows.append(b.row([
            e["model"], family_label(e["family"]),
            b.num_cell(fmt_params(c.get("params"))), b.num_cell(fmt_flops(c.get("flops"))),
            b.num_cell(fmt_seconds(c.get("train_seconds"))),
            b.num_cell(f"{t.get('epochs', 'n/a')}"),
            b.num_cell(fmt_seconds(c.get("inference_seconds_per_case"))),
            b.num_cell(fmt_mb(c.get("peak_memory_mb"))),
            b.num_cell(fmt_mb(c.get("inference_peak_memory_mb")))]))
    points = [fig.ModelPoint(
        name=e["model"], capsule=e["family"] == "capsule",
        metric=float(e["metrics"].get(judged, {}).get(metric, np.nan))
        if is_number(e["metrics"].get(judged, {}).get(metric)) else float("nan"),
        ci=tuple(e["ci95"].get(judged, {}).get(metric)) if fmt_ci(
            e["ci95"].get(judged, {}).get(metric)) else None,
        costs={k: float(c) if is_number(c) else float("nan") for k, c in e["costs"].items()})
        for e in entries]
    return b.section(
        "cost", "Cost", paragraphs=[
            "Parameters and FLOPs per forward pass as measured by `capsmed train`; training time "
            "and training peak memory from train.json; inference time per case and inference peak "
            "memory from the evaluation of the test stage."],
        tables=[b.table(["Model", "Family", "Parameters", "FLOPs", "Training time", "Epochs",
                         "Inference per case", "Peak memory (train)",
                         "Peak memory (inference)"], rows)],
        figs=[b.figure(fig.tradeoff_figure(points, f"{metric_label(metric)}, {judged}"),
                       f"{metric_label(metric)} against parameters, FLOPs and inference time for "
                       "each model",
                       f"{metric_label(metric)} on the {judged} stage (bars: 95% CI) against cost; "
                       "circles are capsule networks, squares CNN baselines. Up and to the left is "
                       "better."),
              b.figure(fig.cost_bars(points), "Bar charts of each model's cost",
                       "Cost per model; orange: capsule networks, green: CNN baselines.")])


def _judged_metric(entries: Sequence[dict[str, Any]], task: str) -> tuple[str, str]:
    """The stage models are judged on (test, else val, else train) and its primary metric."""
    judged = next((s for s in ("test", "val", "train")
                   if any(s in e["metrics"] for e in entries)), "test")
    metric = next((m for m in (primary_metric(task, e["metrics"].get(judged, {}))
                               for e in entries) if m), None)
    return judged, metric or PRIMARY_METRICS.get(task, ("dice",))[0]


def _links_section(entries: Sequence[dict[str, Any]], lay: DatasetLayout, out: Path
                   ) -> dict[str, Any] | None:
    """Links to every stage report of every model; None when there is none."""
    links = [b.link(f"{e['model']} {s}", rel_href(lay.stage_report(e["model"], s), out.parent))
             for e in entries for s in STAGES if s in e["metrics"]]
    if not links:
        return None
    return b.section("reports", "Stage reports", details=b.details("All stage reports",
                                                                   links=links))


def _shift_sentence(lay: DatasetLayout, entries: Sequence[Mapping[str, Any]]) -> str | None:
    """The generalisation page's line (:func:`capsmed.report.generalisation.shift_line`), if any.

    Read from ``generalisation.json`` (written by ``capsmed generalisation``); None without it.
    """
    from capsmed.report.generalisation import shift_line  # it imports this module

    doc = read_json(lay.layout.generalisation(lay.dataset))
    return shift_line(doc.get("reference"), doc.get("models") or {},
                      {e["model"] for e in entries if e["family"] == "capsule"})


def write_comparison_report(results_dir: Path, dataset: str, models: list[str], *,
                            fold: int | None = None) -> Path:
    """Write ``results/{ds}/reports/comparison.html``.

    Puts every model's metrics with 95% CIs per stage next to its cost (parameters, FLOPs,
    training time, inference time per case, peak memory), says which model is best and by how much,
    compares the best capsule network with the best CNN baseline, and shows ablations (entries
    of one model class that differ in some options, :func:`ablations`) against their reference.

    Args:
        results_dir: The results folder.
        dataset: Dataset name.
        models: Models to compare (those without any ``metrics.json`` are listed as missing).
        fold: The reported fold of a dataset with several folds (its files live in ``fold{k}``
            folders); ``None`` with one fold. Cross-validation summaries (``cv/{model}.json``),
            where present, get a table of their own.

    Returns:
        The written report path.

    Raises:
        CapsmedError: ``models`` is empty.
    """
    if not models:
        raise CapsmedError(f"comparison report for {dataset}: no models given")
    results_dir = Path(results_dir)
    lay = DatasetLayout(results_dir, dataset, fold)
    out = lay.reports_dir / "comparison.html"
    entries = [_model_entry(lay, model) for model in models]
    missing = [e["model"] for e in entries if not e["metrics"] and not e["train"]]
    task = task_of(*entries, read_json(lay.cases), default="")
    judged, metric = _judged_metric(entries, task)
    sections = [s for s in (_metrics_section(entries, stage, lay, out) for stage in STAGES) if s]
    sections.append(_crossval_section(lay, models, fold))
    pairs = ablations(entries)
    sections.append(_ablation_section(pairs, judged, metric))
    sections.append(_cost_section(entries, judged, metric))
    if missing:
        sections.append(b.section("missing", "Missing results", paragraphs=[
            "No train.json or metrics.json was found for: " + ", ".join(missing) + "."]))
    sections.append(_links_section(entries, lay, out))
    nav = [b.link("All results", rel_href(results_dir / "index.html", out.parent))]
    if (lay.reports_dir / "qc.html").exists():
        nav.append(b.link("Preprocessing QC", "qc.html"))
    shift = _shift_sentence(lay, entries)
    if shift:
        nav.append(b.link("Generalisation", rel_href(
            lay.layout.generalisation_report(dataset), out.parent)))
    return render_page(out, "page.html", title=f"{dataset}: model comparison",
                       subtitle=f"{task} \u00b7 {len(models)} models", nav=nav,
                       lead=_verdict(judged, entries, metric) + [
                           _ablation_sentence(*pair, judged, metric) for pair in pairs]
                       + ([f"{shift[:-1]} (see the generalisation page)."] if shift else []),
                       note=None, top_cards=[],
                       sections=[s for s in sections if s is not None])
