"""One labeling task kind: what the round asks of it, step by step.

A :class:`Task` is built for one project's label config (one class per labeling control: ``<Choices>``
is classification, ``<RectangleLabels>`` detection) and gives the round everything kind-specific:

* **split** Label Studio's tasks into labeled (with their training targets), unlabeled, and skipped
  with the reason (a cancelled annotation, a label missing from the config, a malformed box);
* **features**: what the model reads of each task's image (cached backbone features; decoded images);
* **fit**: the model for pre-labels, warm-started from the stored round's, and its validation figure;
  or :class:`ColdStart` with the reason when there is nothing to learn from yet;
* **influence** (the round's s_test step): the influence problems ISAL's options ask for, solved;
* **view**: the fitted model's :class:`~isal_backend.strategies.base.PoolView` of the pool, so every
  strategy orders every kind;
* **prelabels**: Label Studio ``result`` lists for the tasks written back;
* **save / load**: the round's artifacts as a typed object, to and from the model store.

Adding a kind (multi-label choices, polygons) is one module with one subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from isal_backend.labelstudio.client import decode_data_url
from isal_backend.labelstudio.config import LabelConfig
from isal_backend.models.featurizer import Featurizer
from isal_backend.settings import Settings
from isal_backend.store import ImageCache, RoundState
from isal_backend.strategies import ISAL, ISAL_PAPER
from isal_backend.strategies.base import Strategy
from isal_backend.strategies.catalog import make_strategy
from isal_backend.strategies.isal import IsalOptions

#: ``reference -> image bytes``: how a task reads its images (the round passes its datastore's reader).
ImageSource = Callable[[str], bytes]
#: ``(uncached references, featurize) -> report``: shares a first featurization among RQ workers.
Sharder = Callable[[list[str], Callable[[list[str]], Any]], dict[str, Any]]

T = TypeVar("T")  # a labeled task's training target
InputsT = TypeVar("InputsT", bound="Inputs")
ModelT = TypeVar("ModelT")


class NotEnoughLabels(ValueError):
    """A model or an influence reference set cannot be had from the labels yet; the message says why."""


@dataclass
class Split(Generic[T]):
    """A project's tasks as one kind reads them."""

    labeled: list[tuple[dict[str, Any], T]] = field(default_factory=list)
    unlabeled: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"task": id, "reason": ...}``: neither trained on nor served again (reported in the round).
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: Repairs that did not cost the task (a clipped box), ``{"task", "kind", "message"}``.
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: Tasks the annotators skipped (also in ``skipped``): evidence of what is none of the classes.
    cancelled: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Inputs:
    """What the model reads of the labeled tasks and of the pool; the kinds add their own fields."""

    labeled_ids: list[int]
    pool_ids: list[int]
    skipped: list[dict[str, Any]]
    notes: list[dict[str, Any]]

    @property
    def pool_size(self) -> int:
        return len(self.pool_ids)


@dataclass
class ColdStart(Generic[ModelT]):
    """No model to order by yet; ``model`` may still carry what needs no labels (a projection)."""

    reason: str
    model: ModelT | None = None


@dataclass
class TaskParts:
    """What a task kind reads and keeps between rounds: injected, so a benchmark can share it across projects.

    Defaults are the project's own folders in the model store.
    """

    settings: Settings
    project_id: int
    project_dir: Path
    featurizer: Featurizer | None = None  # the stock backbone's features (classification; detection's cold start)
    body_cache: MutableMapping[bytes, list[torch.Tensor]] | None = None  # detection: the frozen body's outputs
    image_cache: ImageCache | None = None  # detection: each task image's bytes
    sharder: Sharder | None = None  # RQ feature shards for a large first featurization

    def stock_featurizer(self) -> Featurizer:
        if self.featurizer is None:
            self.featurizer = Featurizer(self.settings.backbone, self.project_dir / "features", self.settings.device,
                                         image_size=self.settings.image_size,
                                         load_threads=self.settings.download_threads)
        return self.featurizer


def image_reference(task: dict[str, Any], value_key: str) -> str:
    """The task's image reference under ``data.<value_key>``; ValueError naming the task when missing."""
    data = task.get("data")
    value = data.get(value_key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"task {task.get('id')} has no image under data.{value_key}")
    return value


def image_bytes(reference: str, images: ImageSource) -> bytes:
    """A task image's bytes: a ``data:`` URL carries them in the task itself; anything else is read from ``images``."""
    return decode_data_url(reference) if reference.startswith("data:") else images(reference)


def round_seed(project_id: int, labeled: int) -> int:
    """One seed per project and labeled-set size: reproducible rounds, a fresh draw when labels grow."""
    return int(project_id) * 100_003 + int(labeled)


class Task(ABC, Generic[InputsT, ModelT]):
    """One kind of labeling task; see the module docstring for what each step gives the round."""

    kind: ClassVar[str]
    #: ISAL_STRATEGY names that take another form for this kind: ``{name: (form, note)}``.
    forms: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, config: LabelConfig, parts: TaskParts) -> None:
        self.config = config
        self.parts = parts
        self.settings = parts.settings

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    # -- the strategy ---------------------------------------------------------------------------------
    def strategy(self, name: str) -> tuple[Strategy, str | None]:
        """The strategy ``name`` takes for this kind, and a note when its form differs from the name."""
        form, note = self.forms.get(name, (name, None))
        isal = self.isal_options(paper=form == ISAL_PAPER) if form in (ISAL, ISAL_PAPER) else None
        return make_strategy(form, isal), note

    @abstractmethod
    def isal_options(self, paper: bool) -> IsalOptions:
        """This kind's ISAL settings (``paper``: the authors')."""

    # -- the round's steps ----------------------------------------------------------------------------
    @abstractmethod
    def split(self, tasks: Sequence[dict[str, Any]]) -> Split[Any]:
        """Labeled (with targets), unlabeled and skipped tasks."""

    @abstractmethod
    def features(self, split: Split[Any], images: ImageSource, previous: ModelT | None) -> InputsT:
        """What the model reads of every usable task; tasks whose image fails go to ``skipped``."""

    @abstractmethod
    def fit(self, inputs: InputsT, previous: ModelT | None, seed: int) -> tuple[ModelT | ColdStart[ModelT],
                                                                               dict[str, Any]]:
        """The model for pre-labels (warm-started from ``previous``) and what its fit measured."""

    @abstractmethod
    def influence(self, model: ModelT, inputs: InputsT, options: IsalOptions, seed: int) -> tuple[ModelT,
                                                                                                  dict[str, Any]]:
        """The model with its influence state (s_test solved as ``options`` ask); raises NotEnoughLabels."""

    @abstractmethod
    def view(self, model: ModelT | None, inputs: InputsT) -> Any:
        """The model's :class:`~isal_backend.strategies.base.PoolView` of the pool (None: cold start)."""

    @abstractmethod
    def prelabels(self, view: Any, positions: np.ndarray) -> list[list[dict[str, Any]]]:
        """Label Studio ``result`` lists for the given pool positions (``[]`` where there is no model)."""

    @abstractmethod
    def save(self, model: ModelT, pool_keys: torch.Tensor | None) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, Any]]:
        """The round's artifacts as tensors and JSON metadata (their key names: :mod:`.artifacts`)."""

    @abstractmethod
    def load(self, state: RoundState) -> ModelT | None:
        """The stored round's model, or None when it was made for another kind, labels or architecture."""

    @abstractmethod
    def evaluate(self, model: ModelT, inputs: InputsT) -> dict[str, float]:
        """The model's figures on labeled ``inputs`` it did not train on (a benchmark's test split)."""

    def report(self, inputs: InputsT, view: Any) -> dict[str, Any]:
        """What this kind adds to the round's report once the pool is scored and pre-labeled (``view``: its
        :meth:`view`): what its caches did, and ``classes``, how the labels and the pool's predictions spread
        over the classes (the dashboard shows both)."""
        return {}

    def committed(self, model: ModelT) -> None:
        """After a round (or a batch of new tasks) used ``model``: keep what the next reuses, drop what none will."""
