"""Boxes between Label Studio and the detector: percent <-> pixel coordinates, and validation.

Label Studio stores a ``rectanglelabels`` region as ``x, y, width, height`` in PERCENT of the
original image size (top-left corner), plus ``rotation`` in degrees. The detector works in pixel
``(x0, y0, x1, y1)``. The conversion is a scaling by ``W / 100`` and ``H / 100``; done in float64 it
round-trips to within float rounding (< 1e-9 px on any image up to 100k px), and integer pixel
boxes come back as the same integers after rounding to 1e-6.

Nothing a user can draw crashes a round: every bad region is dropped or repaired and reported as a
:class:`BoxIssue` that names the region (its Label Studio id, or its index in a VOC file):

* outside the image: clipped to the image, reported (``kind="clipped"``);
* zero or negative area (after clipping): dropped, reported (``"zero_area"``; BCCD has two);
* rotation != 0: refused, reported (``"rotated"``): an axis-aligned detector cannot learn a
  rotated box, and silently using its bounding box would teach the wrong extent;
* a label missing from the project's labeling config: dropped, reported (``"unknown_label"``);
* a region that is not a rectangle, or has missing/non-numeric coordinates: dropped (``"malformed"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BoxIssue:
    """One region that was repaired or dropped, and why."""

    kind: str
    region: str
    message: str


@dataclass
class ParsedBoxes:
    """Pixel boxes of one image with the issues met while reading them."""

    boxes: torch.Tensor  # (n, 4) float64 x0, y0, x1, y1 in pixels of the original image
    labels: list[str]
    issues: list[BoxIssue] = field(default_factory=list)
    region_ids: list[str] = field(default_factory=list)

    def label_indices(self, names: Sequence[str]) -> torch.Tensor:
        index = {n: i for i, n in enumerate(names)}
        return torch.tensor([index[n] for n in self.labels], dtype=torch.int64)


def percent_to_pixels(
    x: float, y: float, width: float, height: float, image_width: float, image_height: float
) -> tuple[float, float, float, float]:
    """Label Studio ``x, y, width, height`` (percent) -> pixel ``(x0, y0, x1, y1)``."""
    sx, sy = float(image_width) / 100.0, float(image_height) / 100.0
    return float(x) * sx, float(y) * sy, (float(x) + float(width)) * sx, (float(y) + float(height)) * sy


def pixels_to_percent(
    x0: float, y0: float, x1: float, y1: float, image_width: float, image_height: float
) -> tuple[float, float, float, float]:
    """Pixel ``(x0, y0, x1, y1)`` -> Label Studio ``x, y, width, height`` (percent)."""
    fx, fy = 100.0 / float(image_width), 100.0 / float(image_height)
    return float(x0) * fx, float(y0) * fy, (float(x1) - float(x0)) * fx, (float(y1) - float(y0)) * fy


def validate_boxes(
    boxes: torch.Tensor, image_width: float, image_height: float, names: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[BoxIssue]]:
    """Clip boxes to the image and drop degenerate ones.

    Returns ``(clipped boxes, keep mask, issues)``; ``names`` names each box in the messages.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    names = list(names) if names is not None else [f"box {i}" for i in range(len(boxes))]
    issues: list[BoxIssue] = []
    keep = torch.ones(len(boxes), dtype=torch.bool)
    out = boxes.clone()
    for i, box in enumerate(boxes.tolist()):
        if not all(math.isfinite(v) for v in box):
            keep[i] = False
            issues.append(BoxIssue("malformed", names[i], f"{names[i]}: non-finite coordinates {box}; dropped"))
            continue
        x0, y0, x1, y1 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
        c = (min(max(x0, 0.0), image_width), min(max(y0, 0.0), image_height),
             min(max(x1, 0.0), image_width), min(max(y1, 0.0), image_height))
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            keep[i] = False
            issues.append(BoxIssue(
                "zero_area", names[i],
                f"{names[i]}: box {_fmt(box)} has zero area inside the {image_width:g}x{image_height:g} image; dropped",
            ))
            continue
        if c != (x0, y0, x1, y1):
            issues.append(BoxIssue(
                "clipped", names[i],
                f"{names[i]}: box {_fmt(box)} reaches outside the {image_width:g}x{image_height:g} image; "
                f"clipped to {_fmt(c)}",
            ))
        out[i] = torch.tensor(c, dtype=torch.float64)
    return out, keep, issues


def _fmt(box: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in box) + ")"


def regions_to_boxes(
    results: Sequence[Mapping[str, object]],
    label_names: Sequence[str],
    image_width: float | None = None,
    image_height: float | None = None,
) -> ParsedBoxes:
    """Label Studio ``rectanglelabels`` results of one image -> validated pixel boxes.

    The image size comes from each region's ``original_width``/``original_height`` (Label Studio
    writes them) or from the arguments. Other result types (e.g. a choices field) are skipped silently.
    """
    known = set(label_names)
    kept: list[tuple[float, float, float, float]] = []
    labels: list[str] = []
    ids: list[str] = []
    issues: list[BoxIssue] = []
    size: tuple[float, float] | None = None
    for i, region in enumerate(results):
        if region.get("type") not in ("rectanglelabels", "rectangle"):
            continue
        rid = f"region {region.get('id', i)!s}"
        value = region.get("value")
        if not isinstance(value, Mapping):
            issues.append(BoxIssue("malformed", rid, f"{rid}: no 'value' object; dropped"))
            continue
        try:
            rotation = float(value.get("rotation", 0.0) or 0.0)
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError) as exc:
            issues.append(BoxIssue("malformed", rid, f"{rid}: missing or non-numeric coordinate ({exc}); dropped"))
            continue
        if rotation % 360.0 != 0.0:
            issues.append(BoxIssue(
                "rotated", rid,
                f"{rid}: rotated rectangle ({rotation:g} degrees) refused: the detector learns axis-aligned boxes "
                "only; redraw it without rotation",
            ))
            continue
        names = value.get("rectanglelabels") or value.get("labels") or []
        if not names:
            issues.append(BoxIssue("malformed", rid, f"{rid}: rectangle without a label; dropped"))
            continue
        name = str(names[0])
        if name not in known:
            issues.append(BoxIssue(
                "unknown_label", rid,
                f"{rid}: label {name!r} is not in the labeling config ({', '.join(label_names)}); dropped",
            ))
            continue
        width = region.get("original_width", image_width)
        height = region.get("original_height", image_height)
        if not width or not height:
            issues.append(BoxIssue("malformed", rid, f"{rid}: image size unknown (no original_width/height); dropped"))
            continue
        size = (float(width), float(height))
        kept.append(percent_to_pixels(x, y, w, h, *size))
        labels.append(name)
        ids.append(rid)
    if size is None and image_width and image_height:
        size = (float(image_width), float(image_height))
    boxes = torch.tensor(kept, dtype=torch.float64).reshape(-1, 4)
    if size is not None and len(boxes):
        boxes, keep, more = validate_boxes(boxes, size[0], size[1], ids)
        issues += more
        boxes = boxes[keep]
        labels = [n for n, k in zip(labels, keep.tolist(), strict=True) if k]
        ids = [n for n, k in zip(ids, keep.tolist(), strict=True) if k]
    return ParsedBoxes(boxes, labels, issues, ids)


def boxes_to_regions(
    boxes: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    label_names: Sequence[str],
    image_width: float,
    image_height: float,
    scores: Sequence[float] | torch.Tensor | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> list[dict[str, object]]:
    """Pixel boxes -> Label Studio ``rectanglelabels`` pre-annotation results, each with its ``score``."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    score_list = None
    if scores is not None:
        score_list = [float(s) for s in torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()]
    out = []
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels, strict=True)):
        x, y, w, h = pixels_to_percent(*box, image_width, image_height)
        region: dict[str, object] = {
            "id": f"isal-{i}",
            "from_name": from_name,
            "to_name": to_name,
            "type": "rectanglelabels",
            "original_width": int(image_width) if float(image_width).is_integer() else image_width,
            "original_height": int(image_height) if float(image_height).is_integer() else image_height,
            "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label_names[label]]},
        }
        if score_list is not None:
            region["score"] = score_list[i]
        out.append(region)
    return out
