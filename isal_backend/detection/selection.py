"""Which pool images a detection project labels next: the detector-specific pieces of the strategies.

* :func:`stable_reference`: the held-out reference set R. Detectors warm-start from the previous
  round, so R must be a set no earlier round trained on. A fresh random split each round (what a
  classification head, retrained from scratch, can afford) would move trained-on images into R. Here
  each image's membership follows from a hash of its key alone, so an image in R stays in R as the
  labeled set grows.
* :func:`mean_confidence`: a detector's confidence in an image, for uncertainty sampling (an image
  without detections counts as confidence 0).
* :func:`rarest_class_groups`: the groups of class-balanced batches (each image's rarest predicted
  class), the detection analogue of classification's round-robin over predicted classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

#: Fewest images a detector trains on when R is held out.
MIN_TRAIN = 2


def _unit(key: object, salt: object) -> float:
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def stable_reference(keys: Sequence[object], fraction: float, salt: object = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, reference)`` positions into ``keys``: R is every key whose hash falls below ``fraction``.

    Membership depends on the key alone, so adding keys never moves a trained-on image into R. When
    no hash falls below ``fraction`` R is the one lowest-hash key (a later, lower one takes its place
    and it joins training: that direction is harmless). Raises ``ValueError`` when fewer than
    :data:`MIN_TRAIN` keys are left to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the reference fraction must lie in [0, 1), got {fraction}")
    if len(set(map(str, keys))) != len(keys):
        raise ValueError("reference keys must be unique")
    units = np.array([_unit(k, salt) for k in keys])
    in_ref = units < fraction
    if len(keys) and not in_ref.any():
        in_ref[int(np.argmin(units))] = True
    if len(keys) - int(in_ref.sum()) < MIN_TRAIN:
        raise ValueError(f"{len(keys)} usable annotated images, {int(in_ref.sum())} of them held out as the "
                         f"reference set: ISAL needs {MIN_TRAIN} more to train on")
    return np.flatnonzero(~in_ref), np.flatnonzero(in_ref)


def mean_confidence(detections: Sequence[Mapping[str, Tensor]]) -> np.ndarray:
    """Mean post-NMS score per image; 0 for an image without detections (the least confident)."""
    return np.array([float(d["scores"].mean()) if len(d["scores"]) else 0.0 for d in detections])


def rarest_class_groups(
    detections: Sequence[Mapping[str, Tensor]], labeled_boxes_per_class: Sequence[int], threshold: float
) -> Tensor:
    """Per image, the class with the fewest labeled boxes among its detections at or above ``threshold``.

    -1 for an image without such a box. mAP averages over classes, while the detection loss (and so
    influence on R) is dominated by the common class; filling a batch round-robin over these groups
    keeps images of the rare classes in it.
    """
    counts = np.asarray(labeled_boxes_per_class, dtype=np.float64)
    groups = []
    for det in detections:
        present = det["labels"][det["scores"] >= threshold].unique().tolist()
        groups.append(min(present, key=lambda c: (counts[c], c)) if present else -1)
    return torch.tensor(groups, dtype=torch.int64)
