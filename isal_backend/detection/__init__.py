"""Object detection with ISAL: FCOS on an EfficientNet-Lite0 FPN, influence over its prediction convs.

* :mod:`.detector`: the detector, its staged forward, warm-start training;
* :mod:`.influence`: :class:`DetectionInfluence` (an :class:`~isal_backend.influence.InfluenceProblem`);
* :mod:`.boxes`: Label Studio percent <-> pixel boxes and validation with named messages;
* :mod:`.voc`: Pascal VOC folders/archives (BCCD); :mod:`.metrics`: mAP@0.5;
* :mod:`.bench_al`, :mod:`.bench_speed`: the benchmarks the CLI runs.
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
    solve_detection_s_test,
)
from isal_backend.detection.metrics import mean_average_precision
from isal_backend.detection.voc import DetectionDataset, load_bccd, load_voc

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "FINAL_CONVS",
    "BoxIssue",
    "DetectionDataset",
    "DetectionInfluence",
    "DetectionScores",
    "DetectorConfig",
    "LiteFCOS",
    "ParsedBoxes",
    "TrainReport",
    "boxes_to_regions",
    "build_detector",
    "load_bccd",
    "load_voc",
    "mean_average_precision",
    "percent_to_pixels",
    "pixels_to_percent",
    "regions_to_boxes",
    "solve_detection_s_test",
    "train_detector",
    "validate_boxes",
]
