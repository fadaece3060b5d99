"""mAP@0.5 on hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch

from isal_backend.detection.metrics import average_precision, mean_average_precision


def _p(boxes: list, scores: list, labels: list) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _g(boxes: list, labels: list) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


A, B, C = [0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]


def test_perfect_detections_give_one() -> None:
    gt = [_g([A, B], [0, 1]), _g([C], [0])]
    pred = [_p([A, B], [0.9, 0.8], [0, 1]), _p([C], [0.7], [0])]
    res = mean_average_precision(pred, gt, num_classes=3)
    assert res["map"] == pytest.approx(1.0)
    assert res["ap"] == [pytest.approx(1.0), pytest.approx(1.0), None]  # class 2 has no ground truth
    assert res["num_gt"] == [2, 1, 0]


def test_known_partial_cases() -> None:
    gt = [_g([A, B], [0, 0])]
    # TP (0.9), FP (0.8), miss: precision 1 up to recall 0.5, then nothing -> AP 0.5
    one_hit = [_p([A, C], [0.9, 0.8], [0, 0])]
    assert mean_average_precision(one_hit, gt, 1)["map"] == pytest.approx(0.5)
    # TP, FP, TP: recall 0.5 at precision 1, recall 1 at precision 2/3 -> 0.5 + 0.5 * 2/3
    two_hits = [_p([A, C, B], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert mean_average_precision(two_hits, gt, 1)["map"] == pytest.approx(0.5 + 1 / 3)


def test_duplicates_wrong_class_and_low_iou_are_false_positives() -> None:
    gt = [_g([A], [0])]
    shifted = [6, 0, 16, 10]  # IoU with A = 4 / 16 = 0.25
    pred = [_p([A, A, shifted, A], [0.5, 0.9, 0.95, 0.99], [0, 0, 0, 1])]
    res = mean_average_precision(pred, gt, 2)
    # class 0 ranking: shifted (FP), A (TP), A again (FP) -> precision 0.5 at recall 1
    assert res["ap"][0] == pytest.approx(0.5)
    assert res["ap"][1] is None


def test_no_detections_and_empty_images() -> None:
    gt = [_g([A], [0]), _g([], [])]
    assert mean_average_precision([_p([], [], []), _p([], [], [])], gt, 1)["map"] == 0.0
    assert average_precision(torch.tensor([]).numpy(), torch.tensor([]).numpy()) == 0.0
    with pytest.raises(ValueError):
        mean_average_precision([_p([], [], [])], gt, 1)
