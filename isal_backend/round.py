"""The round: a project's annotations in, a retrained model and an ordered labeling stream out.

One round runs every task kind; it reads like its data path, each step timed into the report:

1. **fetch**: the label config and every task with its annotations, from the datastore; the task
   kind (one per labeling control tag) splits them into labeled, unlabeled and skipped (with why);
2. **features**: what the model reads of each usable image (cached; a failed image is skipped);
3. **fit**: the model for pre-labels, warm-started from the stored round, with its validation figure;
   or the cold start (nothing to learn from yet: the order is typical-first on backbone features);
4. **s_test**: for ISAL, the influence problems on a held-out or cross-fitted reference set, solved;
5. **score** and **order**: the strategy orders the pool through the kind's view of it;
6. **write back**: one prediction for each of the top tasks (pre-label as ``result``, rank mapped
   into [0, 1] as ``score``, the round id as ``model_version``), then the stream serves them; what
   would leave more than two rounds' predictions in the datastore is deleted first;
7. **commit**: the round's artifacts to the model store, atomically (a killed round leaves the previous
   one current), the report for /metrics and its line in the project's history (the dashboard's curve);
   then thumbnails of the stream's head for the dashboard, and older rounds' predictions are cleaned up.

Fetch, write-back and the thumbnails' image reads are the steps that load the datastore: with a
:class:`~isal_backend.pacing.Pacer` each waits (briefly, boundedly) for a moment when the project's
annotators are not asking for tasks.

The round knows no Label Studio (only the :class:`~isal_backend.datastore.Datastore` port) and no
model internals (only the :class:`~isal_backend.tasks.base.Task` of the project's kind), so the
benchmark runs this same code on an offline datastore.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from isal_backend.datastore import Datastore
from isal_backend.history import HistoryReader
from isal_backend.labelstudio.config import parse_project_config
from isal_backend.labelstudio.convert import describe_result, ls_moment, rank_scores
from isal_backend.pacing import Pacer, unpaced
from isal_backend.settings import Settings
from isal_backend.store import ImageCache, ModelStore
from isal_backend.strategies.base import Strategy
from isal_backend.strategies.catalog import make_strategy
from isal_backend.strategies.isal import IsalStrategy
from isal_backend.tasks import Task, TaskParts, task_for
from isal_backend.tasks.base import ColdStart, NotEnoughLabels, image_bytes, image_reference, round_seed
from isal_backend.thumbnails import Thumbnails, thumbnail_key

log = logging.getLogger(__name__)

COLD_START_ORDERS = {"coreset": "core-set diversity", "typical": "typical-first (the densest image of each cluster)",
                     "random": "random"}
#: Tasks at the head of the stream the report describes, with thumbnails (the dashboard's "next tasks").
STREAM_HEAD = 12


#: Predictions a round writes per label it expects before the next round's order is served (the next round
#: needs about one interval to run, annotators with Uncertainty sampling spread over the first few, skips).
WRITE_HEADROOM = 4
#: Recent round intervals the label rate is read from.
RATE_WINDOW = 3


def adaptive_write_size(history: Sequence[Mapping[str, Any]], labeled_now: int, minimum: int, cap: int
                        ) -> tuple[int, str]:
    """How many predictions a round writes: the tasks annotators can reach before the next round, no more.

    Every write costs Label Studio (an import, and later a delete that holds SQLite's write lock), and
    tasks past the written ones are served at random anyway once the next round's order replaces this
    one. So: ``WRITE_HEADROOM`` x the most labels gained in one round interval lately (the last
    :data:`RATE_WINDOW` intervals of the history, the one ending now included: labels per interval is
    the annotation rate times the round duration), clamped to [``minimum``, ``cap``]. The largest recent
    interval, not the mean: writing too few leaves annotators an unordered stream, too many only costs time.
    ``history``: the project's round summaries, oldest first (``labeled`` each); ``cap`` 0: no cap.
    """
    counts = [int(e["labeled"]) for e in history if isinstance(e.get("labeled"), int)] + [int(labeled_now)]
    gains = [max(0, b - a) for a, b in zip(counts, counts[1:], strict=False)][-RATE_WINDOW:]
    per_interval = max(gains, default=0)
    wanted = WRITE_HEADROOM * per_interval
    size = max(minimum, wanted)
    if cap:
        size = min(size, cap)
    basis = (f"{per_interval} labels in the busiest of the last {len(gains)} round intervals" if gains
             else "no earlier round")
    bound = ("ISAL_WRITE_MIN" if size == minimum and wanted <= minimum
             else "ISAL_WRITE_TOP_M" if cap and size == cap and wanted >= cap else f"{WRITE_HEADROOM} x that")
    return size, f"{basis}; {bound}"


def new_round_id() -> str:
    """Sortable, collision-free: UTC time to the microsecond plus random bits."""
    return f"isal-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:6]}"


def newest_annotation(tasks: list[dict[str, Any]]) -> str | None:
    """The newest ``updated_at`` (else ``created_at``) of any annotation: what this round has seen."""
    times = [str(a.get("updated_at") or a.get("created_at") or "") for t in tasks for a in t.get("annotations") or []
             if isinstance(a, dict)]
    return max((t for t in times if t), default=None, key=ls_moment)  # as times: LS may drop the fraction


class Timer:
    """Seconds per named step, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{step}_seconds"] = round(self.seconds.get(f"{step}_seconds", 0.0)
                                                    + time.perf_counter() - start, 4)

    def total(self) -> float:
        self.seconds["total_seconds"] = round(time.perf_counter() - self.started, 4)
        return self.seconds["total_seconds"]


@dataclass
class Ordered:
    """What the score and order steps decided."""

    positions: np.ndarray  # pool positions, best first, as many as are written back
    keys: torch.Tensor | None  # the strategy's per-item key over the whole pool (None: set-wise order)
    description: str


class Round:
    """One project's round over ``datastore``; construct, then :meth:`run`.

    ``parts`` carries what the task kinds keep between rounds (feature caches, shards); by default the
    project's own folders in ``store``. ``write_size``: predictions written (0: every task); by default
    :func:`adaptive_write_size` from the project's history, or every task when ISAL_WRITE_TOP_M is 0 (the
    benchmark passes its budget). ``clean_up`` runs after the commit (the job passes the clean-up policy,
    the benchmark nothing). ``pacer``: fetch, write-back and the thumbnails' reads wait for the annotators
    (see :mod:`isal_backend.pacing`); None: at once. ``superseded``: True when a newer round of the project
    waits (the job's word); the thumbnails of a round about to be replaced are left to the newer one.
    """

    def __init__(self, project_id: int, datastore: Datastore, store: ModelStore, settings: Settings,
                 parts: TaskParts | None = None, write_size: int | None = None,
                 clean_up: Callable[[str], Any] | None = None, pacer: Pacer | None = None,
                 superseded: Callable[[], bool] | None = None) -> None:
        self.project_id = int(project_id)
        self.datastore = datastore
        self.store = store
        self.settings = settings
        self.parts = parts or TaskParts(settings, self.project_id, store.project_dir(self.project_id))
        self.write_size = write_size
        self.clean_up = clean_up
        self.pacer = pacer
        self.superseded = superseded

    def paced(self, step: str) -> AbstractContextManager[None]:
        return self.pacer.step(step) if self.pacer is not None else unpaced(step)

    def task(self) -> Task:
        """The project's task kind, from its label config."""
        return task_for(parse_project_config(self.datastore.label_config()), self.parts)

    def run(self) -> dict[str, Any]:
        timer = Timer()
        round_id = new_round_id()
        self.store.sweep_staging(self.project_id)
        with timer("fetch"), self.paced("fetch"):
            task = self.task()
            fetched_at = datetime.now(UTC).isoformat()
            tasks = self.datastore.tasks()
            split = task.split(tasks)
        if not tasks:
            # Nothing to order (a project connected before its import): commit nothing, so the import's
            # TASKS_CREATED still finds no round and starts the cold-start one.
            log.info("project %s: no tasks yet; round %s commits nothing", self.project_id, round_id)
            return {"round_id": round_id, "project": self.project_id, "kind": task.kind, "labeled": 0,
                    "unlabeled": 0, "written": 0, "committed": False, "reason": "the project has no tasks yet",
                    "fetched_at": fetched_at, "seconds": timer.total()}
        stored = self.store.load(self.project_id)
        previous = task.load(stored) if stored is not None else None
        with timer("features"):
            inputs = task.features(split, self.datastore.image, previous)
        seed = round_seed(self.project_id, len(inputs.labeled_ids))
        strategy, note = task.strategy(self.settings.strategy)
        report: dict[str, Any] = {
            "round_id": round_id, "project": self.project_id, "kind": task.kind, "labels": task.labels,
            "strategy": strategy.name, "labeled": len(inputs.labeled_ids), "unlabeled": inputs.pool_size,
            "fetched_at": fetched_at, "newest_annotation_at": newest_annotation(tasks),
            "fetch": self.datastore.fetch_report(),
        }
        if note:
            report["strategy_note"] = note
        with timer("fit"):
            fitted, info = task.fit(inputs, previous, seed)
        report.update(info)
        model = fitted.model if isinstance(fitted, ColdStart) else fitted
        warmup = len(inputs.labeled_ids) < self.settings.warmup_labels
        if isinstance(fitted, ColdStart) or (warmup and strategy.needs_model):
            report["cold_start_reason"] = fitted.reason if isinstance(fitted, ColdStart) else (
                f"{len(inputs.labeled_ids)} labels, fewer than ISAL_WARMUP_LABELS={self.settings.warmup_labels}: "
                "the model pre-labels, the cold-start order stays")
            if strategy.needs_model:
                strategy = make_strategy(self.settings.cold_start)
        elif isinstance(strategy, IsalStrategy):
            with timer("s_test"):
                try:
                    model, info = task.influence(model, inputs, strategy.options, seed)
                    report.update(info)
                except NotEnoughLabels as exc:
                    strategy, report["cold_start_reason"] = make_strategy(self.settings.cold_start), str(exc)
        size, report["write_size_reason"] = self.chosen_write_size(len(inputs.labeled_ids))
        report["write_size"] = size
        count = inputs.pool_size if size == 0 else min(size, inputs.pool_size)
        with timer("score"):
            view = task.view(model, inputs)
            ordered = self.order(strategy, view, count, seed, cold="cold_start_reason" in report)
        report.update({"order": ordered.description, "strategy_options": strategy.describe()})
        if hasattr(view, "no_box"):
            report["no_box"] = view.no_box
        with timer("write_back"):
            results = task.prelabels(view, ordered.positions)
            scores = rank_scores(len(ordered.positions))
            predictions = [
                {"task": int(inputs.pool_ids[int(i)]), "model_version": round_id, "score": score, "result": result}
                for i, score, result in zip(ordered.positions, scores, results, strict=True)
            ]
            with self.paced("write"):
                report.update(self.room_made(round_id))
                written = self.datastore.write(round_id, predictions)
        head, references = self.stream_head(task, tasks, predictions, ordered)
        report.update({
            "model_version": round_id, "tasks_scored": inputs.pool_size, "written": written,
            "top_tasks": [int(inputs.pool_ids[int(i)]) for i in ordered.positions[:20]], "stream_head": head,
            "skipped": inputs.skipped, "notes": inputs.notes, **task.report(inputs, view),
        })
        if ordered.keys is not None:
            report["stream_key"] = "influence" if isinstance(strategy, IsalStrategy) else strategy.name
        if model is not None:
            model.strategy = strategy.name
            pool_keys = torch.sort(ordered.keys.double()).values if ordered.keys is not None else None
            tensors, meta = task.save(model, pool_keys)
        else:
            tensors, meta = {}, {"kind": task.kind}
        report["timings"] = timer.seconds
        if self.pacer is not None:
            report["pacing"] = self.pacer.summary
        report["seconds"] = timer.total()
        report["finished_at"] = datetime.now(UTC).isoformat()
        self.store.commit(self.project_id, round_id, tensors, meta, report)
        self.store.record_history(self.project_id, report)
        self.store.prune(self.project_id)
        if model is not None:
            task.committed(model)
        self.thumbnails(references)
        log.info("project %s round %s (%s): %s labeled, %s scored, %s written, order %s, %.2f s", self.project_id,
                 round_id, task.kind, report["labeled"], report["tasks_scored"], written, report["order"],
                 report["seconds"])
        if self.clean_up is not None and written:
            cleaned = self.clean_up(round_id)
            if isinstance(cleaned, dict):  # after the commit: in the status report, not the stored one
                report["clean_up"] = cleaned
        return report

    def room_made(self, round_id: str) -> dict[str, Any]:
        """:meth:`Datastore.make_room` and the report's word on it; a failure costs only the bound, not the round."""
        try:
            deleted = self.datastore.make_room(round_id)
        except Exception as exc:  # noqa: BLE001 - stale predictions cost space; the new order matters more
            log.warning("project %s: deleting stale predictions before the write failed: %s", self.project_id, exc)
            return {"make_room_error": str(exc)[:300]}
        return {"made_room": deleted} if deleted else {}

    def chosen_write_size(self, labeled: int) -> tuple[int, str]:
        """(predictions to write, 0 for every task; why)."""
        if self.write_size is not None:
            return self.write_size, "given by the caller"
        if self.settings.write_top_m == 0:
            return 0, "ISAL_WRITE_TOP_M=0: every task"
        history = HistoryReader().read(self.store.project_dir(self.project_id))
        return adaptive_write_size(history, labeled, self.settings.write_min, self.settings.write_top_m)

    @staticmethod
    def stream_head(task: Task, tasks: list[dict[str, Any]], predictions: list[dict[str, Any]],
                    ordered: Ordered) -> tuple[list[dict[str, Any]], list[str]]:
        """The first :data:`STREAM_HEAD` written tasks as the dashboard lists them (task, pre-label, score, the
        strategy's key, a thumbnail's key: a hash, never the image URL), and their image references."""
        by_id = {t.get("id"): t for t in tasks}
        head, references = [], []
        for prediction, position in zip(predictions[:STREAM_HEAD], ordered.positions[:STREAM_HEAD], strict=True):
            entry: dict[str, Any] = {"task": prediction["task"], "score": round(float(prediction["score"]), 6),
                                     "prelabel": describe_result(prediction["result"])}
            if ordered.keys is not None:
                entry["key"] = float(ordered.keys[int(position)])
            try:
                reference = image_reference(by_id.get(prediction["task"], {}), task.config.image_value_key)
            except ValueError:
                reference = None
            if reference is not None:
                entry["thumbnail"] = thumbnail_key(reference)
                references.append(reference)
            head.append(entry)
        return head, references

    def thumbnails(self, references: list[str]) -> None:
        """Thumbnails of the stream head, from the bytes a detection project keeps or one read of the datastore.

        After the commit: the new order is already served, and a failure costs only a placeholder. Reads of
        the datastore are paced like the write (measured: unpaced, they were half of the annotators' slow
        ``/next`` in ``bench live``), and left to the newer round when one waits.
        """
        cache = self.parts.image_cache or ImageCache(self.parts.project_dir / "images")
        folder = Thumbnails.of_project(self.store.project_dir(self.project_id))

        def read(reference: str) -> bytes:
            return image_bytes(reference, lambda r: cache.get(r) or self.datastore.image(r))

        reads = [r for r in references if folder.path(thumbnail_key(r)) is None and not r.startswith("data:")
                 and not cache.has(r)]
        if reads and self.superseded is not None and self.superseded():
            log.debug("project %s: a newer round waits; the stream head's thumbnails are left to it",
                      self.project_id)
            return
        start = time.perf_counter()
        try:
            with self.paced("thumbnails") if reads else unpaced("thumbnails"):
                counts = folder.ensure(references, read)
        except OSError as exc:
            log.warning("project %s: thumbnails not written: %s", self.project_id, exc)
            return
        log.debug("project %s: thumbnails %s in %.2f s", self.project_id, counts, time.perf_counter() - start)

    @staticmethod
    def order(strategy: Strategy, view: Any, count: int, seed: int, cold: bool) -> Ordered:
        if view.size == 0:
            return Ordered(np.zeros(0, dtype=np.int64), None, "none (no unlabeled task)")
        positions = np.asarray(strategy.order(view, count, seed), dtype=np.int64)
        keys = strategy.keys(view)
        if cold:
            return Ordered(positions, keys, f"cold-start: {COLD_START_ORDERS.get(strategy.name, strategy.name)}")
        options = strategy.describe()
        if isinstance(strategy, IsalStrategy):
            reference = ("cross-fitted: every label is in the reference set once" if options["reference"] == "crossfit"
                         else "influence on a held-out reference set")
            return Ordered(positions, keys, f"{strategy.name}: {reference}")
        return Ordered(positions, keys, f"{strategy.name} (baseline strategy)")
