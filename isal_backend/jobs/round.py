"""The round: Label Studio's annotations in, a retrained model and an ordered labeling stream out.

This module is the glue and the only place that knows both sides: it fetches tasks with the Label
Studio client, turns images into features, asks a strategy (ISAL by default) for an order, writes
the top of that order back as predictions of the new round and makes Label Studio serve them.

Steps of :func:`run_round` (each timed into the round's report):

1. fetch every task with its annotations; labels from the latest non-cancelled annotation, a label
   missing from the config is skipped and reported;
2. features of every task image (cached per image); unreachable or corrupt images are skipped and
   listed in the report;
3. ISAL when a reference set can be held out (two labels of one class at least, two classes);
   else the cold-start order: core-set on backbone features, so the first labels cover the data;
4. one prediction for each of the top ``ISAL_WRITE_TOP_M`` tasks (pre-label as ``result``, influence
   rank mapped into [0, 1] as ``score``, the round id as ``model_version``), created count checked,
   then ``sampling = "Uncertainty sampling"`` and the project's ``model_version`` = the round;
5. the round is committed to the model store (atomically) and recorded for /metrics; older
   rounds' predictions are deleted afterwards.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from isal_backend.influence import LinearHead, fit_linear_head
from isal_backend.jobs.shards import featurize_in_shards
from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.labelstudio.config import (
    ClassificationConfig,
    DetectionConfig,
    parse_label_config,
    parse_project_config,
)
from isal_backend.labelstudio.convert import AnnotationSkipped, build_predictions, prediction_result, task_label
from isal_backend.labelstudio.images import decode_image
from isal_backend.models.featurizer import Featurizer
from isal_backend.models.finetune import finetune_backbone
from isal_backend.queue.context import current_job
from isal_backend.settings import Settings, project_credentials
from isal_backend.status import record_round
from isal_backend.store import ModelStore, RoundState
from isal_backend.strategies import CoresetStrategy, IsalStrategy, NotEnoughLabels, PoolState, get_strategy
from isal_backend.strategies.isal import InfluenceUnit, holdout_split, score_units
from isal_backend.threads import single_torch_thread

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-3


def new_round_id() -> str:
    """Sortable, collision-free: UTC time to the microsecond plus random bits."""
    return f"isal-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:6]}"


@dataclass
class ProjectData:
    """A project's tasks split into labeled and unlabeled, with everything skipped and why."""

    config: ClassificationConfig
    labeled: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    unlabeled: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def image_reference(task: dict[str, Any], config: ClassificationConfig | DetectionConfig) -> str:
    value = (task.get("data") or {}).get(config.image_value_key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"task {task.get('id')} has no image under data.{config.image_value_key}")
    return value


def split_tasks(tasks: list[dict[str, Any]], config: ClassificationConfig) -> ProjectData:
    """Labeled tasks with class indices, the unlabeled pool, and the skipped with reasons."""
    data = ProjectData(config)
    index = {name: i for i, name in enumerate(config.labels)}
    for task in tasks:
        annotations = task.get("annotations") or []
        if not annotations:
            data.unlabeled.append(task)
            continue
        try:
            label = task_label(task, config)
        except AnnotationSkipped as exc:  # neither trained on nor served again; reported in the round
            data.skipped.append({"task": task.get("id"), "reason": exc.reason})
            continue
        data.labeled.append((task, index[label]))
    return data


class Round:
    """One project's round; construct, then :meth:`run`."""

    def __init__(self, project_id: int, settings: Settings, client: LabelStudioClient | None = None) -> None:
        self.project_id = int(project_id)
        self.settings = settings
        credentials = project_credentials(settings, self.project_id)
        self.client = client or LabelStudioClient.from_settings(credentials.url, credentials.api_key, settings)
        self.store = ModelStore(settings.model_dir)
        self.featurizer = self.current_featurizer()
        self.timings: dict[str, float] = {}
        self.round_id: str | None = None
        self.shards: dict[str, Any] | None = None

    def current_featurizer(self) -> Featurizer:
        """The stock backbone, or (ISAL_TRAIN_MODE=finetune) the current round's fine-tuned one."""
        folder = self.store.project_dir(self.project_id) / "features"
        stored = self.store.load(self.project_id) if self.settings.train_mode == "finetune" else None
        weights = {k[len("backbone."):]: v for k, v in stored.tensors.items() if k.startswith("backbone.")} \
            if stored is not None else {}
        if weights:
            return Featurizer(self.settings.backbone, folder, self.settings.device, version=stored.round_id,
                              weights=weights)
        return Featurizer(self.settings.backbone, folder, self.settings.device)

    def finetune(self, tasks: list[dict[str, Any]], labels: torch.Tensor, config: ClassificationConfig,
                 report: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Fine-tune the backbone on the labeled images and switch this round's featurizer to it."""
        start = time.perf_counter()
        size = self.featurizer._loaded()[1].size
        images = np.stack([
            np.asarray(self.load_image(image_reference(t, config)).convert("RGB").resize((size, size)), np.uint8)
            for t in tasks])
        weights, losses = finetune_backbone(
            self.settings.backbone, self.featurizer.weights, images, labels.numpy(), len(config.labels),
            epochs=self.settings.finetune_epochs, device=self.settings.device, seed=self.project_id)
        self.featurizer = Featurizer(self.settings.backbone, self.store.project_dir(self.project_id) / "features",
                                     self.settings.device, version=self.round_id or "finetuned", weights=weights)
        report.update({"train_mode": "finetune", "finetune_epoch_losses": [round(v, 4) for v in losses]})
        self._timed("finetune_seconds", start)
        return {f"backbone.{k}": v for k, v in weights.items()}

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 4)

    def load_image(self, reference: str):
        return decode_image(self.client.download(reference), reference)

    def fetch(self) -> ProjectData:
        start = time.perf_counter()
        project = self.client.get_project(self.project_id)
        config = parse_label_config(project["label_config"])
        tasks = self.client.list_tasks(self.project_id)
        self._timed("fetch_seconds", start)
        return split_tasks(tasks, config)

    def features(self, tasks: list[dict[str, Any]], config: ClassificationConfig, skipped: list[dict[str, Any]]):
        """Features of the tasks whose image loads; the rest go to ``skipped``."""
        refs: dict[int, str] = {}
        for task in tasks:
            try:
                refs[task["id"]] = image_reference(task, config)
            except ValueError as exc:
                skipped.append({"task": task.get("id"), "reason": str(exc)})
        self.shard_features(list(refs.values()))
        feats, failures = self.featurizer(list(refs.values()), self.load_image)
        kept: list[dict[str, Any]] = []
        rows: list[torch.Tensor] = []
        for task in tasks:
            ref = refs.get(task["id"])
            if ref is None:
                continue
            if ref in feats:
                kept.append(task)
                rows.append(feats[ref])
            else:
                skipped.append({"task": task["id"], "reason": f"image could not be loaded: {failures.get(ref)}"})
        dim = self.featurizer.model.feature_dim
        return kept, torch.stack(rows) if rows else torch.zeros(0, dim)

    def shard_features(self, references: list[str]) -> None:
        """With RQ and more uncached images than one shard, let every worker compute a share first."""
        if self.settings.redis_url is None or self.round_id is None or self.settings.train_mode == "finetune":
            return  # fine-tuned backbones change every round: other workers could not know this one
        missing = self.featurizer.missing(references)
        if len(missing) <= self.settings.shard_size:
            return
        start = time.perf_counter()
        self.shards = featurize_in_shards(
            self.settings, self.store.project_dir(self.project_id), self.round_id, missing,
            lambda refs: self.featurizer(refs, self.load_image), self.project_id)
        self._timed("shards_seconds", start)

    def run(self) -> dict[str, Any]:
        start_all = time.perf_counter()
        round_id = self.round_id = new_round_id()
        self.store.sweep_staging(self.project_id)
        data = self.fetch()
        config = data.config
        num_classes = len(config.labels)

        start = time.perf_counter()
        labeled_tasks, labeled_x = self.features([t for t, _ in data.labeled], config, data.skipped)
        label_of = {t["id"]: y for t, y in data.labeled}
        labeled_y = torch.tensor([label_of[t["id"]] for t in labeled_tasks], dtype=torch.long)
        report: dict[str, Any] = {"round_id": round_id, "project": self.project_id, "labels": config.labels,
                                  "strategy": self.settings.strategy, "train_mode": "head"}
        tensors: dict[str, torch.Tensor] = {}
        if self.settings.train_mode == "finetune" and torch.unique(labeled_y).numel() >= 2:
            tensors.update(self.finetune(labeled_tasks, labeled_y, config, report))
            labeled_tasks, labeled_x = self.features(labeled_tasks, config, data.skipped)
            labeled_y = torch.tensor([label_of[t["id"]] for t in labeled_tasks], dtype=torch.long)
        pool_tasks, pool_x = self.features(data.unlabeled, config, data.skipped)
        self._timed("features_seconds", start)

        start = time.perf_counter()
        state = PoolState(labeled_x, labeled_y, pool_x, num_classes, WEIGHT_DECAY, seed=self.project_id)
        report.update({"labeled": len(labeled_tasks), "unlabeled": len(pool_tasks)})
        count = len(pool_tasks) if self.settings.write_top_m == 0 else min(self.settings.write_top_m, len(pool_tasks))
        with single_torch_thread():
            order, head, pool_scores = self.order(state, count, tensors, report)
        self._timed("train_and_score_seconds", start)

        start = time.perf_counter()
        predicted = head.probs(pool_x.to(head.weight.dtype)).argmax(dim=1) if head is not None else None
        ranked = [
            (pool_tasks[i]["id"], config.labels[int(predicted[i])] if predicted is not None else None) for i in order
        ]
        predictions = build_predictions(config, round_id, ranked)
        if predictions:
            self.client.import_predictions(self.project_id, predictions)
            self.client.set_ordering(self.project_id, round_id)
        self._timed("write_back_seconds", start)

        if pool_scores is not None:
            tensors["pool_scores_sorted"] = torch.sort(pool_scores.double()).values
        report.update({
            "model_version": round_id,
            "tasks_scored": len(pool_tasks),
            "written": len(predictions),
            "top_tasks": [pool_tasks[i]["id"] for i in order[:20]],
            "skipped": data.skipped,
            "shards": self.shards,
            "finished_at": datetime.now(UTC).isoformat(),
        })
        return self.finish(round_id, start_all, tensors, report)

    def finish(self, round_id: str, start_all: float, tensors: dict[str, torch.Tensor],
               report: dict[str, Any]) -> dict[str, Any]:
        """Commit the round atomically, record it for /metrics, then clean up older rounds' predictions."""
        self._timed("total_seconds", start_all)
        report["timings"] = self.timings
        report["seconds"] = self.timings["total_seconds"]
        self.store.commit(self.project_id, round_id, tensors, report)
        self.store.prune(self.project_id)
        self.featurizer.drop_other_versions()
        bulky = ("skipped", "notes", "top_tasks")
        record_round(self.project_id, {k: v for k, v in report.items() if k not in bulky}, self.settings)
        log.info("project %s round %s: %s labeled, %s scored, %s written, order %s, %.2f s", self.project_id,
                 round_id, report["labeled"], report["tasks_scored"], report["written"], report["order"],
                 self.timings["total_seconds"])
        self.delete_older_predictions(round_id, written=report["written"])
        return report

    def delete_older_predictions(self, round_id: str, written: int) -> None:
        """Delete the predictions of every older round, unless a newer round waits to do it."""
        if not self.settings.delete_old_predictions or not written:
            return
        job = current_job()
        if job is not None and job.superseded():
            # A newer round waits for this worker: it deletes every older version, this one included, when
            # the annotators pause. Deleting now would delay the next order by seconds (and, on SQLite, lock
            # Label Studio's database under annotators asking for their next task).
            log.info("project %s: a newer round waits; old predictions are left to it", self.project_id)
            return
        try:
            self.client.delete_predictions(self.project_id, round_id)
        except Exception as exc:  # noqa: BLE001 - the new order is already served; stale rows only cost space
            log.warning("project %s: deleting older rounds' predictions failed: %s", self.project_id, exc)

    def order(
        self, state: PoolState, count: int, tensors: dict[str, torch.Tensor], report: dict[str, Any]
    ) -> tuple[np.ndarray, LinearHead | None, torch.Tensor | None]:
        """The pool order, the head for pre-labels, and the pool's ISAL scores (None in cold start)."""
        if state.pool_size == 0:
            report["order"] = "none (no unlabeled task)"
            return np.zeros(0, dtype=np.int64), None, None
        name = self.settings.strategy
        classes_seen = int(torch.unique(state.labeled_labels).numel()) if len(state.labeled_labels) else 0
        try:
            if classes_seen < 2:
                raise NotEnoughLabels(f"{len(state.labeled_labels)} labels in {classes_seen} class(es)")
            train, ref = holdout_split(state.labeled_labels, self.settings.holdout_fraction, state.seed)
        except NotEnoughLabels as exc:
            report["order"] = "cold-start: core-set diversity on backbone features"
            report["cold_start_reason"] = str(exc)
            return CoresetStrategy().rank(state, count), None, None

        x, y = state.labeled_features.double(), state.labeled_labels
        if name not in ("isal", "isal-paper"):
            state.head = head = fit_linear_head(x[train], y[train], state.num_classes, WEIGHT_DECAY,
                                                init=self.previous_head())
            self._validate(head, x[ref], y[ref], tensors, report)
            report["order"] = f"{name} (baseline strategy)"
            return get_strategy(name).rank(state, count), head, None

        # The ISAL head for pre-labels trains on every label; the influence units hold labels out themselves.
        state.head = head = fit_linear_head(x, y, state.num_classes, WEIGHT_DECAY, init=self.previous_head())
        tensors["head_weight"] = head.weight
        strategy = get_strategy(name)
        assert isinstance(strategy, IsalStrategy)
        strategy.holdout_fraction = self.settings.holdout_fraction
        if self.settings.top_k is not None:
            strategy.top_k = self.settings.top_k
        top_k = strategy.resolved_top_k(state.num_classes)
        units = strategy.fit(state)
        scores = score_units(units, state.pool_features, top_k)
        for i, unit in enumerate(units):
            tensors[f"unit{i}_head"] = unit.head.weight
            tensors[f"unit{i}_s_test"] = unit.s_test
            tensors[f"unit{i}_scale"] = torch.tensor(unit.scale, dtype=torch.float64)
        report.update({k: v for k, v in state.report.items() if isinstance(v, float | int | str)})
        report.update({"top_k": top_k, "solver": strategy.solver, "reference": strategy.reference,
                       "balance": strategy.balance, "influence_units": len(units)})
        report["validation_accuracy"] = round(float(report["validation_accuracy"]), 4)
        described = ("cross-fitted: every label is in the reference set once" if strategy.reference == "crossfit"
                     else f"influence on a held-out reference set of {report['reference_size']} labels")
        report["order"] = f"{name}: {described}"
        return strategy.order(scores, state, count), head, scores

    def previous_head(self) -> LinearHead | None:
        """The current round's head, to warm-start from (a convex problem: only the speed changes)."""
        stored = self.store.load(self.project_id)
        weight = stored.tensors.get("head_weight") if stored is not None else None
        return LinearHead(weight) if weight is not None else None

    @staticmethod
    def _validate(head: LinearHead, x: torch.Tensor, y: torch.Tensor, tensors: dict[str, torch.Tensor],
                  report: dict[str, Any]) -> None:
        """Accuracy on the held-out reference set, which the head never trained on."""
        tensors["head_weight"] = head.weight
        report["validation_accuracy"] = round(float((head.probs(x).argmax(1) == y).double().mean()), 4)
        report["reference_size"] = len(y)


def current_scorer(state: RoundState) -> tuple[LinearHead | None, list[InfluenceUnit]]:
    """The stored head for pre-labels and the stored influence units for new tasks' scores."""
    tensors = state.tensors
    head = LinearHead(tensors["head_weight"]) if "head_weight" in tensors else None
    units = []
    i = 0
    while f"unit{i}_head" in tensors:
        units.append(InfluenceUnit(LinearHead(tensors[f"unit{i}_head"]), tensors[f"unit{i}_s_test"],
                                   float(tensors[f"unit{i}_scale"])))
        i += 1
    return head, units


def score_to_unit_interval(scores: torch.Tensor, sorted_pool: torch.Tensor | None) -> list[float]:
    """Where each score falls among the round's pool scores, in [0, 1] (most valuable lowest)."""
    if sorted_pool is None or sorted_pool.numel() == 0:
        return [0.5] * len(scores)
    ranks = torch.searchsorted(sorted_pool, scores.double().contiguous())
    return [round(float(r) / sorted_pool.numel(), 6) for r in ranks]


def run_round(project_id: int) -> dict[str, Any]:
    """RQ entry point: a full round for the project with the settings of the environment."""
    settings = Settings.from_env()
    round_ = Round(project_id, settings)
    from isal_backend.jobs.detection_round import DetectionRound, is_detection  # it imports this module

    if is_detection(round_.client.get_project(project_id)["label_config"]):
        return DetectionRound(project_id, settings, round_.client).run()
    return round_.run()


def score_new_tasks(project_id: int, task_ids: list[int]) -> dict[str, Any]:
    """RQ entry point for TASKS_CREATED: predictions of the current round for the new tasks.

    Scored with the stored head and ``s_test``, so new tasks join the stream in influence order
    without waiting for a retrain; with no round yet there is nothing to order against, and the
    next round covers them.
    """
    settings = Settings.from_env()
    round_ = Round(project_id, settings)
    stored = round_.store.load(project_id)
    if stored is None:
        return {"project": project_id, "scored": 0, "reason": "no round yet"}
    config = parse_project_config(round_.client.get_project(project_id)["label_config"])
    if isinstance(config, DetectionConfig):
        from isal_backend.jobs.detection_round import score_new_detection_tasks  # it imports this module

        return score_new_detection_tasks(round_, stored, config, task_ids)
    wanted = {int(t) for t in task_ids}
    tasks = [t for t in round_.client.list_tasks(project_id) if t["id"] in wanted and not t.get("annotations")]
    skipped: list[dict[str, Any]] = []
    kept, x = round_.features(tasks, config, skipped)
    predictions = predictions_for(stored, config, kept, x)
    if predictions:
        round_.client.import_predictions(project_id, predictions)
    return {"project": project_id, "scored": len(predictions), "skipped": skipped, "round_id": stored.round_id}


def predictions_for(
    stored: RoundState, config: ClassificationConfig, tasks: list[dict[str, Any]], x: torch.Tensor
) -> list[dict[str, Any]]:
    """Pre-label and influence-derived score of each task under a stored round."""
    head, units = current_scorer(stored)
    if head is None or not tasks:
        return [{"task": t["id"], "result": [], "score": 0.5, "model_version": stored.round_id} for t in tasks]
    probs = head.probs(x.to(head.weight.dtype))
    # ISAL rounds score with their influence units; a baseline's round ranks by its confidence instead
    scores = score_units(units, x, int(stored.report["top_k"])) if units else -probs.max(dim=1).values
    mapped = score_to_unit_interval(scores, stored.tensors.get("pool_scores_sorted"))
    return [
        {"task": t["id"], "result": prediction_result(config, config.labels[int(p.argmax())]), "score": s,
         "model_version": stored.round_id}
        for t, p, s in zip(tasks, probs, mapped, strict=True)
    ]
