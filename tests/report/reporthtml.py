"""A small html.parser-based page model for report tests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path


@dataclass
class Page:
    """What a report page contains, as parsed by :mod:`html.parser`."""

    path: Path
    tags: list[tuple[str, dict[str, str | None]]] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    title: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All visible text joined with spaces (entities decoded)."""
        return " ".join(" ".join(self.text_parts).split())

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        """Attributes of every ``tag`` element."""
        return [a for t, a in self.tags if t == tag]

    @property
    def images(self) -> list[dict[str, str | None]]:
        return self.attrs("img")

    @property
    def hrefs(self) -> list[str]:
        return [a["href"] or "" for t, a in self.tags if "href" in a]

    @property
    def srcs(self) -> list[str]:
        return [a["src"] or "" for t, a in self.tags if "src" in a]


class _Parser(HTMLParser):
    def __init__(self, page: Page) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.page.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br", "link", "input", "hr"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.page.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass
        else:
            self.page.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("style", "script"):
            return
        if self.stack and self.stack[-1] == "title":
            self.page.title += data
        self.page.text_parts.append(data)


def parse(path: Path) -> Page:
    """Parse an HTML file; records unbalanced closing tags in ``Page.errors``."""
    page = Page(Path(path))
    parser = _Parser(page)
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    if parser.stack:
        page.errors.append(f"unclosed tags: {parser.stack}")
    return page


#: The only script elements a report may hold: the viewer's data block (not executed) and the two
#: shared viewer scripts under ``results/assets/niivue-{version}/``.
_VIEWER_SCRIPT = re.compile(
    r'<script (type="application/json" id="cv-data"'
    r'|src="(\.\./)+assets/niivue-[0-9.]+/(niivue\.umd|capsmed-viewer)\.js")>', re.IGNORECASE)


def foreign_scripts(html: str) -> list[str]:
    """Opening ``<script`` tags of a page other than the viewer's own (should be none)."""
    tags = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    return [t for t in tags if not _VIEWER_SCRIPT.fullmatch(t)]


def is_viewer_script(attrs: dict[str, str | None]) -> bool:
    """True for the attributes of one of the viewer's script elements."""
    tag = "<script " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + ">"
    return bool(_VIEWER_SCRIPT.fullmatch(tag))
