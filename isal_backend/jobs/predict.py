"""``/predict``: the current round's pre-label and influence-derived score for given tasks.

Tasks that arrived after the last round are scored with the stored head and ``s_test`` (the
same numbers a round would give them against its pool); before any round the results are empty
pre-labels with a neutral score, so Label Studio still gets one result per task, in task order.
"""

from __future__ import annotations

from typing import Any

from isal_backend.jobs.round import Round, predictions_for
from isal_backend.labelstudio.config import DetectionConfig, parse_project_config
from isal_backend.settings import Settings


def predict_tasks(project_id: int, tasks: list[dict[str, Any]], label_config: str) -> list[dict[str, Any]]:
    """One ``{"result", "score", "model_version"}`` per task, in the order given."""
    config = parse_project_config(label_config)
    settings = Settings.from_env()
    if isinstance(config, DetectionConfig):
        from isal_backend.jobs.detection_round import predict_detection_tasks  # it imports round.py

        return predict_detection_tasks(project_id, tasks, config, settings)
    round_ = Round(project_id, settings)
    stored = round_.store.load(project_id)
    if stored is None:
        return [{"result": [], "score": 0.5, "model_version": "none"} for _ in tasks]
    skipped: list[dict[str, Any]] = []
    kept, x = round_.features(tasks, config, skipped)
    by_task = {p["task"]: p for p in predictions_for(stored, config, kept, x)}
    empty = {"result": [], "score": 0.5, "model_version": stored.round_id}
    out = []
    for task in tasks:
        pred = by_task.get(task.get("id"), empty)
        out.append({k: pred[k] for k in ("result", "score", "model_version")})
    return out
