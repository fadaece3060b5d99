"""The dashboard's plots, drawn on the server as SVG with matplotlib.

matplotlib is imported on the first plot (the web process answers webhooks without it) and used without
pyplot: each plot is its own ``Figure``, drawn under one lock (rcParams are process-wide) and cached by
what it shows, so a page that refreshes every few seconds draws each plot once per round.
Text stays text in the SVG (``svg.fonttype: none``): the browser's own fonts, and the numbers can be read.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from isal_backend.history import STEPS

CACHE_SIZE = 64
#: matplotlib settings of every plot (deterministic ids, live text, the page's palette).
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "isal-dashboard", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "axes.edgecolor": "#666", "axes.labelcolor": "#333", "xtick.color": "#555",
         "ytick.color": "#555", "font.family": "sans-serif"}
STEP_COLOURS = ("#4e79a7", "#59a14f", "#f28e2b", "#e15759", "#b07aa1", "#76b7b2")
STEP_NAMES = {"fetch": "fetch", "features": "features", "fit": "fit", "s_test": "s_test", "score": "score",
              "write_back": "write back"}

_lock = threading.Lock()
_cache: OrderedDict[Hashable, bytes] = OrderedDict()


def cached(key: Hashable, draw: Callable[[], bytes]) -> bytes:
    """``draw()``'s SVG, drawn once per ``key`` (the newest :data:`CACHE_SIZE` are kept)."""
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
        import matplotlib

        with matplotlib.rc_context(STYLE):
            data = draw()
        _cache[key] = data
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return data


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(figure: Any) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def _empty(figure: Any, ax: Any, text: str) -> bytes:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#666", transform=ax.transAxes)
    return _svg(figure)


def curve_svg(curve: Sequence[Mapping[str, Any]], label: str, kind: str | None) -> bytes:
    """The validation figure against the number of labels, one marker per round (``gid="curve-points"``)."""
    figure = _figure(6.4, 2.9)
    ax = figure.add_subplot()
    if not curve:
        return _empty(figure, ax, "no validation figure yet: every round so far was a cold start")
    x = [float(c["labeled"] or 0) for c in curve]
    y = [100.0 * float(c["value"]) for c in curve]
    ax.plot(x, y, marker="o", markersize=4, linewidth=1.5, color="#4e79a7", gid="curve-points", clip_on=False)
    last = curve[-1]
    ax.annotate(f"round {last['round']}: {y[-1]:.1f}%", (x[-1], y[-1]), textcoords="offset points", xytext=(-6, 8),
                ha="right", color="#333")
    low, high = min(y), max(y)
    pad = max(2.0, 0.15 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_xlabel("labels" if kind != "detection" else "annotated images")
    ax.set_ylabel(f"{label} (%)")
    ax.grid(True, color="#eee")
    return _svg(figure)


def timeline_svg(rounds: Sequence[Mapping[str, Any]]) -> bytes:
    """Each round's steps stacked (seconds), the freshness of its order as a marker where known."""
    figure = _figure(6.4, 2.9)
    ax = figure.add_subplot()
    if not rounds:
        return _empty(figure, ax, "no round yet")
    x = [int(r["round"]) for r in rounds]
    bottom = [0.0] * len(rounds)
    for step, colour in zip(STEPS, STEP_COLOURS, strict=True):
        heights = [float(r["steps"].get(step) or 0.0) for r in rounds]
        ax.bar(x, heights, bottom=bottom, color=colour, width=0.7, label=STEP_NAMES[step])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    known = [(xi, float(r["freshness"])) for xi, r in zip(x, rounds, strict=True) if r.get("freshness") is not None]
    if known:
        ax.plot([k[0] for k in known], [k[1] for k in known], linestyle="none", marker="D", markersize=4,
                color="#222", label="freshness")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", color="#eee")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    return _svg(figure)


def classes_svg(classes: Mapping[str, Any], limit: int = 25) -> bytes:
    """Per class, its share of the labels and of the pool's predictions (counts at the bars' ends)."""
    labeled: Mapping[str, int] = classes.get("labeled") or {}
    predicted: Mapping[str, int] = classes.get("pool_predicted") or {}
    names = sorted(labeled, key=lambda n: (-(labeled.get(n, 0) + predicted.get(n, 0)), n))[:limit][::-1]
    figure = _figure(6.4, 0.9 + 0.32 * max(1, len(names)))
    ax = figure.add_subplot()
    if not names:
        return _empty(figure, ax, "no class yet")
    total_l, total_p = max(1, sum(labeled.values())), max(1, sum(predicted.values()))
    rows = range(len(names))
    unit = classes.get("unit") or "items"
    bars = [("labeled", labeled, total_l, "#4e79a7", 0.2)]
    if predicted:
        bars.append(("pool, predicted", predicted, total_p, "#f28e2b", -0.2))
    for title, counts, total, colour, offset in bars:
        shares = [100.0 * counts.get(n, 0) / total for n in names]
        drawn = ax.barh([r + offset for r in rows], shares, height=0.38, color=colour, label=f"{title} ({unit})")
        ax.bar_label(drawn, labels=[str(counts.get(n, 0)) for n in names], padding=2, fontsize=7, color="#444")
    ax.set_yticks(list(rows), names)
    ax.set_xlabel("share (%)")
    ax.grid(True, axis="x", color="#eee")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, fontsize=8)
    ax.margins(x=0.12)
    return _svg(figure)
