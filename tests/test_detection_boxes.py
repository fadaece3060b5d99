"""Label Studio percent <-> pixel boxes, and every bad region handled with a message naming it."""

from __future__ import annotations

import random

import pytest
import torch

from isal_backend.detection.boxes import (
    boxes_to_regions,
    percent_to_pixels,
    pixels_to_percent,
    regions_to_boxes,
    validate_boxes,
)

NAMES = ("RBC", "WBC", "Platelets")


def test_round_trip_many_random_boxes_and_sizes() -> None:
    rng = random.Random(0)
    worst_px = worst_pct = 0.0
    for _ in range(20_000):
        w, h = rng.randint(1, 20_000), rng.randint(1, 20_000)
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        back = percent_to_pixels(*pixels_to_percent(x0, y0, x1, y1, w, h), w, h)
        worst_px = max(worst_px, *(abs(a - b) for a, b in zip(back, (x0, y0, x1, y1), strict=True)))
        pct = (rng.uniform(0, 100), rng.uniform(0, 100), rng.uniform(0, 50), rng.uniform(0, 50))
        again = pixels_to_percent(*percent_to_pixels(*pct, w, h), w, h)
        worst_pct = max(worst_pct, *(abs(a - b) for a, b in zip(again, pct, strict=True)))
    assert worst_px < 1e-8  # float64 rounding on images up to 20k px
    assert worst_pct < 1e-10


def test_integer_pixel_boxes_come_back_as_the_same_integers() -> None:
    rng = random.Random(1)
    for _ in range(5_000):
        w, h = rng.randint(2, 8_000), rng.randint(2, 8_000)
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        box = (x0, y0, rng.randint(x0 + 1, w), rng.randint(y0 + 1, h))
        back = percent_to_pixels(*pixels_to_percent(*box, w, h), w, h)
        assert tuple(round(v, 6) for v in back) == box


def test_known_conversion() -> None:
    assert percent_to_pixels(10, 20, 50, 25, 640, 480) == pytest.approx((64, 96, 384, 216))
    assert pixels_to_percent(64, 96, 384, 216, 640, 480) == pytest.approx((10, 20, 50, 25))


def test_prelabels_round_trip_with_scores() -> None:
    boxes = torch.tensor([[10.5, 20.25, 100.0, 200.0], [0.0, 0.0, 640.0, 480.0]], dtype=torch.float64)
    regions = boxes_to_regions(boxes, [2, 0], NAMES, 640, 480, scores=[0.9, 0.3])
    assert [r["value"]["rectanglelabels"] for r in regions] == [["Platelets"], ["RBC"]]
    assert [r["score"] for r in regions] == [0.9, 0.3]
    assert regions[1]["value"] == {"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0, "rotation": 0,
                                   "rectanglelabels": ["RBC"]}
    parsed = regions_to_boxes(regions, NAMES)
    assert parsed.issues == []
    assert parsed.labels == ["Platelets", "RBC"]
    assert torch.allclose(parsed.boxes, boxes, atol=1e-9, rtol=0)
    assert parsed.label_indices(NAMES).tolist() == [2, 0]


def _region(rid: str, x: float, y: float, w: float, h: float, label: str = "RBC", rotation: float = 0.0) -> dict:
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": 200, "original_height": 100,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def test_bad_regions_are_repaired_or_dropped_with_named_messages() -> None:
    results = [
        _region("good", 10, 10, 20, 20),
        _region("outside", 90, -10, 30, 50),
        _region("flat", 50, 50, 0, 10),
        _region("turned", 10, 10, 20, 20, rotation=30),
        _region("alien", 10, 10, 20, 20, label="Neutrophil"),
        {"id": "broken", "type": "rectanglelabels", "value": {"x": "a", "y": 1, "width": 1, "height": 1}},
        {"id": "text", "type": "choices", "value": {"choices": ["x"]}},
    ]
    parsed = regions_to_boxes(results, NAMES)
    kinds = {i.region: i.kind for i in parsed.issues}
    assert kinds == {"region outside": "clipped", "region flat": "zero_area", "region turned": "rotated",
                     "region alien": "unknown_label", "region broken": "malformed"}
    for issue in parsed.issues:
        assert issue.region in issue.message
    assert "Neutrophil" in next(i.message for i in parsed.issues if i.kind == "unknown_label")
    assert parsed.region_ids == ["region good", "region outside"]
    assert torch.allclose(parsed.boxes, torch.tensor([[20.0, 10.0, 60.0, 30.0], [180.0, 0.0, 200.0, 40.0]],
                                                     dtype=torch.float64))


def test_validate_boxes_drops_zero_area_and_box_entirely_outside() -> None:
    boxes = torch.tensor([[5, 5, 5, 9], [-20, -20, -10, -10], [1, 2, 3, 4], [8, 8, 30, 12]])
    out, keep, issues = validate_boxes(boxes, 10, 10, ["a", "b", "c", "d"])
    assert keep.tolist() == [False, False, True, True]
    assert [(i.region, i.kind) for i in issues] == [("a", "zero_area"), ("b", "zero_area"), ("d", "clipped")]
    assert out[3].tolist() == [8, 8, 10, 10]
