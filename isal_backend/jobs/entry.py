"""The jobs the queue runs and /predict calls: the product's parts put together from the settings.

* :func:`run_round`: a round of the project against its Label Studio (the queue's ``round`` job);
* :func:`score_new_tasks`: TASKS_CREATED, the stored round's pre-labels and places for new tasks;
* :func:`predict_tasks`: ``/predict``, the same for the tasks Label Studio sends;
* :func:`featurize_shard`: one shard of a large first featurization (RQ only).

Everything kind-specific is in :mod:`isal_backend.tasks`, the round itself in :mod:`isal_backend.round`;
this module only chooses the parts: Label Studio as the datastore, the project's folders in the model
store, feature shards when RQ workers share the work, the clean-up policy, and the pacing of a round's
calls around the project's annotators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.labelstudio.config import LabelConfig, parse_project_config
from isal_backend.labelstudio.datastore import LabelStudioDatastore
from isal_backend.labelstudio.failures import FailedDownloads
from isal_backend.labelstudio.images import decode_image
from isal_backend.labelstudio.mirror import TaskMirror
from isal_backend.pacing import Pacer
from isal_backend.queue.context import current_job
from isal_backend.round import Round
from isal_backend.settings import Settings, project_credentials
from isal_backend.status import record_round
from isal_backend.store import ModelStore
from isal_backend.strategies.base import SignalMissing
from isal_backend.tasks import Task, TaskParts, task_for
from isal_backend.tasks.base import ImageSource, Split

log = logging.getLogger(__name__)

#: Report fields too bulky for the status store (/metrics reads it on every scrape).
BULKY = ("skipped", "notes", "top_tasks", "stream_head")
#: The task mirror's file in a project's model-store folder.
MIRROR_FILE = "mirror.sqlite3"
#: The score of a prediction with nothing to place it by (no round yet, or a set-wise order).
NEUTRAL_SCORE = 0.5
#: What each paced step took in this worker's last round of a project: the next round expects as much.
_STEP_TIMES: dict[int, dict[str, float]] = {}


def live_datastore(settings: Settings, project_id: int, pacer: Pacer | None = None) -> LabelStudioDatastore:
    """The project's Label Studio (the environment's credentials or those /setup stored), read through the
    project's task mirror in the model store, so a round fetches only what changed. ``pacer``: the
    clean-up's calls wait for the annotators (each is expected to cost Label Studio what the longest one
    did in the project's last clean-up, or before any, what the round's write did)."""
    credentials = project_credentials(settings, project_id)
    mirror = TaskMirror.shared(ModelStore(settings.model_dir).project_dir(project_id) / MIRROR_FILE)
    client = LabelStudioClient.from_settings(credentials.url, credentials.api_key, settings)
    return LabelStudioDatastore(client, project_id, mirror, settings.full_resync_seconds,
                                FailedDownloads.for_project(settings, project_id),
                                make_room=settings.delete_old_predictions,
                                before_call=(lambda: pacer.wait("clean_up", pacer.took.get(
                                    "clean_up", pacer.took.get("write"))))
                                if pacer is not None else None)


def round_pacer(settings: Settings, project_id: int) -> Pacer | None:
    """The pacing of the running round job's calls around the project's annotators (see
    :mod:`isal_backend.pacing`); None outside a queue, or with ``ISAL_PACE_SETTLE_SECONDS=0``."""
    job = current_job()
    if settings.pace_settle_seconds <= 0 or job is None or job.activity is None:
        return None
    return Pacer(job.activity, settings.pace_settle_seconds, settings.pace_max_wait_seconds,
                 _STEP_TIMES.setdefault(int(project_id), {}))


def task_parts(settings: Settings, store: ModelStore, project_id: int) -> TaskParts:
    """The project's own folders; with RQ, a large first featurization is shared among the workers."""
    parts = TaskParts(settings, int(project_id), store.project_dir(project_id))
    if settings.redis_url is not None and settings.train_mode == "head":  # fine-tuned backbones change per round
        from isal_backend.jobs.shards import featurize_in_shards  # imports redis and rq: RQ mode only

        def sharder(references: list[str], featurize: Callable[[list[str]], Any]) -> dict[str, Any]:
            return featurize_in_shards(settings, parts.project_dir, references, featurize, int(project_id))

        parts.sharder = sharder
    return parts


def clean_up_policy(settings: Settings, datastore: LabelStudioDatastore) -> Callable[[str], dict[str, Any] | None]:
    """After a round: delete older rounds' predictions in calls of at most about 100 predictions each (one
    big delete holds SQLite's write lock for seconds, under annotators asking for their next task).

    When a newer round waits for this worker, the previous round's predictions are left to it (the
    sooner the next order is served, the better), but older ones go regardless: never more than two
    rounds' predictions pile up. Returns what was done, for the status report.
    """

    def clean_up(round_id: str) -> dict[str, Any] | None:
        if not settings.delete_old_predictions:
            return None
        job = current_job()
        stop = job.superseded if job is not None else None
        try:
            datastore.clean_up(round_id, stop=stop)
        except Exception as exc:  # noqa: BLE001 - the new order is already served; stale rows only cost space
            log.warning("project %s: deleting older rounds' predictions failed: %s", datastore.project_id, exc)
            return {"error": str(exc)[:300]}
        done = datastore.last_clean_up
        if done is not None and done.calls:  # what the next clean-up's calls are expected to hold Label Studio
            _STEP_TIMES.setdefault(int(datastore.project_id), {})["clean_up"] = done.longest_call_seconds
        if done is not None and done.stopped:
            log.info("project %s: a newer round waits; the previous round's predictions are left to it",
                     datastore.project_id)
        answer = done.as_dict() if done is not None else None
        if datastore.room_made is not None:  # what the write had to delete first (a cut-short clean-up's rest)
            answer = {**(answer or {}), "before_write": datastore.room_made.as_dict()}
        return answer

    return clean_up


def run_round(project_id: int) -> dict[str, Any]:
    """The queue's round job for the project, with the settings of the environment."""
    settings = Settings.from_env()
    store = ModelStore(settings.model_dir)
    pacer = round_pacer(settings, project_id)
    datastore = live_datastore(settings, project_id, pacer)
    job = current_job()
    report = Round(project_id, datastore, store, settings, task_parts(settings, store, project_id),
                   clean_up=clean_up_policy(settings, datastore), pacer=pacer,
                   superseded=job.superseded if job is not None else None).run()
    record_round(int(project_id), {k: v for k, v in report.items() if k not in BULKY}, settings)
    if report.get("features_pending") and job is not None:
        job.follow_up()  # the rest of a large import: the next round featurizes the next share
    return report


def place(keys: torch.Tensor | None, pool_keys: torch.Tensor | None) -> list[float]:
    """Where each key falls among the round's pool keys, in [0, 1] (most valuable lowest)."""
    if keys is None or pool_keys is None or pool_keys.numel() == 0:
        return [NEUTRAL_SCORE] * (0 if keys is None else len(keys))
    ranks = torch.searchsorted(pool_keys.double().contiguous(), keys.double().contiguous())
    return [round(float(r) / pool_keys.numel(), 6) for r in ranks]


def stored_predictions(task: Task, model: Any, tasks: Sequence[dict[str, Any]], images: ImageSource,
                       model_version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pre-labels and places of ``tasks`` under a stored round's model, and the tasks skipped (with why)."""
    inputs = task.features(Split(unlabeled=list(tasks)), images, model)
    view = task.view(model, inputs)
    strategy, _ = task.strategy(model.strategy or task.settings.strategy)
    try:
        keys = strategy.keys(view) if inputs.pool_size else None
    except SignalMissing:  # e.g. a cold-start round: nothing to place new tasks by
        keys = None
    scores = place(keys, model.pool_keys) if keys is not None else [NEUTRAL_SCORE] * inputs.pool_size
    results = task.prelabels(view, np.arange(inputs.pool_size))
    predictions = [{"task": task_id, "result": result, "score": score, "model_version": model_version}
                   for task_id, result, score in zip(inputs.pool_ids, results, scores, strict=True)]
    return predictions, inputs.skipped


def score_new_tasks(project_id: int, task_ids: list[int]) -> dict[str, Any]:
    """The queue's TASKS_CREATED job: the current round's predictions for the new tasks.

    Scored with the stored model and influence state, so new tasks join the stream in the current
    order without waiting for a retrain; with no round yet there is nothing to order against, and the
    next round covers them.
    """
    settings = Settings.from_env()
    store = ModelStore(settings.model_dir)
    stored = store.load(project_id)
    if stored is None:
        return {"project": project_id, "scored": 0, "reason": "no round yet"}
    datastore = live_datastore(settings, project_id)
    task = task_for(parse_project_config(datastore.label_config()), task_parts(settings, store, project_id))
    model = task.load(stored)
    if model is None:
        return {"project": project_id, "scored": 0, "reason": "the current round was made for another label config"}
    tasks = [t for t in datastore.tasks_by_id(task_ids) if not t.get("annotations")]
    predictions, skipped = stored_predictions(task, model, tasks, datastore.image, stored.round_id)
    created = datastore.add(predictions)
    task.committed(model)
    return {"project": project_id, "scored": created, "skipped": skipped, "round_id": stored.round_id}


def predict_tasks(project_id: int, tasks: list[dict[str, Any]], label_config: str,
                  settings: Settings | None = None) -> list[dict[str, Any]]:
    """``/predict``: one ``{"result", "score", "model_version"}`` per task, in the order given.

    Before any round (or under a round made for another config) the results are empty pre-labels with
    a neutral score, so Label Studio still gets one result per task. ``settings``: the server's own
    (default: the environment's).
    """
    settings = settings or Settings.from_env()
    store = ModelStore(settings.model_dir)
    config: LabelConfig = parse_project_config(label_config)
    stored = store.load(project_id)
    task = task_for(config, TaskParts(settings, int(project_id), store.project_dir(project_id)))
    model = task.load(stored) if stored is not None else None
    version = stored.round_id if stored is not None else "none"
    empty = {"result": [], "score": NEUTRAL_SCORE, "model_version": version}
    if model is None:
        return [dict(empty) for _ in tasks]
    datastore: list[LabelStudioDatastore] = []

    def image(reference: str) -> bytes:
        """Only asked for what is not a data URL: Label Studio's credentials are read on first need."""
        if not datastore:
            datastore.append(live_datastore(settings, project_id))
        return datastore[0].image(reference)

    predictions, _ = stored_predictions(task, model, tasks, image, version)
    by_task = {p["task"]: p for p in predictions}
    return [{k: by_task.get(t.get("id"), empty)[k] for k in ("result", "score", "model_version")} for t in tasks]


def featurize_shard(project_id: int, plan_id: str, index: int) -> dict[str, Any]:
    """RQ job: compute one shard of a project's first featurization, unless another worker has."""
    import redis

    from isal_backend.jobs.shards import ShardPlan, run_shard

    settings = Settings.from_env()
    store = ModelStore(settings.model_dir)
    plan = ShardPlan(settings, store.project_dir(project_id), plan_id, redis.Redis.from_url(settings.redis_url))
    if not (plan.folder / f"{index}.json").exists():
        return {"shard": index, "computed": False, "reason": "featurization already finished"}
    datastore = live_datastore(settings, project_id)
    featurizer = task_parts(settings, store, project_id).stock_featurizer()

    def load(reference: str):
        return decode_image(datastore.image(reference), reference)

    computed = run_shard(plan, index, lambda refs: featurizer.compute(refs, load))
    return {"shard": index, "computed": computed}
