"""Object detection (``<RectangleLabels>``): FCOS on a frozen EfficientNet-Lite0, ISAL over its final convs.

* split: annotated tasks (their latest non-cancelled annotation) and the unlabeled pool;
* features: every task image downloaded once per project (its bytes kept in the store's
  :class:`~isal_backend.store.ImageCache`), decoded and shrunk so its long side is
  ``ISAL_DETECTION_IMAGE_SIZE``; boxes converted from Label Studio's percent coordinates against the
  DECODED image size. Per box: outside the image -> clipped, zero area -> dropped, a label missing from
  the config -> dropped (background is right for an object that is none of the project's classes), each
  reported in ``notes``; a rotated or malformed rectangle makes the whole annotation unusable (training
  the image without that object would teach "background" where one is): the task is skipped, neither
  trained on nor served again. An annotation with no region is a valid label: "nothing to detect here";
* fit: a reference set R held out from the annotated images by a hash of the task id
  (:func:`~isal_backend.detection.selection.stable_reference`: an image in R stays there, so the
  warm-started detector never trained on it); the detector warm-starts from the stored round's
  (same architecture only), trains on the rest, and is validated by mAP@0.5 on R. Fewer than three
  usable annotated images, or no box among them: cold start;
* influence (s_test): over FCOS's final convs (``ISAL_DETECTION_PARAMS``) on the Gauss-Newton curvature
  with its per-conv block preconditioner (the shared CG of :mod:`isal_backend.influence.solvers`); the
  paper preset runs LiSSA on the exact Hessian;
* view: one pass over the pool gives the detections (pre-labels, mean confidence, rarest predicted
  class) and, with s_test, the ISAL scores (pseudo-labels: the detector's own boxes with score >=
  ``ISAL_DETECTION_SCORE_THRESHOLD``; an image with no such box is scored against "nothing here").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from isal_backend.detection.boxes import BoxIssue, boxes_to_regions, regions_to_boxes
from isal_backend.detection.detector import FINAL_CONVS, DetectorConfig, LiteFCOS, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence
from isal_backend.detection.metrics import mean_average_precision
from isal_backend.detection.selection import mean_confidence, rarest_class_groups, stable_reference
from isal_backend.influence import PAPER, SolverConfig, solve_s_test
from isal_backend.labelstudio.config import DetectionConfig
from isal_backend.labelstudio.convert import AnnotationSkipped, latest_annotation
from isal_backend.labelstudio.images import decode_image
from isal_backend.settings import Settings
from isal_backend.store import ImageCache, RoundState, TensorListCache
from isal_backend.strategies import ENTROPY, LEAST_CONFIDENCE, MARGIN, MEAN_CONFIDENCE
from isal_backend.strategies.base import SignalMissing
from isal_backend.strategies.isal import IsalOptions
from isal_backend.tasks import artifacts as keys
from isal_backend.tasks.base import (
    ColdStart,
    ImageSource,
    Inputs,
    NotEnoughLabels,
    Split,
    Task,
    image_bytes,
    image_reference,
)

#: The product's s_test solve for a detector: block-preconditioned CG on the PSD Gauss-Newton curvature.
#: It ends in 1-3 products at a relative residual ~1e-7 (the exact FCOS Hessian is indefinite).
DETECTION_SOLVER = SolverConfig(method="cg", curvature="ggn", tol=1e-6, max_iter=30)
#: Damping added to the curvature, and the detector's training weight decay it sits on.
DAMPING = 0.01
BATCH_SIZE = 4
#: Issues that make a whole annotation unusable (see the module docstring).
REFUSING_ISSUES = ("rotated", "malformed")
_UNCERTAINTY_NOTE = ("strategy {name!r} is a classification uncertainty measure; detection projects use its "
                     "detector form, mean-confidence (lowest mean box score first)")


def detector_config(num_classes: int, settings: Settings) -> DetectorConfig:
    """The round's detector: EfficientNet-Lite0 body frozen and cached per image, FPN and head trained.

    Frozen and cached because a round retrains on 2 CPU cores within a minute: the body then runs
    once per image (and flip) per project instead of once per step.
    """
    return DetectorConfig(num_classes=num_classes, image_size=settings.detection_image_size, fpn_channels=64,
                          head_convs=2, freeze_blocks=-1, cache_body=True)


@dataclass
class Sample:
    """A task with its decoded, shrunk image (uint8 ``(3, h, w)``) and, when annotated, its target."""

    task_id: int
    reference: str
    image: torch.Tensor
    original_size: tuple[int, int]  # (width, height) of the decoded image, the frame of LS percentages
    target: dict[str, torch.Tensor] | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from the decoded image's pixels to the shrunk image's."""
        return self.image.shape[2] / self.original_size[0], self.image.shape[1] / self.original_size[1]


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


@dataclass
class DetectionInputs(Inputs):
    """Decoded, shrunk images of the annotated tasks (with targets) and of the pool."""

    labeled: list[Sample] = field(default_factory=list)
    pool: list[Sample] = field(default_factory=list)
    images_downloaded: int = 0
    image_cache_hits: int = 0


@dataclass
class DetectionModel:
    """A detection round's artifacts (see :mod:`isal_backend.tasks.artifacts` for their keys)."""

    labels: list[str]
    config: DetectorConfig
    detector: LiteFCOS | None = None  # None at cold start
    score_threshold: float = 0.5
    train_positions: np.ndarray | None = None  # not stored
    reference_positions: np.ndarray | None = None
    s_test: torch.Tensor | None = None
    influence_params: list[str] = field(default_factory=lambda: list(FINAL_CONVS))
    pool_keys: torch.Tensor | None = None
    strategy: str | None = None


class DetectionView:
    """A detector's :class:`~isal_backend.strategies.base.PoolView`: one pass gives detections and scores."""

    def __init__(self, task: DetectionTask, model: DetectionModel | None, inputs: DetectionInputs) -> None:
        self.task, self.model, self.inputs = task, model, inputs
        self._detections: list[dict[str, torch.Tensor]] | None = None
        self._scores: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.inputs.pool)

    def _detector(self) -> LiteFCOS:
        if self.model is None or self.model.detector is None:
            raise SignalMissing("no detector yet (cold start)")
        return self.model.detector

    def detections(self) -> list[dict[str, torch.Tensor]]:
        if self._detections is None:
            self._detections = self._detector().predict([s.image for s in self.inputs.pool])
        return self._detections

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.embeddings(self.inputs)

    def probabilities(self) -> torch.Tensor:
        raise SignalMissing("a detector has no posterior over a fixed set of classes per image")

    def skip_likeness(self) -> torch.Tensor | None:
        return None  # not measured for detection projects

    def confidence(self) -> torch.Tensor:
        return torch.from_numpy(mean_confidence(self.detections()))

    def groups(self) -> torch.Tensor:
        counts = np.zeros(len(self.task.labels), dtype=np.int64)
        for s in self.inputs.labeled:
            if s.target is not None:
                counts += np.bincount(s.target["labels"].numpy(), minlength=len(counts))
        return rarest_class_groups(self.detections(), counts.tolist(), self._threshold())

    def _threshold(self) -> float:
        return self.model.score_threshold if self.model is not None else self.task.settings.detection_score_threshold

    def influence(self) -> torch.Tensor:
        if self._scores is None:
            model = self.model
            if model is None or model.s_test is None:
                raise SignalMissing("no s_test: the round's s_test step did not run for this detector")
            problem = DetectionInfluence(self._detector(), [], [], [], [], params=model.influence_params,
                                         score_threshold=model.score_threshold)
            result = problem.score_images(model.s_test, [s.image for s in self.inputs.pool])
            self._scores, self._detections = result.scores, result.detections
            self.no_box = int(result.no_box.sum())
        return self._scores


class DetectionTask(Task[DetectionInputs, DetectionModel]):
    """Object detection with one ``<RectangleLabels>``; see the module docstring."""

    kind = DetectionConfig.kind
    config: DetectionConfig
    forms = {name: (MEAN_CONFIDENCE, _UNCERTAINTY_NOTE.format(name=name))
             for name in (LEAST_CONFIDENCE, MARGIN, ENTROPY)}

    def isal_options(self, paper: bool) -> IsalOptions:
        return IsalOptions(reference="holdout", holdout_fraction=self.settings.holdout_fraction, balance="none",
                           solver=PAPER if paper else DETECTION_SOLVER)

    def detector_config(self) -> DetectorConfig:
        return detector_config(len(self.labels), self.settings)

    def body_cache(self, config: DetectorConfig) -> Any:
        """The frozen body's outputs per image, kept between rounds (the costly part of every pass)."""
        if self.parts.body_cache is None:
            folder = self.parts.project_dir / "detector-body" / config.backbone
            self.parts.body_cache = TensorListCache(folder, self.settings.detection_cache_mb * 2**20)
        return self.parts.body_cache

    # -- fetch ---------------------------------------------------------------------------------------------
    def split(self, tasks: Sequence[dict[str, Any]]) -> Split[dict[str, Any]]:
        split: Split[dict[str, Any]] = Split()
        for task in tasks:
            if not task.get("annotations"):
                split.unlabeled.append(task)
                continue
            try:
                latest_annotation(task)
            except AnnotationSkipped as exc:
                split.skipped.append({"task": task.get("id"), "reason": exc.reason})
                continue
            split.labeled.append((task, task))  # boxes are read against the decoded image (features)
        return split

    # -- features ------------------------------------------------------------------------------------------
    def features(self, split: Split[dict[str, Any]], images: ImageSource,
                 previous: DetectionModel | None) -> DetectionInputs:
        inputs = DetectionInputs(labeled_ids=[], pool_ids=[], skipped=list(split.skipped), notes=list(split.notes))
        cache = self.parts.image_cache or ImageCache(self.parts.project_dir / "images")
        for task, _ in split.labeled:
            sample = self._sample(task, images, cache, inputs)
            if sample is None:
                continue
            try:
                boxes, labels, issues = task_boxes(task, self.config, *sample.original_size)
            except AnnotationSkipped as exc:
                inputs.skipped.append({"task": task["id"], "reason": exc.reason})
                continue
            inputs.notes += [{"task": task["id"], "kind": i.kind, "message": i.message} for i in issues]
            sx, sy = sample.scale
            sample.target = {"boxes": (boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)).float(),
                             "labels": labels}
            inputs.labeled.append(sample)
            inputs.labeled_ids.append(sample.task_id)
        for task in split.unlabeled:
            sample = self._sample(task, images, cache, inputs)
            if sample is not None:
                inputs.pool.append(sample)
                inputs.pool_ids.append(sample.task_id)
        return inputs

    def _sample(self, task: dict[str, Any], images: ImageSource, cache: ImageCache,
                inputs: DetectionInputs) -> Sample | None:
        """The task's image decoded and shrunk, or None with the reason appended to ``inputs.skipped``."""
        try:
            reference = image_reference(task, self.config.image_value_key)
        except ValueError as exc:
            inputs.skipped.append({"task": task.get("id"), "reason": str(exc)})
            return None
        try:
            data = None if reference.startswith("data:") else cache.get(reference)
            if data is None:
                data = image_bytes(reference, images)
                image = decode_image(data, reference)
                if not reference.startswith("data:"):  # kept only once it decodes
                    cache.put(reference, data)
                    inputs.images_downloaded += 1
            else:
                image = decode_image(data, reference)
                inputs.image_cache_hits += 1
        except Exception as exc:  # noqa: BLE001 - every failure is reported per task, never fatal
            inputs.skipped.append({"task": task.get("id"),
                                   "reason": f"image could not be loaded: {type(exc).__name__}: {exc}"})
            return None
        return Sample(int(task["id"]), reference, shrink(image, self.settings.detection_image_size), image.size)

    def embeddings(self, inputs: DetectionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The classification backbone's features of the shrunk images (cached per image): for diversity."""
        by_reference = {s.reference: s for s in [*inputs.labeled, *inputs.pool]}

        def load(reference: str) -> Image.Image:
            return Image.fromarray(by_reference[reference].image.permute(1, 2, 0).numpy())

        featurizer = self.parts.stock_featurizer()
        feats, _ = featurizer(list(by_reference), load)
        dim = featurizer.model.feature_dim

        def stack(samples: list[Sample]) -> torch.Tensor:
            return torch.stack([feats[s.reference] for s in samples]) if samples else torch.zeros(0, dim)

        return stack(inputs.pool), stack(inputs.labeled)

    # -- fit ------------------------------------------------------------------------------------------------
    def fit(self, inputs: DetectionInputs, previous: DetectionModel | None,
            seed: int) -> tuple[DetectionModel | ColdStart[DetectionModel], dict[str, Any]]:
        config = self.detector_config()
        model = DetectionModel(self.labels, config, score_threshold=self.settings.detection_score_threshold)
        labeled = inputs.labeled
        boxes = sum(len(s.target["labels"]) for s in labeled if s.target is not None)
        info: dict[str, Any] = {"boxes_labeled": boxes, "score_threshold": model.score_threshold}
        try:
            if boxes == 0:
                raise NotEnoughLabels(f"{len(labeled)} usable annotated images hold no box: nothing to learn from")
            train, ref = stable_reference([s.task_id for s in labeled], self.settings.holdout_fraction,
                                          salt=self.parts.project_id)
        except ValueError as exc:  # NotEnoughLabels, or too few images to hold R out
            return ColdStart(str(exc), model), info
        model.train_positions, model.reference_positions = train, ref
        detector = build_detector(config, seed=seed)
        warm = previous is not None and previous.detector is not None and previous.config == config
        if warm:
            detector.load_state_dict(previous.detector.state_dict())
        detector.backbone.cache = self.body_cache(config)
        steps = self.settings.detection_steps if warm else self.settings.detection_first_steps
        trained = train_detector(detector, [labeled[i].image for i in train], [labeled[i].target for i in train],
                                 steps, BATCH_SIZE, warmup=max(1, min(20, steps // 5)), seed=seed)
        model.detector = detector
        validation = mean_average_precision(detector.predict([labeled[i].image for i in ref]),
                                            [labeled[i].target for i in ref], len(self.labels))
        info.update({
            "warm_start": warm if warm or previous is None or previous.detector is None
            else "no: the stored detector's architecture differs; trained from ImageNet weights",
            "train_size": len(train), "reference_size": len(ref), "detector": asdict(config),
            "train_steps": trained.steps, "train_loss": round(trained.final_loss, 4),
            "validation_map50": round(float(validation["map"]), 4),
            "validation": f"mAP@0.5 on the {len(ref)} held-out reference images",
        })
        return model, info

    # -- s_test ---------------------------------------------------------------------------------------------
    def influence(self, model: DetectionModel, inputs: DetectionInputs, options: IsalOptions,
                  seed: int) -> tuple[DetectionModel, dict[str, Any]]:
        assert model.detector is not None and model.train_positions is not None, "influence needs a fitted model"
        if options.reference != "holdout":
            raise ValueError("detection influence needs a held-out reference set: a warm-started detector cannot "
                             "be cross-fitted")
        labeled = inputs.labeled
        train, ref = model.train_positions, model.reference_positions
        model.influence_params = list(self.settings.detection_params)
        problem = DetectionInfluence(model.detector, [labeled[i].image for i in train],
                                     [labeled[i].target for i in train], [labeled[i].image for i in ref],
                                     [labeled[i].target for i in ref], params=model.influence_params,
                                     score_threshold=model.score_threshold, damping=DAMPING)
        s_test, solve = solve_s_test(problem, options.solver.with_seed(seed))
        model.s_test = s_test.detach()
        return model, {"influence_params": model.influence_params, "solver": solve.method,
                       "s_test_iterations": solve.iterations, "s_test_residual": solve.relative_residual,
                       "s_test_seconds": round(solve.seconds, 4)}

    # -- score, write back -------------------------------------------------------------------------------------
    def view(self, model: DetectionModel | None, inputs: DetectionInputs) -> DetectionView:
        if model is not None and model.detector is not None:
            model.detector.backbone.cache = self.body_cache(model.config)
        return DetectionView(self, model, inputs)

    def prelabels(self, view: DetectionView, positions: np.ndarray) -> list[list[dict[str, Any]]]:
        if view.model is None or view.model.detector is None:
            return [[] for _ in positions]
        detections = view.detections()
        pool = view.inputs.pool
        return [prelabel(detections[int(i)], pool[int(i)], self.config, view.model.score_threshold)
                for i in positions]

    def evaluate(self, model: DetectionModel, inputs: DetectionInputs) -> dict[str, float]:
        if model.detector is None or not inputs.labeled:
            return {"map50": float("nan")}
        model.detector.backbone.cache = self.body_cache(model.config)
        result = mean_average_precision(model.detector.predict([s.image for s in inputs.labeled]),
                                        [s.target for s in inputs.labeled], len(self.labels))
        return {"map50": float(result["map"])}

    def report(self, inputs: DetectionInputs, view: DetectionView) -> dict[str, Any]:
        """Image and body cache use; boxes per class labeled, and the pool's predicted boxes above the threshold."""
        labeled = np.zeros(len(self.labels), dtype=np.int64)
        for sample in inputs.labeled:
            if sample.target is not None:
                labeled += np.bincount(sample.target["labels"].numpy(), minlength=len(self.labels))
        classes: dict[str, Any] = {"unit": "boxes", "labeled": dict(zip(self.labels, labeled.tolist(), strict=True))}
        try:
            threshold = view.model.score_threshold if view.model is not None else 0.0
            predicted = np.zeros(len(self.labels), dtype=np.int64)
            for detection in view.detections():  # made for the pre-labels already: no second pass
                kept = detection["labels"][detection["scores"] >= threshold].numpy()
                predicted += np.bincount(kept, minlength=len(self.labels))
            classes["pool_predicted"] = dict(zip(self.labels, predicted.tolist(), strict=True))
        except SignalMissing:  # cold start: no detector yet
            pass
        out: dict[str, Any] = {"images_downloaded": inputs.images_downloaded,
                               "image_cache_hits": inputs.image_cache_hits, "classes": classes}
        cache = self.parts.body_cache
        if isinstance(cache, TensorListCache):
            out["body_cache"] = {"loaded": cache.loaded, "computed": cache.pending}
        return out

    def committed(self, model: DetectionModel) -> None:
        """Keep the body outputs this round computed for the next one (and enforce the disk budget)."""
        cache = self.parts.body_cache
        if isinstance(cache, TensorListCache):
            cache.flush()

    # -- commit ---------------------------------------------------------------------------------------------
    def save(self, model: DetectionModel, pool_keys: torch.Tensor | None) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        if model.detector is not None:
            tensors.update({keys.DETECTOR_PREFIX + k: v for k, v in model.detector.state_dict().items()})
        if model.s_test is not None:
            tensors[keys.S_TEST] = model.s_test
        if pool_keys is not None:
            tensors[keys.POOL_KEYS] = pool_keys
        meta = {keys.KIND: self.kind, keys.LABELS: model.labels, keys.DETECTOR: asdict(model.config),
                keys.INFLUENCE_PARAMS: model.influence_params, keys.SCORE_THRESHOLD: model.score_threshold,
                keys.STRATEGY: model.strategy}
        return tensors, meta

    def load(self, state: RoundState) -> DetectionModel | None:
        meta, t = state.meta, state.tensors
        spec = meta.get(keys.DETECTOR)
        if meta.get(keys.KIND) != self.kind or meta.get(keys.LABELS) != self.labels or not isinstance(spec, dict):
            return None
        config = DetectorConfig(**spec)
        weights = keys.prefixed(t, keys.DETECTOR_PREFIX)
        detector = None
        if weights:
            detector = build_detector(DetectorConfig(**{**spec, "pretrained": False}), seed=None)
            detector.load_state_dict(weights)
            detector.eval()
        return DetectionModel(self.labels, config, detector=detector,
                              score_threshold=float(meta.get(keys.SCORE_THRESHOLD, 0.5)), s_test=t.get(keys.S_TEST),
                              influence_params=list(meta.get(keys.INFLUENCE_PARAMS) or FINAL_CONVS),
                              pool_keys=t.get(keys.POOL_KEYS), strategy=meta.get(keys.STRATEGY))
