"""``results/index.html``: one page linking every report of a run (relative links)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsmed.errors import CapsmedError
from capsmed.paths import DatasetLayout
from capsmed.report import blocks as b
from capsmed.report.comparison import family_label, model_family
from capsmed.report.files import STAGES
from capsmed.report.generalisation import shift_line
from capsmed.report.render import (
    fmt_ci,
    fmt_flops,
    fmt_metric,
    fmt_params,
    is_number,
    lower_is_better,
    metric_label,
    rel_href,
    render_page,
    safe_relative_link,
)
from capsmed.report.stage import PRIMARY_METRICS, primary_metric

logger = logging.getLogger(__name__)


def _stage_cell(stage_doc: Any, task: str) -> dict[str, Any]:
    if not isinstance(stage_doc, Mapping):
        return b.cell("")
    metrics = stage_doc.get("metrics") if isinstance(stage_doc.get("metrics"), Mapping) else {}
    name = primary_metric(task, metrics) or next(
        (k for k, v in metrics.items() if is_number(v)), None)
    text = (f"{metric_label(name).replace(' (mm)', '')} {fmt_metric(metrics[name], name)}"
            if name else "report")
    ci95 = stage_doc.get("ci95") if isinstance(stage_doc.get("ci95"), Mapping) else {}
    if name and fmt_ci(ci95.get(name), name):
        text += f" {fmt_ci(ci95[name], name)}"
    href = safe_relative_link(stage_doc.get("report"))
    return b.num_cell(text) if href is None else b.cell(text, href=href, cls="num")


def write_index(results_dir: Path, summary: dict) -> Path:
    """Write ``results/index.html`` from ``results/summary.json`` (DESIGN.md section 2).

    Lists every dataset with its models, each stage's headline metric linked to the stage report,
    every study report, and the dataset's comparison and QC pages when they exist. Links are the
    relative paths of ``summary.json``; entries that are not relative paths are shown unlinked.

    Args:
        results_dir: The results folder (where ``index.html`` is written).
        summary: The ``summary.json`` dict: ``{"datasets": {ds: {"task", "models": {model:
            {"params", "stages": {stage: {"metrics", "report"}}, "studies": {id: path}}}}}}``.

    Returns:
        The written ``index.html`` path.

    Raises:
        CapsmedError: ``summary`` has no ``datasets`` mapping.
    """
    results_dir = Path(results_dir)
    datasets = summary.get("datasets") if isinstance(summary, Mapping) else None
    if not isinstance(datasets, Mapping):
        raise CapsmedError("summary.json: expected {\"datasets\": {...}} (see DESIGN.md section 2)")
    out = results_dir / "index.html"
    sections = []
    lead = []
    n_studies = 0
    n_models = 0
    for ds, ds_doc in datasets.items():
        ds = str(ds)
        ds_doc = ds_doc if isinstance(ds_doc, Mapping) else {}
        task = str(ds_doc.get("task") or "")
        models = ds_doc.get("models") if isinstance(ds_doc.get("models"), Mapping) else {}
        n_models += len(models)
        lay = DatasetLayout(results_dir, ds)
        page_links = []
        for key, text in (("comparison", "Model comparison"), ("qc", "Preprocessing QC")):
            given = safe_relative_link(ds_doc.get(key))
            if given:
                page_links.append((text, given))
            elif (lay.reports_dir / f"{key}.html").exists():
                page_links.append((text, rel_href(lay.reports_dir / f"{key}.html", results_dir)))
        gen = ds_doc.get("generalisation") if isinstance(ds_doc.get("generalisation"),
                                                          Mapping) else {}
        gen_href = safe_relative_link(gen.get("report"))
        if gen_href:
            gen_models = gen.get("models") if isinstance(gen.get("models"), Mapping) else {}
            capsules = {str(m) for m, d in models.items()
                        if isinstance(d, Mapping) and model_family(d) == "capsule"}
            line = shift_line(gen.get("reference"), {
                str(m): d for m, d in gen_models.items() if isinstance(d, Mapping)}, capsules)
            page_links.append((line or "Generalisation (under shift, with less data)", gen_href))
        rows = []
        best: tuple[float, str, str] | None = None
        detail_links = []
        for model, mdoc in models.items():
            model = str(model)
            mdoc = mdoc if isinstance(mdoc, Mapping) else {}
            stages = mdoc.get("stages") if isinstance(mdoc.get("stages"), Mapping) else {}
            cells = [b.cell(model), family_label(model_family(mdoc)),
                     b.num_cell(fmt_params(mdoc.get("params"))),
                     b.num_cell(fmt_flops(mdoc.get("flops")))]
            cells += [_stage_cell(stages.get(s), task) for s in STAGES]
            studies = mdoc.get("studies") if isinstance(mdoc.get("studies"), Mapping) else {}
            links = []
            for cid, path in studies.items():
                href = safe_relative_link(path)
                if href:
                    links.append(b.link(str(cid), href))
            n_studies += len(links)
            cells.append(b.num_cell(len(links)))
            rows.append(b.row(cells))
            if links:
                detail_links.append((model, links))
            test = stages.get("test") if isinstance(stages.get("test"), Mapping) else {}
            metrics = test.get("metrics") if isinstance(test.get("metrics"), Mapping) else {}
            name = primary_metric(task, metrics)
            if name:
                score = float(metrics[name]) * (-1 if lower_is_better(name) else 1)
                if best is None or score > best[0]:
                    best = (score, model, f"{metric_label(name)} {fmt_metric(metrics[name], name)}")
        paragraphs = [f"Task: {task or 'unknown'}; {len(models)} models."]
        if best is not None:
            paragraphs.append(f"Best on the test stage: {best[1]} ({best[2]}).")
            lead.append(f"{ds}: best on test is {best[1]} ({best[2]}).")
        metric = PRIMARY_METRICS.get(task, ("",))[0]
        table = b.table(["Model", "Family", "Parameters", "FLOPs"]
                        + [f"{s.capitalize()}" for s in STAGES]
                        + ["Study reports"], rows,
                        note="Stage cells show the headline metric [95% CI]"
                             + (f" ({metric_label(metric)})" if metric else "")
                             + " and link to the stage report.")
        nav_table = b.table([], [b.row([b.cell(text, href=href)]) for text, href in page_links]) \
            if page_links else None
        section = b.section(f"ds-{len(sections)}", ds, paragraphs=paragraphs,
                            tables=[t for t in (nav_table, table) if t])
        sections.append(section)
        for model, links in detail_links:
            sections.append(b.section(f"ds-{len(sections)}-studies",
                                      f"{ds}: {model} study reports",
                                      details=b.details(f"{len(links)} study reports", links=links)))
    if not datasets:
        lead.append("The summary lists no datasets yet.")
    else:
        lead.insert(0, f"{len(datasets)} datasets, {n_models} trained models, {n_studies} study "
                       "reports.")
    return render_page(out, "page.html", title="capsmed results", subtitle=str(results_dir.name),
                       nav=[], lead=lead, note=None, top_cards=[], sections=sections)
