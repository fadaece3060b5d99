"""Image classification (``<Choices>``): a linear head on frozen backbone features, and its closed-form ISAL.

* features: the backbone's features of every task image, cached per image (a round pays only for
  images it has not seen; a large first featurization is shared among RQ workers in shards);
  ``ISAL_TRAIN_MODE=finetune`` first adapts the backbone to the labeled images;
* fit: the features projected onto their top principal components (``ISAL_FEATURE_DIM``, fitted on every
  task's features, no label used), a softmax head on all labels (L-BFGS to the unique optimum,
  warm-started) for pre-labels, and one head per cross-validation fold for the validation accuracy;
* influence (s_test): ``crossfit`` makes every fold the reference set R of its own fold head, which
  never trained on it (so R grows with the annotations); ``holdout`` (the paper's) holds out one
  stratified slice. ``s_test`` by the shared solvers on the head's closed-form curvature; the folds'
  standardised scores are averaged; the expected gradient runs over the top K classes;
* view: posteriors, confidence, predicted classes (the groups ISAL's batches are balanced over) and
  influence, for every strategy.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from isal_backend.influence import HeadInfluence, LinearHead, check_top_k, fit_linear_head, score_head, solve_s_test
from isal_backend.labelstudio.config import ClassificationConfig
from isal_backend.labelstudio.convert import CANCELLED, AnnotationSkipped, prediction_result, task_label
from isal_backend.labelstudio.images import decode_image
from isal_backend.models.featurizer import STOCK, Featurizer, cache_key
from isal_backend.models.finetune import finetune_backbone
from isal_backend.models.projection import Projection
from isal_backend.models.rows import CachedRows, FeatureRows, MatrixRows
from isal_backend.store import RoundState
from isal_backend.strategies.base import SignalMissing
from isal_backend.strategies.isal import PAPER_OPTIONS, IsalOptions
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
from isal_backend.threads import single_torch_thread

#: Folds of the cross-validated accuracy; ISAL's cross-fitting reuses them (one influence unit per fold).
CV_FOLDS = 5
#: Skipped tasks needed before "looks like a skipped one" is judged, and that judge's weight decay.
MIN_SKIPS = 3
SKIP_WEIGHT_DECAY = 1e-2


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of labeled indices into (train, reference).

    Every class with two or more labels gives at least one to the reference set and keeps one
    for training; single-label classes stay in training.
    """
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    train, ref = [], []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        take = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(fraction * idx.size)))
        ref.extend(idx[:take])
        train.extend(idx[take:])
    if not ref or not train:
        raise NotEnoughLabels(
            f"ISAL needs a reference set held out from training: {labels.shape[0]} labels "
            "are too few (at least one class needs two labels)"
        )
    return np.sort(np.asarray(train)), np.sort(np.asarray(ref))


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[np.ndarray]:
    """Split labeled indices into ``folds`` groups, each class spread evenly over them (empty ones dropped)."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    groups: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for cls in np.unique(y):
        for j, i in enumerate(rng.permutation(np.flatnonzero(y == cls))):
            groups[(offset + j) % folds].append(int(i))
        offset += int((y == cls).sum())
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups if g]


@dataclass
class InfluenceUnit:
    """One trained head with its ``s_test``: everything needed to score any feature row later.

    ``scale`` standardises the unit's scores (cross-fitted units are averaged in that scale).
    """

    head: LinearHead
    s_test: torch.Tensor
    scale: float = 1.0

    def score(self, features: torch.Tensor, top_k: int) -> torch.Tensor:
        s = self.s_test.view_as(self.head.weight)
        return score_head(self.head, s, features.to(self.head.weight.dtype), top_k) / self.scale


def score_units(units: Sequence[InfluenceUnit], features: torch.Tensor, top_k: int) -> torch.Tensor:
    """The mean standardised score of several units (one unit: its plain ISAL score)."""
    return torch.stack([unit.score(features, top_k) for unit in units]).mean(dim=0)


def resolved_top_k(top_k: int | None, num_classes: int) -> int:
    """The K in use: 2 (1 with two classes) when unset; an explicit K is checked, never silently lowered."""
    k = min(2, num_classes - 1) if top_k is None else top_k
    return check_top_k(k, num_classes)


@dataclass
class ClassificationInputs(Inputs):
    """The labeled tasks' and the pool's feature rows (by cache key, read as needed), and the labels."""

    labeled_keys: list[str]
    labeled_labels: torch.Tensor
    pool_keys: list[str]
    rows: FeatureRows
    #: Images of the tasks annotators skipped (cancelled annotations).
    cancelled_keys: list[str] = field(default_factory=list)
    #: ``ISAL_TRAIN_MODE=finetune``: the backbone these features came from (this round's fine-tuning).
    backbone_weights: dict[str, torch.Tensor] | None = None
    backbone_version: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    #: ``(labeled, pool)`` projected by one projection, kept so every step of a round projects once.
    _projected: tuple[object, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, labeled_ids: list[int], pool_ids: list[int], labeled_features: torch.Tensor,
           labeled_labels: torch.Tensor, pool_features: torch.Tensor) -> ClassificationInputs:
        """Inputs from feature matrices held in memory (tools and tests)."""
        labeled_keys = [f"labeled-{i}" for i in labeled_ids]
        pool_keys = [f"pool-{i}" for i in pool_ids]
        rows = MatrixRows(labeled_keys + pool_keys, torch.cat([labeled_features, pool_features]))
        return cls(list(labeled_ids), list(pool_ids), [], [], labeled_keys, labeled_labels, pool_keys, rows)

    @property
    def labeled_features(self) -> torch.Tensor:
        """Raw features of the labeled tasks (read on demand)."""
        return self.rows.raw(self.labeled_keys)

    @property
    def pool_features(self) -> torch.Tensor:
        """Raw features of the pool (read on demand: 1,280 numbers a task)."""
        return self.rows.raw(self.pool_keys)

    @property
    def size(self) -> int:
        return len(self.labeled_keys) + len(self.pool_keys)

    def projected(self, projection: Projection | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labeled, pool)`` features through ``projection`` (None: raw, as float64), computed once."""
        if self._projected is None or self._projected[0] is not projection:
            both = self.rows.projected(self.labeled_keys + self.pool_keys, projection)
            self._projected = (projection, both[: len(self.labeled_keys)], both[len(self.labeled_keys):])
        return self._projected[1], self._projected[2]


@dataclass
class ClassificationModel:
    """A classification round's artifacts (see :mod:`isal_backend.tasks.artifacts` for their keys)."""

    labels: list[str]
    backbone: str
    image_size: int | None
    projection: Projection | None = None
    head: LinearHead | None = None  # the pre-label head, on every label; None at cold start
    folds: list[np.ndarray] = field(default_factory=list)  # not stored: the next round makes its own
    fold_heads: list[LinearHead] = field(default_factory=list)
    units: list[InfluenceUnit] = field(default_factory=list)
    top_k: int = 1
    backbone_weights: dict[str, torch.Tensor] | None = None
    backbone_version: str | None = None
    pool_keys: torch.Tensor | None = None
    strategy: str | None = None
    #: The influence of the pool this round's s_test step scored (not stored; the view reuses it).
    pool_influence: torch.Tensor | None = None


class ClassificationView:
    """A classification model's :class:`~isal_backend.strategies.base.PoolView` of the pool."""

    def __init__(self, model: ClassificationModel, inputs: ClassificationInputs) -> None:
        self.model, self.inputs = model, inputs
        self.labeled, self.pool = inputs.projected(model.projection)
        self._probs: torch.Tensor | None = None
        self._influence: torch.Tensor | None = model.pool_influence

    @property
    def size(self) -> int:
        return int(self.pool.shape[0])

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool, self.labeled

    def probabilities(self) -> torch.Tensor:
        if self.model.head is None:
            raise SignalMissing("no head yet (cold start): there are no class posteriors to order by")
        if self._probs is None:
            self._probs = self.model.head.probs(self.pool.to(self.model.head.weight.dtype))
        return self._probs

    def confidence(self) -> torch.Tensor:
        return self.probabilities().max(dim=1).values

    def groups(self) -> torch.Tensor:
        return self.probabilities().argmax(dim=1)

    def skip_likeness(self) -> torch.Tensor | None:
        """A two-class head on the projected features, labeled tasks against skipped ones (balanced weights)."""
        if len(self.inputs.cancelled_keys) < MIN_SKIPS or self.labeled.shape[0] == 0:
            return None
        skipped = self.inputs.rows.projected(self.inputs.cancelled_keys, self.model.projection)
        x = torch.cat([self.labeled, skipped])
        y = torch.cat([torch.zeros(self.labeled.shape[0], dtype=torch.long),
                       torch.ones(skipped.shape[0], dtype=torch.long)])
        weights = torch.where(y == 1, 0.5 / skipped.shape[0], 0.5 / self.labeled.shape[0]).double()
        with single_torch_thread():
            head = fit_linear_head(x, y, 2, SKIP_WEIGHT_DECAY, sample_weight=weights)
        return head.probs(self.pool.to(head.weight.dtype))[:, 1]

    def influence(self) -> torch.Tensor:
        if self._influence is None:
            if not self.model.units:
                raise SignalMissing("no influence units: the round's s_test step did not run for this model")
            self._influence = score_units(self.model.units, self.pool, self.model.top_k)
        return self._influence


def _can_hold_out(labels: torch.Tensor) -> str | None:
    """Why no model can be fitted and validated yet, or None when it can."""
    counts = torch.bincount(labels) if labels.numel() else torch.zeros(0, dtype=torch.long)
    classes = int((counts > 0).sum())
    if classes < 2:
        return f"{labels.numel()} labels in {classes} class(es): a classifier needs two classes"
    if int(counts.max()) < 2:
        return f"{labels.numel()} labels, none of their classes twice: nothing can be held out to validate on"
    return None


class ClassificationTask(Task[ClassificationInputs, ClassificationModel]):
    """Single-label image classification; see the module docstring."""

    kind = ClassificationConfig.kind
    config: ClassificationConfig

    def isal_options(self, paper: bool) -> IsalOptions:
        if paper:
            return IsalOptions(reference=PAPER_OPTIONS.reference, holdout_fraction=self.settings.holdout_fraction,
                               top_k=1, balance=PAPER_OPTIONS.balance, solver=PAPER_OPTIONS.solver)
        return IsalOptions(reference="crossfit", folds=CV_FOLDS, top_k=self.settings.top_k, balance="class",
                           shortlist=self.settings.isal_shortlist, dedupe=self.settings.isal_dedupe,
                           skip_aware=self.settings.isal_skip_aware)

    # -- fetch -----------------------------------------------------------------------------------------
    def split(self, tasks: Sequence[dict[str, Any]]) -> Split[int]:
        split: Split[int] = Split()
        index = {name: i for i, name in enumerate(self.config.labels)}
        for task in tasks:
            if not task.get("annotations"):
                split.unlabeled.append(task)
                continue
            try:
                label = task_label(task, self.config)
            except AnnotationSkipped as exc:  # neither trained on nor served again; reported in the round
                split.skipped.append({"task": task.get("id"), "reason": exc.reason})
                if exc.reason == CANCELLED:
                    split.cancelled.append(task)
                continue
            split.labeled.append((task, index[label]))
        return split

    # -- features ----------------------------------------------------------------------------------------
    def featurizer_for(self, model: ClassificationModel | None) -> Featurizer:
        """The stock backbone's featurizer, or (finetune) the stored round's fine-tuned one."""
        if model is not None and model.backbone_weights is not None and model.backbone_version:
            return Featurizer(self.settings.backbone, self.parts.project_dir / "features", self.settings.device,
                              version=model.backbone_version, weights=model.backbone_weights,
                              image_size=self.settings.image_size, load_threads=self.settings.download_threads)
        return self.parts.stock_featurizer()

    def features(self, split: Split[int], images: ImageSource,
                 previous: ClassificationModel | None) -> ClassificationInputs:
        def load(reference: str):
            return decode_image(image_bytes(reference, images), reference)

        featurizer = self.featurizer_for(previous)
        skipped = list(split.skipped)
        labeled_tasks = [t for t, _ in split.labeled]
        refs = self._references([*labeled_tasks, *split.unlabeled], skipped)
        refs.update(self._references(split.cancelled, []))  # skipped tasks' images: evidence of what to avoid
        report: dict[str, Any] = {}
        # Labeled images first (training needs them); at most ISAL_ROUND_NEW_IMAGES new ones a round, so a
        # large import is featurized over several rounds, each serving an order of what is done so far.
        labeled_refs = {refs[int(t["id"])] for t in labeled_tasks if int(t["id"]) in refs}
        missing = sorted(featurizer.missing(list(refs.values())), key=lambda r: r not in labeled_refs)
        budget = self.settings.round_new_images or len(missing)
        now, pending = missing[:budget], set(missing[budget:])
        if self.parts.sharder is not None and featurizer.version == STOCK and len(now) > self.settings.shard_size:
            start = time.perf_counter()
            report["shards"] = self.parts.sharder(now, lambda r: featurizer.compute(r, load))
            report["shards_seconds"] = round(time.perf_counter() - start, 4)
        failures = featurizer.compute(featurizer.missing(now), load)
        if pending:
            report["features_pending"] = len(pending)
        label_of = {int(t["id"]): y for t, y in split.labeled}
        labeled_keys, labels, labeled_ids, pool_keys, pool_ids = [], [], [], [], []
        for task in [*labeled_tasks, *split.unlabeled]:
            task_id = int(task["id"])
            reference = refs.get(task_id)
            if reference is None or reference in pending:
                continue
            if reference in failures:
                skipped.append({"task": task["id"], "reason": f"image could not be loaded: {failures[reference]}"})
            elif task_id in label_of:
                labeled_ids.append(task_id)
                labeled_keys.append(cache_key(reference))
                labels.append(label_of[task_id])
            else:
                pool_ids.append(task_id)
                pool_keys.append(cache_key(reference))
        cancelled_keys = [cache_key(refs[int(t["id"])]) for t in split.cancelled
                          if int(t["id"]) in refs and refs[int(t["id"])] not in failures
                          and refs[int(t["id"])] not in pending]
        inputs = ClassificationInputs(
            labeled_ids, pool_ids, skipped, list(split.notes), labeled_keys, torch.tensor(labels, dtype=torch.long),
            pool_keys, CachedRows(featurizer.cache, featurizer.model.feature_dim), report=report,
            cancelled_keys=cancelled_keys)
        if self.settings.train_mode == "finetune" and _can_hold_out(inputs.labeled_labels) is None:
            by_id = {int(t["id"]): t for t in labeled_tasks}
            weights, version, report["finetune"] = self._finetune(
                featurizer, [by_id[i] for i in labeled_ids], refs, inputs.labeled_labels, load)
            tuned = Featurizer(self.settings.backbone, self.parts.project_dir / "features", self.settings.device,
                               version=version, weights=weights, image_size=self.settings.image_size,
                               load_threads=self.settings.download_threads)
            tuned.compute(tuned.missing([refs[i] for i in labeled_ids + pool_ids]), load)
            inputs.rows = CachedRows(tuned.cache, tuned.model.feature_dim)
            inputs.backbone_weights, inputs.backbone_version = weights, version
        return inputs

    def _references(self, tasks: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> dict[int, str]:
        refs: dict[int, str] = {}
        for task in tasks:
            try:
                refs[int(task["id"])] = image_reference(task, self.config.image_value_key)
            except ValueError as exc:
                skipped.append({"task": task.get("id"), "reason": str(exc)})
        return refs

    def _finetune(self, featurizer: Featurizer, tasks: list[dict[str, Any]], refs: dict[int, str],
                  labels: torch.Tensor, load: Any) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
        """Fine-tune the backbone on the labeled images; returns its weights, a version name and a report."""
        start = time.perf_counter()
        size = featurizer._loaded()[1].size
        images = np.stack([np.asarray(load(refs[int(t["id"])]).convert("RGB").resize((size, size)), np.uint8)
                           for t in tasks])
        weights, losses = finetune_backbone(
            self.settings.backbone, featurizer.weights, images, labels.numpy(), len(self.config.labels),
            epochs=self.settings.finetune_epochs, device=self.settings.device, seed=len(tasks))
        report = {"epoch_losses": [round(v, 4) for v in losses], "seconds": round(time.perf_counter() - start, 4)}
        return weights, f"ft-{uuid.uuid4().hex[:12]}", report

    # -- fit ---------------------------------------------------------------------------------------------
    def fit(self, inputs: ClassificationInputs, previous: ClassificationModel | None,
            seed: int) -> tuple[ClassificationModel | ColdStart[ClassificationModel], dict[str, Any]]:
        model = ClassificationModel(labels=self.labels, backbone=self.settings.backbone,
                                    image_size=self.settings.image_size,
                                    backbone_weights=inputs.backbone_weights, backbone_version=inputs.backbone_version)
        model.projection, info = self._projection(inputs, previous)
        if inputs.report:
            info.update(inputs.report)
        reason = _can_hold_out(inputs.labeled_labels)
        if reason is not None:
            return ColdStart(reason, model), info
        x, y = inputs.projected(model.projection)[0], inputs.labeled_labels
        num_classes, decay = len(self.labels), self.settings.weight_decay
        warm = previous.head if previous is not None and previous.projection is model.projection else None
        with single_torch_thread():
            model.head = fit_linear_head(x, y, num_classes, decay, init=warm)
            model.folds = stratified_folds(y, CV_FOLDS, seed)
            everything = np.arange(y.shape[0])
            model.fold_heads = [fit_linear_head(x[np.setdiff1d(everything, f)], y[np.setdiff1d(everything, f)],
                                                num_classes, decay, init=model.head) for f in model.folds]
        correct = sum(float((h.probs(x[f]).argmax(1) == y[f]).double().sum())
                      for h, f in zip(model.fold_heads, model.folds, strict=True))
        info.update({"validation_accuracy": round(correct / y.shape[0], 4),
                     "validation": f"cross-validated over {len(model.folds)} folds of the labels",
                     "weight_decay": decay, "warm_start": warm is not None})
        return model, info

    def _projection(self, inputs: ClassificationInputs,
                    previous: ClassificationModel | None) -> tuple[Projection | None, dict[str, Any]]:
        dim = self.settings.feature_dim
        rows, width = inputs.size, inputs.rows.dim
        if dim == 0 or rows < 2:
            return None, {"projection": "none"}
        old = previous.projection if previous is not None and inputs.backbone_version is None else None
        if old is not None and old.dim == min(dim, width) and old.still_fits(rows, width):
            return old, {"projection": {"dim": old.dim, "fitted_on": old.fitted_on, "reused": True}}
        keys = inputs.labeled_keys + inputs.pool_keys
        sample = inputs.rows.raw([keys[int(i)] for i in Projection.sample(rows)])  # <= 4,096 rows are read
        with single_torch_thread():
            projection = Projection.fit(sample, dim, rows=rows)
        return projection, {"projection": {"dim": projection.dim, "fitted_on": rows, "reused": False,
                                           "explained_variance": projection.explained}}

    # -- s_test --------------------------------------------------------------------------------------------
    def influence(self, model: ClassificationModel, inputs: ClassificationInputs, options: IsalOptions,
                  seed: int) -> tuple[ClassificationModel, dict[str, Any]]:
        assert model.head is not None, "influence needs a fitted model"
        (x, pool), y = inputs.projected(model.projection), inputs.labeled_labels
        num_classes, decay = len(self.labels), self.settings.weight_decay
        model.top_k = resolved_top_k(options.top_k, num_classes)
        everything = np.arange(y.shape[0])
        with single_torch_thread():
            if options.reference == "crossfit":
                if len(model.folds) != options.folds:
                    model.folds = stratified_folds(y, options.folds, seed)
                    model.fold_heads = [fit_linear_head(x[np.setdiff1d(everything, f)], y[np.setdiff1d(everything, f)],
                                                        num_classes, decay, init=model.head) for f in model.folds]
                if len(model.folds) < 2:
                    raise NotEnoughLabels(f"cross-fitting needs at least 2 labels, got {y.shape[0]}")
                pairs = [(np.setdiff1d(everything, f), f, h) for f, h in zip(model.folds, model.fold_heads,
                                                                              strict=True)]
            else:
                train, ref = holdout_split(y, options.holdout_fraction, seed)
                pairs = [(train, ref, fit_linear_head(x[train], y[train], num_classes, decay, init=model.head))]
            units, pool_scores, seconds, residuals, iterations = [], [], 0.0, [], 0
            for j, (train, ref, head) in enumerate(pairs):
                problem = HeadInfluence(head, x[train], x[ref], y[ref], pool, decay)
                s_test, solve = solve_s_test(problem, options.solver.with_seed(seed + j))
                unit = InfluenceUnit(head, s_test)
                scores = unit.score(pool, model.top_k)
                if options.reference == "crossfit":  # standardised, so the folds' scores average fairly
                    std = float(scores.std()) if pool.shape[0] > 1 else 0.0
                    unit.scale = std if std > 0 else 1.0
                units.append(unit)
                pool_scores.append(scores / unit.scale)
                seconds += solve.seconds
                iterations += solve.iterations
                if solve.relative_residual is not None:
                    residuals.append(solve.relative_residual)
        model.units = units
        model.pool_influence = torch.stack(pool_scores).mean(dim=0) if pool_scores else None
        info: dict[str, Any] = {"top_k": model.top_k, "influence_units": len(units),
                                "s_test_seconds": round(seconds, 4), "s_test_iterations": iterations,
                                "reference_size": int(sum(len(ref) for _, ref, _ in pairs))}
        if residuals:
            info["s_test_residual"] = max(residuals)
        return model, info

    # -- score, write back ----------------------------------------------------------------------------------
    def view(self, model: ClassificationModel | None, inputs: ClassificationInputs) -> ClassificationView:
        if model is None:
            model = ClassificationModel(labels=self.labels, backbone=self.settings.backbone,
                                        image_size=self.settings.image_size)
        return ClassificationView(model, inputs)

    def prelabels(self, view: ClassificationView, positions: np.ndarray) -> list[list[dict[str, Any]]]:
        if view.model.head is None:
            return [[] for _ in positions]
        predicted = view.probabilities().argmax(dim=1)
        return [prediction_result(self.config, self.labels[int(predicted[int(i)])]) for i in positions]

    def report(self, inputs: ClassificationInputs, view: ClassificationView) -> dict[str, Any]:
        """Labels per class, and the pool's predicted classes (none at cold start: no head yet)."""

        def per_class(values: torch.Tensor) -> dict[str, int]:
            counts = torch.bincount(values.long(), minlength=len(self.labels)) if values.numel() else None
            return {name: int(counts[i]) if counts is not None else 0 for i, name in enumerate(self.labels)}

        classes: dict[str, Any] = {"unit": "images", "labeled": per_class(inputs.labeled_labels)}
        with contextlib.suppress(SignalMissing):  # cold start: no head yet
            classes["pool_predicted"] = per_class(view.groups())
        return {"classes": classes}

    def evaluate(self, model: ClassificationModel, inputs: ClassificationInputs) -> dict[str, float]:
        if model.head is None or not inputs.labeled_ids:
            return {"accuracy": float("nan")}
        probs = model.head.probs(inputs.projected(model.projection)[0].to(model.head.weight.dtype))
        return {"accuracy": float((probs.argmax(1) == inputs.labeled_labels).double().mean())}

    def committed(self, model: ClassificationModel) -> None:
        """Fine-tuned features of other backbone versions are never read again."""
        self.featurizer_for(model).drop_other_versions()

    # -- commit -----------------------------------------------------------------------------------------------
    def save(self, model: ClassificationModel, pool_keys: torch.Tensor | None) -> tuple[dict[str, torch.Tensor],
                                                                                         dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        if model.head is not None:
            tensors[keys.HEAD] = model.head.weight
        for i, unit in enumerate(model.units):
            tensors[keys.unit_head(i)] = unit.head.weight
            tensors[keys.unit_s_test(i)] = unit.s_test
            tensors[keys.unit_scale(i)] = torch.tensor(unit.scale, dtype=torch.float64)
        meta: dict[str, Any] = {keys.KIND: self.kind, keys.LABELS: model.labels, keys.TOP_K: model.top_k,
                                keys.BACKBONE: model.backbone, keys.IMAGE_SIZE: model.image_size,
                                keys.STRATEGY: model.strategy}
        if model.projection is not None:
            p = model.projection
            tensors.update({keys.PROJECTION_MEAN: p.mean, keys.PROJECTION_BASIS: p.basis,
                            keys.PROJECTION_SCALE: p.scale})
            meta[keys.PROJECTION] = {"fitted_on": p.fitted_on, "explained": p.explained, "key": p.key}
        if model.backbone_weights is not None:
            tensors.update({keys.BACKBONE_PREFIX + k: v for k, v in model.backbone_weights.items()})
            meta[keys.BACKBONE_VERSION] = model.backbone_version
        if pool_keys is not None:
            tensors[keys.POOL_KEYS] = pool_keys
        return tensors, meta

    def load(self, state: RoundState) -> ClassificationModel | None:
        meta, t = state.meta, state.tensors
        if (meta.get(keys.KIND) != self.kind or meta.get(keys.LABELS) != self.labels
                or meta.get(keys.BACKBONE) != self.settings.backbone
                or meta.get(keys.IMAGE_SIZE) != self.settings.image_size):
            return None  # made for another kind, other labels or another feature space: start afresh
        projection = None
        if keys.PROJECTION_BASIS in t:
            info = meta.get(keys.PROJECTION) or {}
            projection = Projection(t[keys.PROJECTION_MEAN], t[keys.PROJECTION_BASIS], t[keys.PROJECTION_SCALE],
                                    int(info.get("fitted_on", 0)), float(info.get("explained", 1.0)),
                                    key=str(info.get("key") or state.round_id))
        units = []
        while keys.unit_head(len(units)) in t:
            i = len(units)
            units.append(InfluenceUnit(LinearHead(t[keys.unit_head(i)]), t[keys.unit_s_test(i)],
                                       float(t[keys.unit_scale(i)])))
        weights = keys.prefixed(t, keys.BACKBONE_PREFIX) or None
        return ClassificationModel(
            labels=self.labels, backbone=self.settings.backbone, image_size=self.settings.image_size,
            projection=projection, head=LinearHead(t[keys.HEAD]) if keys.HEAD in t else None, units=units,
            top_k=int(meta.get(keys.TOP_K) or 1), backbone_weights=weights,
            backbone_version=meta.get(keys.BACKBONE_VERSION) if weights else None,
            pool_keys=t.get(keys.POOL_KEYS), strategy=meta.get(keys.STRATEGY))
