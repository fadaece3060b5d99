"""Reading a dashboard page the way a test needs it: rows by class, stream items, images, links, the refresh."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser

SVG = "{http://www.w3.org/2000/svg}"
#: Elements whose text and cells a test reads, by class (``li`` items of the stream by ``data-task``).
READ = {"point", "round", "skipped", "project", "worker"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    cells: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """Parses one HTML page; ``rows[cls]`` are the ``tr``s of that class, ``stream`` the next tasks in order."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, list[Element]] = {name: [] for name in READ}
        self.stream: list[Element] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.refresh: str | None = None
        self._open: list[Element] = []
        self._cell: list[str] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a.get("content")
        classes = set(a.get("class", "").split())
        if (tag == "tr" and classes & READ) or (tag == "li" and "data-task" in a):
            self._open.append(Element(tag, a))
        elif tag == "td" and self._open:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._open:
            self._open[-1].cells.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("tr", "li") and self._open and self._open[-1].tag == tag:
            element = self._open.pop()
            element.text = " ".join(element.text.split())
            if tag == "li":
                self.stream.append(element)
            else:
                self.rows[next(iter(set(element.attrs["class"].split()) & READ))].append(element)

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1].text += data
        if self._cell is not None:
            self._cell.append(data)


def curve_points(svg: bytes) -> int:
    """Markers of the learning curve's line (matplotlib draws each as a ``<use>`` in the line's group)."""
    root = ET.fromstring(svg)
    groups = [g for g in root.iter(f"{SVG}g") if g.get("id") == "curve-points"]
    assert len(groups) == 1, "the curve's line (gid curve-points) is missing from the SVG"
    return sum(1 for _ in groups[0].iter(f"{SVG}use"))
