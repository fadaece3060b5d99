"""The object-detection round: the classification round's pipeline with FCOS in place of the linear head.

A project whose label config has an ``<Image>`` with ``<RectangleLabels>`` gets this round
(:func:`isal_backend.jobs.round.run_round` dispatches on the config). Steps, each timed into the report:

1. fetch every task with its annotations (:meth:`Round.fetch`'s client calls); every task image is
   downloaded once per project (its bytes kept in the store's :class:`~isal_backend.store.ImageCache`),
   decoded with :func:`~isal_backend.labelstudio.images.decode_image` and shrunk so
   its long side is ``ISAL_DETECTION_IMAGE_SIZE``; an image that fails is skipped and named in ``skipped``;
2. boxes from the latest non-cancelled annotation, converted from Label Studio's percent coordinates
   with :func:`~isal_backend.detection.boxes.regions_to_boxes` against the DECODED image size. Per box:
   outside the image -> clipped, zero area -> dropped, a label missing from the config -> dropped (the
   object is not one of the project's classes, so background is right for it); each goes to the
   report's ``notes`` naming task and region. A rotated or malformed rectangle makes the whole
   annotation unusable (training the image without that object would teach "background" where one is):
   the task goes to ``skipped`` with the message, and is neither trained on nor served again.
   An annotation with no region at all is a valid label: "nothing to detect here";
3. a reference set R held out from the annotated images (``ISAL_HOLDOUT_FRACTION`` of them, at least
   one, chosen by a hash of the task id: :func:`~isal_backend.detection.selection.stable_reference`, so
   an image in R stays there and the warm-started detector never trained on it); the detector
   warm-starts from the stored round's weights (same architecture only), trains
   ``ISAL_DETECTION_STEPS`` mini-batches on the rest, is validated
   by mAP@0.5 on R; ``s_test`` by CG over FCOS's final convs (``ISAL_DETECTION_PARAMS``, all three by
   default); every unlabeled image scored
   (pseudo-labels: the detector's own post-NMS boxes with score >= ``ISAL_DETECTION_SCORE_THRESHOLD``;
   images with no surviving box are scored with the all-background loss, the documented fallback of
   :mod:`isal_backend.detection.influence`, so they are ordered like any other and counted in ``no_box``);
   order ascending (most negative influence first). ``ISAL_STRATEGY`` random or coreset, or
   least-confidence, margin and entropy (all three: mean-confidence, the detector's form of
   uncertainty sampling) order the pool with the same trained detector instead, for comparison.
   Cold start (fewer than three usable annotated images, or no box among them): core-set diversity
   on the classification Featurizer's backbone features, said in the report;
4. the top ``ISAL_WRITE_TOP_M`` tasks get a prediction of the round: the detector's boxes above the
   threshold as ``rectanglelabels`` pre-labels with per-box ``score`` (pixels back to percent of the
   decoded image), the influence rank in [0, 1] as ``score``; then ordering, atomic commit (detector
   weights under ``detector.*``, ``s_test``, the pool's sorted scores), record_round, and older rounds'
   predictions deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image

from isal_backend.detection.boxes import BoxIssue, boxes_to_regions, regions_to_boxes
from isal_backend.detection.detector import FINAL_CONVS, DetectorConfig, LiteFCOS, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence, solve_detection_s_test
from isal_backend.detection.metrics import mean_average_precision
from isal_backend.detection.selection import detection_strategy, order_by_mean_confidence, stable_reference
from isal_backend.influence import PAPER_LISSA
from isal_backend.jobs.round import Round, image_reference, new_round_id, score_to_unit_interval
from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.labelstudio.config import DetectionConfig, LabelConfigError, parse_project_config
from isal_backend.labelstudio.convert import AnnotationSkipped, latest_annotation, rank_scores
from isal_backend.labelstudio.images import decode_image
from isal_backend.settings import Settings
from isal_backend.store import ImageCache, RoundState, TensorListCache
from isal_backend.strategies.baselines import k_center_greedy

log = logging.getLogger(__name__)

#: Key prefix of the detector's state dict in the model store's tensors.
DETECTOR_PREFIX = "detector."
#: Cap on CG products for s_test and the damping added to the Gauss-Newton curvature (the detection
#: benchmark's values). The block-preconditioned CG on the PSD GGN ends in 1-3 products at a relative
#: residual ~1e-7; the exact FCOS Hessian is indefinite and is only used by the LiSSA "paper" path.
CG_ITERATIONS = 30
DAMPING = 0.01
BATCH_SIZE = 4
#: Issues that make a whole annotation unusable (see the module docstring).
REFUSING_ISSUES = ("rotated", "malformed")


def detector_config(num_classes: int, settings: Settings) -> DetectorConfig:
    """The round's detector: EfficientNet-Lite0 body frozen and cached per image, FPN and head trained.

    Frozen and cached because a round retrains on 2 CPU cores within a minute: the body then runs
    once per image (and flip) per round instead of once per step (the detection benchmark's setup).
    """
    return DetectorConfig(num_classes=num_classes, image_size=settings.detection_image_size, fpn_channels=64,
                          head_convs=2, freeze_blocks=-1, cache_body=True)


@dataclass
class Sample:
    """A task with its decoded, shrunk image (uint8 ``(3, h, w)``) and, when annotated, its target."""

    task: dict[str, Any]
    reference: str
    image: torch.Tensor
    original_size: tuple[int, int]  # (width, height) of the decoded image, the frame of LS percentages
    target: dict[str, torch.Tensor] | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from the decoded image's pixels to the shrunk image's."""
        return self.image.shape[2] / self.original_size[0], self.image.shape[1] / self.original_size[1]


@dataclass
class DetectionData:
    """A detection project's tasks: annotated samples, the unlabeled pool, what was skipped or repaired."""

    config: DetectionConfig
    labeled: list[Sample] = field(default_factory=list)
    unlabeled: list[Sample] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)


def task_boxes(
    task: Mapping[str, Any], config: DetectionConfig, image_width: float, image_height: float
) -> tuple[torch.Tensor, torch.Tensor, list[BoxIssue]]:
    """Pixel boxes (float64, in the decoded image's frame), class indices and the repairs made.

    From the task's latest non-cancelled annotation (an unusable latest one is not replaced by an
    older one, as in classification). Raises :class:`AnnotationSkipped` naming the region when the
    annotation cannot be trained on. Percentages are converted against the decoded image's size, not
    the ``original_width`` stored in the region: percent is what the annotator drew on this image.
    """
    task_id = task.get("id")
    latest = latest_annotation(task)
    result = [r for r in latest.get("result") or [] if isinstance(r, Mapping)]
    issues: list[BoxIssue] = []
    ours = []
    for i, region in enumerate(result):
        if region.get("from_name") == config.labels_name:
            ours.append({**region, "original_width": image_width, "original_height": image_height})
        else:
            rid = f"region {region.get('id', i)!s}"
            issues.append(BoxIssue("ignored", rid, f"{rid}: from_name {region.get('from_name')!r} is not the "
                                   f'<RectangleLabels name="{config.labels_name}">; ignored'))
    parsed = regions_to_boxes(ours, config.labels, image_width, image_height)
    refused = [i for i in parsed.issues if i.kind in REFUSING_ISSUES]
    if refused:
        raise AnnotationSkipped("; ".join(i.message for i in refused) + " (the image is not trained on until "
                                "the annotation is fixed)", latest.get("id"), task_id)
    return parsed.boxes, parsed.label_indices(config.labels), issues + parsed.issues


def shrink(image: Image.Image, max_side: int) -> torch.Tensor:
    """uint8 ``(3, h, w)`` with the long side at most ``max_side`` (the detector resizes to it anyway)."""
    width, height = image.size
    if max(width, height) > max_side:
        factor = max_side / max(width, height)
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))),
                             Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def to_original(boxes: torch.Tensor, sample: Sample) -> torch.Tensor:
    """Boxes in the shrunk image's pixels -> the decoded image's pixels, clipped to it."""
    sx, sy = sample.scale
    out = boxes.detach().double().reshape(-1, 4) / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    width, height = sample.original_size
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def prelabel(detection: Mapping[str, torch.Tensor], sample: Sample, config: DetectionConfig,
             threshold: float) -> list[dict[str, Any]]:
    """The detector's boxes above ``threshold`` as Label Studio ``rectanglelabels`` results with scores."""
    keep = detection["scores"] >= threshold
    width, height = sample.original_size
    return boxes_to_regions(to_original(detection["boxes"][keep], sample), detection["labels"][keep], config.labels,
                            width, height, scores=detection["scores"][keep], from_name=config.labels_name,
                            to_name=config.image_name)


class DetectionRound(Round):
    """One detection project's round; construct, then :meth:`run`. Reuses Round's client, store and loaders."""

    def __init__(self, project_id: int, settings: Settings, client: LabelStudioClient | None = None) -> None:
        super().__init__(project_id, settings, client)
        self.images_downloaded = 0
        self.image_cache_hits = 0

    def fetch_detection(self) -> tuple[DetectionConfig, list[dict[str, Any]]]:
        start = time.perf_counter()
        config = parse_project_config(self.client.get_project(self.project_id)["label_config"])
        if not isinstance(config, DetectionConfig):
            raise LabelConfigError(f"project {self.project_id} is not an object detection project (no "
                                   "<RectangleLabels>): its rounds are classification rounds")
        tasks = self.client.list_tasks(self.project_id)
        self._timed("fetch_seconds", start)
        return config, tasks

    def load_image(self, reference: str) -> Image.Image:
        """The task image, from the project's :class:`ImageCache` or downloaded (and then cached once it decodes)."""
        if reference.startswith("data:"):  # the bytes are in the task itself
            return super().load_image(reference)
        cache = ImageCache(self.store.project_dir(self.project_id) / "images")
        data = cache.get(reference)
        if data is not None:
            self.image_cache_hits += 1
            return decode_image(data, reference)
        data = self.client.download(reference)
        image = decode_image(data, reference)
        cache.put(reference, data)
        self.images_downloaded += 1
        return image

    def body_cache(self, config: DetectorConfig) -> TensorListCache:
        """The project's disk-backed cache of the frozen body's outputs (the costly part of every pass)."""
        folder = self.store.project_dir(self.project_id) / "detector-body" / config.backbone
        return TensorListCache(folder, self.settings.detection_cache_mb * 2**20)

    def load_sample(self, task: dict[str, Any], config: DetectionConfig,
                    skipped: list[dict[str, Any]]) -> Sample | None:
        """The task's image decoded and shrunk, or None with the reason appended to ``skipped``."""
        try:
            reference = image_reference(task, config)  # DetectionConfig has the same image_value_key
        except ValueError as exc:
            skipped.append({"task": task.get("id"), "reason": str(exc)})
            return None
        try:
            image = self.load_image(reference)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per task, never fatal
            skipped.append({"task": task.get("id"),
                            "reason": f"image could not be loaded: {type(exc).__name__}: {exc}"})
            return None
        return Sample(task, reference, shrink(image, self.settings.detection_image_size), image.size)

    def split(self, config: DetectionConfig, tasks: list[dict[str, Any]]) -> DetectionData:
        data = DetectionData(config)
        for task in tasks:
            sample = self.load_sample(task, config, data.skipped)
            if sample is None:
                continue
            if not task.get("annotations"):
                data.unlabeled.append(sample)
                continue
            try:
                boxes, labels, issues = task_boxes(task, config, *sample.original_size)
            except AnnotationSkipped as exc:
                data.skipped.append({"task": task["id"], "reason": exc.reason})
                continue
            data.notes += [{"task": task["id"], "kind": i.kind, "message": i.message} for i in issues]
            sx, sy = sample.scale
            sample.target = {"boxes": (boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)).float(),
                             "labels": labels}
            data.labeled.append(sample)
        return data

    def run(self) -> dict[str, Any]:
        start_all = time.perf_counter()
        round_id = self.round_id = new_round_id()
        self.store.sweep_staging(self.project_id)
        config, tasks = self.fetch_detection()
        start = time.perf_counter()
        data = self.split(config, tasks)
        self._timed("images_seconds", start)

        pool = data.unlabeled
        report: dict[str, Any] = {
            "round_id": round_id, "project": self.project_id, "kind": "detection", "labels": config.labels,
            "labeled": len(data.labeled), "unlabeled": len(pool), "strategy": self.settings.strategy,
            "score_threshold": self.settings.detection_score_threshold,
        }
        count = len(pool) if self.settings.write_top_m == 0 else min(self.settings.write_top_m, len(pool))
        tensors: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        order, detections = self.rank_pool(data, count, tensors, report)
        self._timed("train_and_score_seconds", start)

        start = time.perf_counter()
        scores = rank_scores(len(order))
        predictions = [
            {"task": int(pool[i].task["id"]), "model_version": round_id, "score": score,
             "result": prelabel(detections[i], pool[i], config, self.settings.detection_score_threshold)
             if detections is not None else []}
            for i, score in zip(order.tolist(), scores, strict=True)
        ]
        if predictions:
            self.client.import_predictions(self.project_id, predictions)
            self.client.set_ordering(self.project_id, round_id)
        self._timed("write_back_seconds", start)

        report.update({
            "model_version": round_id,
            "tasks_scored": len(pool),
            "written": len(predictions),
            "boxes_written": sum(len(p["result"]) for p in predictions),
            "top_tasks": [pool[i].task["id"] for i in order[:20]],
            "images_downloaded": self.images_downloaded,
            "image_cache_hits": self.image_cache_hits,
            "skipped": data.skipped,
            "notes": data.notes,
            "finished_at": datetime.now(UTC).isoformat(),
        })
        return self.finish(round_id, start_all, tensors, report)

    def rank_pool(
        self, data: DetectionData, count: int, tensors: dict[str, torch.Tensor], report: dict[str, Any]
    ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]] | None]:
        """The pool order and the detections for pre-labels (None in cold start); fills tensors and report."""
        pool, labeled = data.unlabeled, data.labeled
        if not pool:
            report["order"] = "none (no unlabeled task)"
            return np.zeros(0, dtype=np.int64), None
        boxes = sum(len(s.target["labels"]) for s in labeled if s.target is not None)
        name, note = detection_strategy(self.settings.strategy)
        if note:
            report["strategy_note"] = note
        try:
            if boxes == 0:
                raise ValueError(f"{len(labeled)} usable annotated images hold no box: nothing to learn from")
            train, ref = stable_reference([s.task["id"] for s in labeled], self.settings.holdout_fraction,
                                          self.project_id)
        except ValueError as exc:
            report["order"] = "cold-start: core-set diversity on backbone features"
            report["cold_start_reason"] = str(exc)
            return self.coreset(labeled, pool, count), None

        config = detector_config(len(data.config.labels), self.settings)
        model = build_detector(config, seed=self.project_id)
        report["warm_start"] = self.warm_start(model, config)
        body = model.backbone.cache = self.body_cache(config)
        try:
            return self._train_and_order(name, model, data, train, ref, count, tensors, report)
        finally:
            report["body_cache"] = {"loaded": body.loaded, "added": body.flush()}

    def _train_and_order(
        self, name: str, model: LiteFCOS, data: DetectionData, train: np.ndarray, ref: np.ndarray,
        count: int, tensors: dict[str, torch.Tensor], report: dict[str, Any],
    ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
        """Train on ``train``, validate on ``ref``, and order the pool by strategy ``name``."""
        pool, labeled = data.unlabeled, data.labeled
        train_images = [labeled[i].image for i in train]
        train_targets = [labeled[i].target for i in train]
        ref_images = [labeled[i].image for i in ref]
        ref_targets = [labeled[i].target for i in ref]
        steps = self.settings.detection_steps
        trained = train_detector(model, train_images, train_targets, steps, BATCH_SIZE,
                                 warmup=max(1, min(20, steps // 5)), seed=self.project_id * 1000 + len(labeled))
        validation = mean_average_precision(model.predict(ref_images), ref_targets, len(data.config.labels))
        tensors.update({DETECTOR_PREFIX + k: v for k, v in model.state_dict().items()})
        report.update({
            "train_size": len(train), "reference_size": len(ref),
            "boxes_labeled": sum(len(s.target["labels"]) for s in labeled if s.target is not None),
            "detector": asdict(model.config), "train_steps": trained.steps, "train_loss": round(trained.final_loss, 4),
            "validation_map50": round(float(validation["map"]), 4),
        })
        pool_images = [s.image for s in pool]
        if name in ("isal", "isal-paper"):
            solver = "lissa" if name == "isal-paper" else "cg"
            problem = DetectionInfluence(model, train_images, train_targets, ref_images, ref_targets,
                                         params=self.settings.detection_params,
                                         score_threshold=self.settings.detection_score_threshold, damping=DAMPING)
            s_test, solve = solve_detection_s_test(problem, solver, PAPER_LISSA, max_iter=CG_ITERATIONS,
                                                   seed=self.project_id)
            result = problem.score_images(s_test, pool_images)
            tensors["s_test"] = s_test.detach()
            tensors["pool_scores_sorted"] = torch.sort(result.scores.double()).values
            report.update({
                "influence_params": list(self.settings.detection_params),
                "solver": solver, "solver_iterations": solve.iterations,
                "solver_residual": solve.relative_residual, "no_box": int(result.no_box.sum()),
                "order": f"{name}: influence on a held-out reference set of {len(ref)} annotated images",
            })
            return np.argsort(result.scores.numpy(), kind="stable")[:count], result.detections
        detections = model.predict(pool_images)
        if name == "mean-confidence":
            order = order_by_mean_confidence(detections)
            report["order"] = "mean-confidence: lowest mean box score first"
        elif name == "random":
            order = np.random.default_rng([self.project_id, len(labeled)]).permutation(len(pool))
            report["order"] = "random"
        else:
            order = self.coreset(labeled, pool, count)
            report["order"] = "coreset: k-center diversity on backbone features"
        return order[:count], detections

    def coreset(self, labeled: list[Sample], pool: list[Sample], count: int) -> np.ndarray:
        """Greedy k-center on the classification backbone's features (cached per image), labeled as centers."""
        by_reference = {s.reference: s for s in [*labeled, *pool]}

        def load(reference: str) -> Image.Image:
            return Image.fromarray(by_reference[reference].image.permute(1, 2, 0).numpy())

        feats, _ = self.featurizer(list(by_reference), load)
        pool_x = torch.stack([feats[s.reference] for s in pool])
        labeled_x = torch.stack([feats[s.reference] for s in labeled]) if labeled else torch.zeros(0, pool_x.shape[1])
        return k_center_greedy(pool_x, labeled_x, count, self.project_id)

    def warm_start(self, model: LiteFCOS, config: DetectorConfig) -> bool | str:
        """Load the stored round's detector into ``model`` when it has the same architecture."""
        stored = self.store.load(self.project_id)
        if stored is None or not any(k.startswith(DETECTOR_PREFIX) for k in stored.tensors):
            return False
        if stored.report.get("detector") != asdict(config):
            return "no: the stored detector's architecture or classes differ; trained from ImageNet weights"
        model.load_state_dict({k[len(DETECTOR_PREFIX):]: v for k, v in stored.tensors.items()
                               if k.startswith(DETECTOR_PREFIX)})
        return True

    # -- new tasks and /predict: the stored round's detector and s_test --------------------------------------
    def stored_detector(self, stored: RoundState) -> LiteFCOS | None:
        spec = stored.report.get("detector")
        weights = {k[len(DETECTOR_PREFIX):]: v for k, v in stored.tensors.items() if k.startswith(DETECTOR_PREFIX)}
        if not isinstance(spec, dict) or not weights:
            return None
        config = DetectorConfig(**{**spec, "pretrained": False})
        model = build_detector(config, seed=None)
        model.load_state_dict(weights)
        if config.cache_body:
            model.backbone.cache = self.body_cache(config)
        return model.eval()

    def predictions_for(self, stored: RoundState, config: DetectionConfig, tasks: list[dict[str, Any]],
                        keep_body_outputs: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Pre-labels and influence-derived scores of ``tasks`` under the stored round, and what was skipped.

        ``keep_body_outputs`` writes the new images' body outputs to the project's cache for the next
        round (worth it for a batch of new tasks; not for one ``/predict`` call, which would leave a
        chunk file per call).
        """
        skipped: list[dict[str, Any]] = []
        samples = [s for s in (self.load_sample(t, config, skipped) for t in tasks) if s is not None]
        model = self.stored_detector(stored)
        if model is None or not samples:
            return [{"task": s.task["id"], "result": [], "score": 0.5, "model_version": stored.round_id}
                    for s in samples], skipped
        threshold = float(stored.report.get("score_threshold", self.settings.detection_score_threshold))
        images = [s.image for s in samples]
        if "s_test" not in stored.tensors:  # a baseline strategy's round: pre-labels, no influence to rank by
            detections, scores = model.predict(images), [0.5] * len(samples)
        else:
            params = stored.report.get("influence_params") or list(FINAL_CONVS)  # s_test's layout is the round's
            problem = DetectionInfluence(model, [], [], [], [], params=params, score_threshold=threshold)
            result = problem.score_images(stored.tensors["s_test"], images)
            detections = result.detections
            scores = score_to_unit_interval(result.scores, stored.tensors.get("pool_scores_sorted"))
        if keep_body_outputs and isinstance(model.backbone.cache, TensorListCache):
            model.backbone.cache.flush()
        return [
            {"task": s.task["id"], "result": prelabel(det, s, config, threshold), "score": score,
             "model_version": stored.round_id}
            for s, det, score in zip(samples, detections, scores, strict=True)
        ], skipped


def is_detection(label_config: str) -> bool:
    """Whether a project's label config makes it a detection project (raises on an unsupported config)."""
    return isinstance(parse_project_config(label_config), DetectionConfig)


def score_new_detection_tasks(round_: Round, stored: RoundState, config: DetectionConfig,
                              task_ids: list[int]) -> dict[str, Any]:
    """TASKS_CREATED for a detection project: the stored round's pre-labels and scores for the new tasks."""
    detection = DetectionRound(round_.project_id, round_.settings, round_.client)
    wanted = {int(t) for t in task_ids}
    tasks = [t for t in detection.client.list_tasks(round_.project_id)
             if t["id"] in wanted and not t.get("annotations")]
    predictions, skipped = detection.predictions_for(stored, config, tasks, keep_body_outputs=True)
    if predictions:
        detection.client.import_predictions(round_.project_id, predictions)
    return {"project": round_.project_id, "scored": len(predictions), "skipped": skipped,
            "round_id": stored.round_id}


def predict_detection_tasks(project_id: int, tasks: list[dict[str, Any]], config: DetectionConfig,
                            settings: Settings) -> list[dict[str, Any]]:
    """``/predict`` for a detection project: one result per task, in the order given."""
    detection = DetectionRound(project_id, settings)
    stored = detection.store.load(project_id)
    if stored is None:
        return [{"result": [], "score": 0.5, "model_version": "none"} for _ in tasks]
    predictions, _ = detection.predictions_for(stored, config, tasks)
    by_task = {p["task"]: p for p in predictions}
    empty = {"result": [], "score": 0.5, "model_version": stored.round_id}
    return [{k: by_task.get(t.get("id"), empty)[k] for k in ("result", "score", "model_version")} for t in tasks]
