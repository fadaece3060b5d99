"""Label Studio side of the backend: label configs, annotation/prediction conversion, the API client, images.

Nothing in this package imports torch, so the web process and tests can use it without the model stack.
"""

from isal_backend.labelstudio.config import ClassificationConfig, LabelConfigError, parse_label_config
from isal_backend.labelstudio.convert import (
    AnnotationSkipped,
    annotation_label,
    build_predictions,
    prediction_result,
    rank_scores,
    task_label,
)
from isal_backend.labelstudio.images import ImageLoadError, decode_image, safe_source

__all__ = [
    "AnnotationSkipped",
    "ClassificationConfig",
    "ImageLoadError",
    "LabelConfigError",
    "annotation_label",
    "build_predictions",
    "decode_image",
    "parse_label_config",
    "prediction_result",
    "rank_scores",
    "safe_source",
    "task_label",
]
