"""Building blocks of a page, as plain dicts that ``templates/macros.html`` renders.

Every block carries all of its keys (the Jinja2 environment uses ``StrictUndefined``), so pages are
built only through these constructors. Text is plain text: the templates escape it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def cell(text: Any, href: str | None = None, cls: str = "", title: str = "",
         bar: float | None = None) -> dict[str, Any]:
    """A table cell.

    Args:
        text: Cell text.
        href: Safe relative link (see :func:`capsmed.report.render.safe_relative_link`) or None.
        cls: CSS classes (``num``, ``good``, ``bad``, ``warn``).
        title: Tooltip.
        bar: A value in [0, 1] drawn as a horizontal bar after the text (probabilities, capsule
            lengths), or None.
    """
    if bar is not None:
        bar = min(max(float(bar), 0.0), 1.0) if bar == bar else 0.0  # NaN -> empty bar
    return {"text": "" if text is None else str(text), "href": href, "cls": cls, "title": title,
            "bar": None if bar is None else round(100 * bar, 1)}


def bar_cell(value: float | None, text: str, highlight: bool = False) -> dict[str, Any]:
    """A cell with a number and a bar of length ``value`` (in [0, 1]); highlighted when chosen."""
    return cell(text, cls="barcell" + (" hl" if highlight else ""),
                bar=value if value is not None else 0.0)


def num_cell(text: Any, cls: str = "", title: str = "") -> dict[str, Any]:
    """A right-aligned numeric table cell."""
    return cell(text, cls=("num " + cls).strip(), title=title)


def row(cells: Iterable[Any], cls: str = "") -> dict[str, Any]:
    """A table row of cells (plain strings or :func:`cell` dicts)."""
    return {"cells": list(cells), "cls": cls}


def table(header: Sequence[Any], rows: Iterable[dict[str, Any]], caption: str = "",
          cls: str = "", note: str = "") -> dict[str, Any]:
    """A table with a header row, rows from :func:`row`, an optional caption and a note below."""
    return {"header": list(header), "rows": list(rows), "caption": caption, "cls": cls,
            "note": note}


def kv_table(pairs: Iterable[tuple[str, Any]], caption: str = "") -> dict[str, Any]:
    """A two-column key/value table."""
    return table([], [row([cell(k, cls="key"), cell(v)]) for k, v in pairs], caption=caption,
                 cls="kv")


def figure(uri: str | None, alt: str, caption: str = "", href: str | None = None,
           link_text: str = "") -> dict[str, Any] | None:
    """A figure; None when there is no image (sections drop Nones).

    Args:
        uri: PNG data URI, or None.
        alt: Alt text (required).
        caption: Caption below the image.
        href: Optional safe relative link shown after the caption.
        link_text: Text of that link.
    """
    if not uri:
        return None
    if not alt:
        raise ValueError("every figure needs alt text")
    return {"uri": uri, "alt": alt, "caption": caption, "href": href,
            "link_text": link_text or "open"}


def figures(*items: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The non-None figures among ``items``."""
    return [f for f in items if f is not None]


def card(key: str, value: Any, comment: str = "") -> dict[str, str]:
    """A headline number card: small caption ``key``, big ``value``, small ``comment``."""
    return {"k": key, "v": "" if value is None else str(value), "c": comment}


def section(sid: str, title: str, paragraphs: Iterable[str] = (), cards: Iterable[dict] = (),
            tables: Iterable[dict] = (), figs: Iterable[dict | None] = (),
            subsections: Iterable[dict] = (), details: dict | None = None) -> dict[str, Any]:
    """A page section (``<section id=sid>`` with an ``<h2>`` title)."""
    return {"id": sid, "title": title, "paragraphs": [p for p in paragraphs if p],
            "cards": list(cards), "tables": list(tables),
            "figures": [f for f in figs if f is not None], "subsections": list(subsections),
            "details": details}


def subsection(title: str, paragraphs: Iterable[str] = (), tables: Iterable[dict] = (),
               figs: Iterable[dict | None] = ()) -> dict[str, Any]:
    """An ``<h3>`` block inside a section."""
    return {"title": title, "paragraphs": [p for p in paragraphs if p], "tables": list(tables),
            "figures": [f for f in figs if f is not None]}


def details(summary: str, tables: Iterable[dict] = (), links: Iterable[dict] = ()
            ) -> dict[str, Any]:
    """A collapsed block (``<details>``) with tables and/or a list of ``{"text", "href"}`` links."""
    return {"summary": summary, "tables": list(tables), "links": list(links)}


def link(text: str, href: str) -> dict[str, str]:
    """A navigation link; ``href`` must already be a safe relative link."""
    return {"text": text, "href": href}
