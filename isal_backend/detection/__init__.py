"""Object detection with ISAL: FCOS on an EfficientNet-Lite0 FPN, influence over its prediction convs.

* :mod:`.detector`: the detector, its staged forward, warm-start training;
* :mod:`.influence`: :class:`DetectionInfluence` (an :class:`~isal_backend.influence.InfluenceProblem`);
* :mod:`.boxes`: Label Studio percent <-> pixel boxes and validation with named messages;
* :mod:`.metrics`: mAP@0.5; :mod:`.selection`: the stable reference set, mean confidence, rarest-class groups.

The detection task kind that the round runs is :mod:`isal_backend.tasks.detection`; the benchmarks live in
:mod:`isal_backend.bench`.
"""

from isal_backend.detection.boxes import (
    BoxIssue,
    ParsedBoxes,
    boxes_to_regions,
    percent_to_pixels,
    pixels_to_percent,
    regions_to_boxes,
    validate_boxes,
)
from isal_backend.detection.detector import (
    FINAL_CONVS,
    DetectorConfig,
    LiteFCOS,
    TrainReport,
    build_detector,
    train_detector,
)
from isal_backend.detection.influence import (
    DEFAULT_SCORE_THRESHOLD,
    DetectionInfluence,
    DetectionScores,
)
from isal_backend.detection.metrics import mean_average_precision

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "FINAL_CONVS",
    "BoxIssue",
    "DetectionInfluence",
    "DetectionScores",
    "DetectorConfig",
    "LiteFCOS",
    "ParsedBoxes",
    "TrainReport",
    "boxes_to_regions",
    "build_detector",
    "mean_average_precision",
    "percent_to_pixels",
    "pixels_to_percent",
    "regions_to_boxes",
    "train_detector",
    "validate_boxes",
]
