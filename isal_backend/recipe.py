"""The recipe: what a round of each task kind does with the current settings, as one JSON object.

``python -m isal_backend recipe [--task classification|detection]`` prints it, and ``bench al`` writes
the same object into its ``summary.json`` as ``recipe``: equal settings give equal recipes, so a
benchmark's figures name exactly the backend configuration they describe.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from isal_backend.labelstudio.config import ClassificationConfig, DetectionConfig, LabelConfig
from isal_backend.models.projection import MAX_ROWS, REFIT_CHANGE
from isal_backend.settings import Settings
from isal_backend.tasks import TaskParts, task_for
from isal_backend.tasks.classification import CV_FOLDS
from isal_backend.tasks.detection import BATCH_SIZE, DAMPING, detector_config

KINDS = ("classification", "detection")
NATIVE_IMAGE_SIZE = {"efficientnet-lite0": 128, "small-cnn": 32, "resnet18-cifar": 32, "resnet18": 224}


def _strategy(config: LabelConfig, settings: Settings) -> dict[str, Any]:
    task = task_for(config, TaskParts(settings, 0, Path(settings.model_dir)))
    strategy, note = task.strategy(settings.strategy)
    return {**strategy.describe(), **({"note": note} if note else {})}


def recipe(settings: Settings, kind: str = "classification") -> dict[str, Any]:
    """The round's recipe for ``kind`` under ``settings`` (JSON-ready)."""
    if kind == "classification":
        config = ClassificationConfig("image", "image", "label", ["a", "b", "c"])  # the labels do not matter
        out: dict[str, Any] = {
            "task": kind,
            "backbone": settings.backbone,
            "image_size": settings.image_size or NATIVE_IMAGE_SIZE[settings.backbone],
            "train_mode": settings.train_mode,
            "feature_projection": ({"method": "pca", "dim": settings.feature_dim, "fit_rows": MAX_ROWS,
                                    "refit_when_pool_changes_by": REFIT_CHANGE}
                                   if settings.feature_dim else "none"),
            "head": {"model": "softmax linear head", "fit": "L-BFGS to the optimum, warm-started",
                     "weight_decay": settings.weight_decay, "validation": f"{CV_FOLDS}-fold cross-validation"},
            "strategy": _strategy(config, settings),
            "cold_start": f"{settings.cold_start} on the projected backbone features",
        }
        if settings.train_mode == "finetune":
            out["finetune_epochs"] = settings.finetune_epochs
        return out
    if kind == "detection":
        config = DetectionConfig("image", "image", "label", ["a", "b", "c"])
        detector = asdict(detector_config(len(config.labels), settings))
        detector.pop("num_classes")
        return {
            "task": kind,
            "detector": {"model": "FCOS", **detector},
            "training": {"steps": settings.detection_steps, "first_steps": settings.detection_first_steps,
                         "batch_size": BATCH_SIZE, "warm_start": "from the stored round's detector"},
            "reference": {"holdout_fraction": settings.holdout_fraction, "rule": "stable hash of the task id"},
            "score_threshold": settings.detection_score_threshold,
            "influence_params": list(settings.detection_params),
            "damping": DAMPING,
            "strategy": _strategy(config, settings),
            "cold_start": f"{settings.cold_start} on {settings.backbone} features of the images",
        }
    raise ValueError(f"unknown task kind {kind!r}: choose {', '.join(KINDS)}")


def main(args: argparse.Namespace) -> int:
    """``python -m isal_backend recipe [--task KIND]``: the recipe as JSON on stdout."""
    print(json.dumps(recipe(Settings.from_env(), args.task), indent=2))
    return 0
