"""Shared rendering helpers: the Jinja2 environment, number formatting, safe file names and links.

Everything a template shows passes through Jinja2 with autoescaping on, so user text (study ids, class
names, file paths) is escaped. Links are always relative (the reports open from ``file://``), and a
link whose target has a URL scheme (``javascript:``, ``http:``) is never emitted.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2

import capsmed
from capsmed.paths import safe_name

logger = logging.getLogger(__name__)

RESEARCH_NOTE = (
    "For research use only. This report was produced by an experimental model and is not a "
    "medical device: do not use it for diagnosis or treatment decisions."
)

#: Metrics where a lower value is better; all others are higher-is-better.
LOWER_IS_BETTER_PREFIXES = ("hd95", "assd", "ece", "loss")

_METRIC_NAMES = {
    "dice": "Dice",
    "hd95": "HD95",
    "assd": "ASSD",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auc": "AUC",
    "f1": "F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ece": "ECE",
}
_DISTANCE_METRICS = ("hd95", "assd")
_METRIC_ORDER = ("dice", "hd95", "assd", "accuracy", "balanced_accuracy", "auc", "f1",
                 "sensitivity", "specificity", "ece")


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("capsmed.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        metric=fmt_metric,
        ci=fmt_ci,
        num=fmt_num,
        params=fmt_params,
        flops=fmt_flops,
        seconds=fmt_seconds,
        mb=fmt_mb,
        metric_name=metric_label,
    )
    return env


def render_page(out_path: Path, template: str, **context: Any) -> Path:
    """Render a template to ``out_path`` (parent folders are created).

    Args:
        out_path: The HTML file to write.
        template: Template file name under ``capsmed/report/templates``.
        **context: Template variables. ``generated`` and ``capsmed_version`` are added.

    Returns:
        ``out_path``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    context.setdefault("generated", now_iso())
    context.setdefault("capsmed_version", capsmed.__version__)
    context.setdefault("research_note", RESEARCH_NOTE)
    context.setdefault("nav", [])
    html = _environment().get_template(template).render(**context)
    out_path.write_text(html, encoding="utf-8")
    logger.info("wrote %s", out_path)
    return out_path


def now_iso() -> str:
    """The current local time as ``YYYY-MM-DD HH:MM`` (for the page footer)."""
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


# ----------------------------------------------------------------------------- names and links


def study_filename(case_id: str) -> str:
    """The report file name for a study id, safe on every file system.

    The stem is :func:`capsmed.paths.safe_name`, as for prediction files: ids made only of letters,
    digits, ``.``, ``_`` and ``-`` are kept (``case_017`` -> ``case_017.html``); other ids have
    unsafe runs replaced by ``_`` and a short hash of the original appended, so two different ids
    never share a file.

    Args:
        case_id: The study id as it appears in ``cases.csv``.

    Returns:
        A file name ending in ``.html``.
    """
    return f"{safe_name(case_id)}.html"


def rel_href(target: Path, from_dir: Path) -> str:
    """A relative, percent-encoded link from the folder ``from_dir`` to the file ``target``."""
    rel = os.path.relpath(Path(target).resolve(), Path(from_dir).resolve())
    return quote(Path(rel).as_posix(), safe="/-._~")


def safe_relative_link(path: str | None) -> str | None:
    """Percent-encode a relative path for use in ``href``; None for anything that is not one.

    Paths with a URL scheme (``javascript:``, ``http:``, ``data:``), a host, an absolute path or an
    empty value give None, so a hostile ``summary.json`` cannot inject links.
    """
    if not path or not isinstance(path, str):
        return None
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return None
    return quote(path.replace("\\", "/"), safe="/-._~")


# ----------------------------------------------------------------------------- numbers


def is_number(value: Any) -> bool:
    """True for a finite int or float (bools excluded)."""
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def metric_base(name: str) -> str:
    """The metric family of a metric key: ``dice_anterior`` -> ``dice``."""
    for base in _METRIC_ORDER:
        if name == base or name.startswith(base + "_"):
            return base
    return name


def lower_is_better(name: str) -> bool:
    """True when smaller values of the metric ``name`` are better (distances, ECE, losses)."""
    return metric_base(name).startswith(LOWER_IS_BETTER_PREFIXES) or name.endswith("loss")


def metric_label(name: str) -> str:
    """Human name of a metric: ``dice_anterior`` -> ``Dice (anterior)``, ``hd95`` -> ``HD95 (mm)``."""
    base = metric_base(name)
    pretty = _METRIC_NAMES.get(base, name.replace("_", " ").capitalize() if base == name else base)
    suffix = name[len(base) + 1:] if name != base and name.startswith(base + "_") else ""
    unit = " (mm)" if base in _DISTANCE_METRICS else ""
    if suffix:
        return f"{pretty} ({suffix}){unit}"
    return f"{pretty}{unit}"


def metric_sort_key(name: str) -> tuple[int, str]:
    """Sort key that lists metrics in the project's order, per-class variants after their family."""
    base = metric_base(name)
    rank = _METRIC_ORDER.index(base) if base in _METRIC_ORDER else len(_METRIC_ORDER)
    return (rank * 2 + (name != base), name)


def fmt_num(value: Any, digits: int = 3) -> str:
    """Format a number with ``digits`` decimals; ``n/a`` for missing or non-finite values."""
    if not is_number(value):
        if isinstance(value, float | int) and not isinstance(value, bool) and math.isinf(value):
            return "inf"
        return "n/a"
    return f"{float(value):.{digits}f}"


def fmt_metric(value: Any, name: str = "") -> str:
    """Format a metric value: 3 decimals for scores, 2 for distances in mm."""
    digits = 2 if metric_base(name) in _DISTANCE_METRICS else 3
    return fmt_num(value, digits)


def fmt_ci(ci: Any, name: str = "") -> str:
    """Format a 95% confidence interval ``[lo, hi]``; empty string when absent."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or not all(is_number(v) for v in ci):
        return ""
    return f"[{fmt_metric(ci[0], name)}, {fmt_metric(ci[1], name)}]"


def fmt_params(value: Any) -> str:
    """Format a parameter count: ``812345`` -> ``812.3 K``."""
    if not is_number(value):
        return "n/a"
    v = float(value)
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}" if unit != "K" else f"{v / scale:.1f} {unit}"
    return f"{int(v)}"


def fmt_flops(value: Any) -> str:
    """Format a FLOP count per forward pass: ``3.2e9`` -> ``3.20 GFLOPs``."""
    if not is_number(value):
        return "n/a"
    v = float(value)
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}FLOPs"
    return f"{v:.0f} FLOPs"


def fmt_seconds(value: Any) -> str:
    """Format a duration: ``0.0123`` -> ``12.3 ms``, ``3725`` -> ``1 h 02 min``."""
    if not is_number(value):
        return "n/a"
    v = float(value)
    if v < 1:
        return f"{v * 1000:.1f} ms"
    if v < 120:
        return f"{v:.1f} s"
    if v < 3600:
        return f"{v / 60:.1f} min"
    hours, rest = divmod(int(round(v)), 3600)
    return f"{hours} h {rest // 60:02d} min"


def fmt_mb(value: Any) -> str:
    """Format a memory size given in MB: ``1536`` -> ``1.50 GB``."""
    if not is_number(value):
        return "n/a"
    v = float(value)
    return f"{v / 1024:.2f} GB" if v >= 1024 else f"{v:.0f} MB"


def ordered_metrics(metrics: Mapping[str, Any], ci95: Mapping[str, Any] | None = None
                    ) -> list[dict[str, Any]]:
    """Rows ``{"name", "label", "value", "ci", "lower_better"}`` in the project's metric order."""
    ci95 = ci95 or {}
    rows = []
    for name in sorted(metrics, key=metric_sort_key):
        value = metrics[name]
        if isinstance(value, Mapping | list):
            continue
        rows.append({"name": name, "label": metric_label(name), "value": value,
                     "ci": ci95.get(name), "lower_better": lower_is_better(name)})
    return rows
