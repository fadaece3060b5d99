"""The detection strategies' own pieces: a reference set that never takes a trained-on image, mean confidence
and the rarest-class groups (how ISAL_STRATEGY names map onto detection: tests/test_strategies.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isal_backend.detection.selection import mean_confidence, rarest_class_groups, stable_reference
from isal_backend.strategies.base import ascending


def test_reference_membership_never_takes_an_image_that_was_trained_on() -> None:
    trained: set[int] = set()
    for n in range(3, 301):
        try:
            train, ref = stable_reference(list(range(n)), 0.2, salt=7)
        except ValueError as exc:
            assert "ISAL needs 2 more to train on" in str(exc) and n < 10
            continue
        assert sorted([*train.tolist(), *ref.tolist()]) == list(range(n)) and len(ref) >= 1
        assert not trained & set(ref.tolist()), f"{n} keys: a trained-on image moved into R"
        trained |= set(train.tolist())
    assert 0.15 < len(ref) / 300 < 0.25
    again = stable_reference(list(range(300)), 0.2, salt=7)
    assert np.array_equal(again[1], ref)
    assert not np.array_equal(stable_reference(list(range(300)), 0.2, salt=8)[1], ref)


def test_reference_floors_and_bad_input() -> None:
    train, ref = stable_reference([11, 12, 13], 0.0, salt=1)
    assert len(ref) == 1 and len(train) == 2
    with pytest.raises(ValueError, match="2 usable annotated images"):
        stable_reference([1, 2], 0.2)
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\)"):
        stable_reference([1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="unique"):
        stable_reference([1, 1, 2], 0.2)


def test_mean_confidence_puts_images_without_detections_first() -> None:
    dets = [{"scores": torch.tensor([0.9, 0.7])}, {"scores": torch.zeros(0)}, {"scores": torch.tensor([0.3])},
            {"scores": torch.tensor([0.8])}]
    assert mean_confidence(dets) == pytest.approx([0.8, 0.0, 0.3, 0.8])
    order = ascending(mean_confidence(dets), 4, seed=0).tolist()  # least confident first; 0.8 ties either way
    assert order[:2] == [1, 2] and set(order[2:]) == {0, 3}


def test_rarest_class_groups_key_each_image_by_its_rarest_confident_class() -> None:
    dets = [
        {"labels": torch.tensor([0, 0, 2]), "scores": torch.tensor([0.9, 0.8, 0.6])},  # RBC + platelet -> 2
        {"labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.3])},  # the WBC is below 0.5 -> 0
        {"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},  # nothing -> -1
        {"labels": torch.tensor([1, 2]), "scores": torch.tensor([0.7, 0.7])},  # WBC rarer than platelets -> 1
    ]
    assert rarest_class_groups(dets, [400, 30, 40], threshold=0.5).tolist() == [2, 0, -1, 1]
