"""Label Studio API client for the backend, built on label-studio-sdk 2.x.

The sdk handles both kinds of API key (a legacy token sent as ``Token <key>``, and a personal access token,
a refresh JWT exchanged for short-lived access tokens).  This module adds what the backend needs on top:
retries with exponential backoff that end in one clear LabelStudioUnavailable, checks that bulk writes were
not silently truncated, image downloads that send credentials to the LS host only (SSRF-safe and bounded by a
total deadline, see fetch.py; optionally remembering failures, see failures.py), and errors that never
contain the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from isal_backend.labelstudio.failures import FailedDownloads
from isal_backend.labelstudio.fetch import DownloadPolicy, FetchRefused, Resolver, deadline, deadline_left, image_client
from isal_backend.labelstudio.images import safe_source
from isal_backend.logs import redact_text

if TYPE_CHECKING:
    from isal_backend.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
#: The most predictions one clean-up call deletes. Label Studio deletes in one transaction, holding SQLite's
#: write lock throughout (measured on 1.23.2, 2 cores: 100 predictions 1.0-1.3 s, 1,000 13-16 s, and /next
#: answered 500 "database is locked" during the latter).
DELETE_BATCH = 100
#: Seconds between two clean-up calls when no pacer is given. Back to back, they starve Label Studio's own
#: writers (SQLite has no queue: a /next waiting for the lock retries with growing sleeps and loses it to the
#: next delete each time; measured: /next blocked up to 13 s, or 500, while no single call took over 0.8 s).
DELETE_PAUSE_S = 0.3
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


class LabelStudioError(RuntimeError):
    """Base of every error this client raises; messages never contain the API key."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio could not be reached (connection error, timeout or 5xx) even after retries."""


class LabelStudioAPIError(LabelStudioError):
    """Label Studio answered with a 4xx: the request itself is wrong (bad key, unknown project, invalid data)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LabelStudioAuthError(LabelStudioAPIError):
    """Label Studio answered 401 or 403: the key is wrong, expired, of a disabled kind, or lacks permission.

    Not transient: repeating the request cannot help, so queue jobs that raise it fail at once, without
    retries (``retryable``), and the message says what to fix.
    """

    retryable = False


class PredictionsDropped(LabelStudioError):
    """LS answered 201 but created fewer predictions than sent (it silently drops invalid items)."""

    def __init__(self, message: str, expected: int, created: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.created = created


class DownloadError(LabelStudioError):
    """A task's image reference could not be fetched (bad reference, third-party host error, too large)."""


@dataclass
class CleanUpReport:
    """What :meth:`LabelStudioClient.delete_old_predictions` did: predictions deleted, calls made (the listing
    of a large version's predictions included), the longest call (how long Label Studio's database was held at
    most), and whether it stopped before the end."""

    deleted: int = 0
    calls: int = 0
    seconds: float = 0.0
    longest_call_seconds: float = 0.0
    stopped: bool = False

    def timed(self, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            took = time.perf_counter() - start
            self.calls += 1
            self.seconds = round(self.seconds + took, 4)
            self.longest_call_seconds = round(max(self.longest_call_seconds, took), 4)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pause_between(seconds: float = DELETE_PAUSE_S) -> Callable[[], None]:
    """A ``before_call`` for :meth:`LabelStudioClient.delete_old_predictions` that sleeps ``seconds`` before
    every call but the first, so that Label Studio's own writes get the database in between."""
    calls = 0

    def wait() -> None:
        nonlocal calls
        if calls and seconds > 0:
            time.sleep(seconds)
        calls += 1

    return wait


@dataclass(frozen=True)
class _Retry:
    retries: int
    backoff: float

    def delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt)


class LabelStudioClient:
    """The backend's view of one Label Studio server.  Thread-safe for concurrent calls (httpx client)."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 trusted_origins: Iterable[str] = (), max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, *,
                 download_policy: DownloadPolicy | None = None, resolver: Resolver | None = None) -> None:
        """`trusted_origins`: other origins that ARE this LS (e.g. the `hostname` LS sends to /setup when it
        differs from `url`); LS credentials are sent to those and to `url` only, never to third parties.

        `download_policy`: SSRF protection, allowlist and total deadline of image downloads; the default is
        protection on, nothing allowlisted, 30 s (:meth:`from_settings` reads them from the environment).
        `resolver`: host name -> addresses for the SSRF check (tests inject one; default getaddrinfo)."""
        if not url or not urlsplit(url).scheme.startswith("http"):
            raise ValueError(f"Label Studio url must be http(s)://host[:port], got {safe_source(url or '')!r}")
        if not api_key or not api_key.strip():
            raise ValueError("Label Studio API key is empty")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._retry = _Retry(max(0, retries), max(0.0, backoff))
        self._api_key = api_key.strip()
        self._origins = {_origin(self.url)} | {_origin(o) for o in trusted_origins if o}
        self._max_download_bytes = max_download_bytes
        # The sdk's own retries are off: ours (below) decide what is safe to retry and end in one clear error.
        try:
            self._sdk = LabelStudio(base_url=self.url, api_key=self._api_key, timeout=timeout, max_retries=0)
        except ApiError as exc:  # the sdk checks a JWT key's expiry up front
            raise LabelStudioAuthError(f"Label Studio API key refused: {_body_text(exc.body)}. {AUTH_FIX}",
                                       exc.status_code) from None
        self._policy = download_policy or DownloadPolicy()
        # One client for every image: LS's own origins connect unvetted (like LS's trusted origins), every other
        # host and every redirect hop is vetted at connect time; httpx drops Authorization on cross-origin hops.
        exempt = [(host, port) for _, host, port in self._origins]
        self._images_http = image_client(self._policy, exempt, timeout=timeout,
                                         **({"resolver": resolver} if resolver else {}))

    @classmethod
    def from_settings(cls, url: str, api_key: str, settings: Settings, **kwargs: Any) -> LabelStudioClient:
        """A client whose image downloads follow ISAL_SSRF_PROTECTION, ISAL_IMAGE_HOSTS_ALLOWED and
        ISAL_DOWNLOAD_DEADLINE_SECONDS; `kwargs` go to the constructor (timeout, retries, trusted_origins...)."""
        return cls(url, api_key, download_policy=DownloadPolicy.from_settings(settings), **kwargs)

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r})"

    @property
    def download_policy(self) -> DownloadPolicy:
        return self._policy

    def close(self) -> None:
        self._images_http.close()
        self._raw_http().close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- projects, tasks, predictions

    def get_project(self, project_id: int) -> dict[str, Any]:
        """The project as LS returns it (label_config, model_version, sampling, ...)."""
        return self._call(f"get project {project_id}",
                          lambda: self._sdk.projects.get(id=project_id).model_dump(mode="json"))

    def list_tasks(self, project_id: int, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every task as {"id", "data", "annotations": [...full annotations, cancelled ones included]}.

        Two lean requests instead of /api/tasks?fields=all (which computes every Data Manager column): the task
        list with include=id,data, then the JSON export of the annotated tasks only.  Measured on 10,000 tasks
        with 3,000 annotated: ~10 s, against ~16 s for exporting all tasks and ~30 s for fields=all.
        """
        tasks: dict[int, dict[str, Any]] = {}
        page = 1
        while True:
            body = self._json("GET", "api/tasks", f"list tasks of project {project_id}",
                              params={"project": project_id, "page": page, "page_size": page_size,
                                      "include": "id,data"})
            rows = body.get("tasks") or []
            for row in rows:
                tasks[row["id"]] = {"id": row["id"], "data": row.get("data") or {}, "annotations": []}
            if not rows or len(tasks) >= int(body.get("total") or 0):
                break
            page += 1
        for row in self._export_annotated(project_id):
            task = tasks.setdefault(row["id"], {"id": row["id"], "data": row.get("data") or {}, "annotations": []})
            task["annotations"] = list(row.get("annotations") or [])
        return [tasks[k] for k in sorted(tasks)]

    def _export_annotated(self, project_id: int) -> list[dict[str, Any]]:
        def fetch() -> list[dict[str, Any]]:
            data = b"".join(self._sdk.projects.exports.download_sync(
                project_id, download_all_tasks=False, export_type="JSON",
                request_options={"timeout": max(self.timeout, 300.0)}))
            return json.loads(data) if data else []

        return self._call(f"export annotated tasks of project {project_id}", fetch)

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]],
                           chunk_size: int = 1000) -> int:
        """Create `predictions` in bulk; return how many were created.

        Each item is {"task", "model_version", "score", "result"}.  Items are checked here first because LS
        drops invalid ones silently (still answering 201); a smaller `created` count raises PredictionsDropped.
        Only connection failures are retried: a retried POST that had reached LS would create duplicates.
        """
        items = [dict(p) for p in predictions]
        for i, item in enumerate(items):
            _check_prediction(i, item)
        created_total = 0
        for start in range(0, len(items), max(1, chunk_size)):
            chunk = items[start:start + chunk_size]
            response = self._call(
                f"import {len(chunk)} predictions into project {project_id}",
                lambda chunk=chunk: self._sdk.projects.import_predictions(project_id, request=chunk),
                idempotent=False)
            created = int(getattr(response, "created", None) or 0)
            created_total += created
            if created != len(chunk):
                raise PredictionsDropped(
                    f"Label Studio created {created} of {len(chunk)} predictions (items {start}..{start + len(chunk)-1}"
                    f" of {len(items)}; {created_total} created in total) in project {project_id}: it silently "
                    "drops items whose result does not match the label config or whose score is outside [0, 1]",
                    expected=len(items), created=created_total)
        return created_total

    def set_ordering(self, project_id: int, model_version: str) -> dict[str, Any]:
        """Serve tasks by ascending score of `model_version`'s predictions ("Uncertainty sampling").

        Set on every round: the UI cannot re-select Uncertainty sampling (Enterprise badge) once someone
        switches away, and LS answers 400 unless predictions of `model_version` exist.
        """
        if not model_version:
            raise ValueError("model_version must be a non-empty string")
        project = self._call(
            f"set ordering of project {project_id} to model version {model_version!r}",
            lambda: self._sdk.projects.update(id=project_id, sampling=UNCERTAINTY_SAMPLING,
                                              model_version=model_version))
        return project.model_dump(mode="json")

    def model_versions(self, project_id: int) -> dict[str, int]:
        """{model_version: number of predictions} of the project."""
        body = self._json("GET", f"api/projects/{project_id}/model-versions",
                          f"list model versions of project {project_id}")
        return {str(k): int(v) for k, v in body.items()}

    def delete_predictions(self, project_id: int, except_version: str, prefix: str | None = None) -> int:
        """Delete the predictions of every model version but `except_version` (only those starting with
        `prefix`, when given, so other sources' predictions survive); return how many were deleted.

        One DELETE /api/projects/{id}/model-versions/ per version: a single bulk delete in LS, as fast as the
        Data Manager action delete_tasks_predictions (~5-8 s per 1,000 predictions on a 2-core machine), and
        unlike that action it keeps the current version's predictions on the same tasks.  Refuses when
        `except_version` has no predictions, since deleting the rest would leave the stream unordered.
        """
        versions = self.model_versions(project_id)
        if except_version not in versions:
            raise LabelStudioError(f"refusing to delete predictions of project {project_id}: the version to keep, "
                                   f"{except_version!r}, has no predictions (versions: {sorted(versions)})")
        deleted = 0
        for version in versions:
            if version == except_version or (prefix is not None and not version.startswith(prefix)):
                continue
            body = self._json("DELETE", f"api/projects/{project_id}/model-versions/",
                              f"delete predictions of model version {version!r} in project {project_id}",
                              json_body={"model_version": version})
            deleted += int(body.get("deleted_predictions") or 0)
        return deleted

    def delete_old_predictions(self, project_id: int, keep: str, spare: Collection[str] = (),
                               batch: int = DELETE_BATCH, stop: Callable[[], bool] | None = None,
                               versions: Mapping[str, int] | None = None,
                               before_call: Callable[[], Any] | None = None) -> CleanUpReport:
        """Delete the predictions of every model version but ``keep`` and ``spare``, oldest version first, in
        calls that each delete at most about ``batch`` predictions, so Label Studio's database is never held
        for long; ``stop`` is asked before each call (True: leave the rest for later).

        A version of at most ``batch`` predictions goes in one ``DELETE /api/projects/<id>/model-versions/``.
        A larger one (new tasks scored into the current round make a version grow) goes by tasks: the Data
        Manager action ``delete_tasks_predictions`` on up to ``batch`` tasks that hold no prediction to keep
        (it deletes every prediction of a task), then ``DELETE /api/predictions/<id>/`` for its predictions on
        tasks that do (one call each, about 0.1 s, 10x slower per prediction). ``before_call`` is called before
        each call, so Label Studio's own writes (an annotator's /next) get the database in between: the worker
        passes its pacer, which waits until the annotators' last submit has settled; by default
        :func:`pause_between` (:data:`DELETE_PAUSE_S`). Refuses when
        ``keep`` has no predictions, since deleting the rest would leave the stream unordered. ``versions``:
        :meth:`model_versions` as the caller just read it (each read is a query over the project's
        predictions, and a round's clean-up would otherwise make three).
        """
        versions = dict(versions) if versions is not None else self.model_versions(project_id)
        if keep not in versions:
            raise LabelStudioError(f"refusing to delete predictions of project {project_id}: the version to keep, "
                                   f"{keep!r}, has no predictions (versions: {sorted(versions)})")
        kept = {keep, *spare}
        before_call = before_call if before_call is not None else pause_between()
        report = CleanUpReport()
        listed: list[dict[str, Any]] | None = None
        for version in sorted(v for v in versions if v not in kept):
            if versions[version] <= batch:
                before_call()  # first: a newer round may come to wait meanwhile
            if stop is not None and stop():
                report.stopped = True
                break
            if versions[version] <= batch:
                body = report.timed(lambda v=version: self._json(
                    "DELETE", f"api/projects/{project_id}/model-versions/",
                    f"delete predictions of model version {v!r} in project {project_id}",
                    json_body={"model_version": v}))
                report.deleted += int(body.get("deleted_predictions") or 0) if isinstance(body, dict) else 0
                continue
            if listed is None:
                before_call()
                listed = report.timed(lambda: self._json(
                    "GET", "api/predictions/", f"list the predictions of project {project_id}",
                    params={"project": project_id}))
            if not self._delete_version_by_tasks(project_id, version, kept, listed, batch, stop, report,
                                                 before_call):
                report.stopped = True
                break
        return report

    def _delete_version_by_tasks(self, project_id: int, version: str, kept: set[str], listed: list[dict[str, Any]],
                                 batch: int, stop: Callable[[], bool] | None, report: CleanUpReport,
                                 before_call: Callable[[], Any]) -> bool:
        """One large version, ``batch`` at a time (see :meth:`delete_old_predictions`); False when stopped."""
        ours = [p for p in listed if isinstance(p, dict) and p.get("model_version") == version]
        holding = {p.get("task") for p in listed if isinstance(p, dict) and p.get("model_version") in kept}
        free = sorted({int(p["task"]) for p in ours if p.get("task") not in holding})
        for start in range(0, len(free), max(1, batch)):
            before_call()
            if stop is not None and stop():
                return False
            chunk = free[start:start + batch]
            body = report.timed(lambda chunk=chunk: self._json(
                "POST", "api/dm/actions", f"delete the predictions of {len(chunk)} tasks in project {project_id}",
                params={"id": "delete_tasks_predictions", "project": project_id},
                json_body={"project": project_id, "selectedItems": {"all": False, "included": chunk}},
                idempotent=True))
            report.deleted += int(body.get("processed_items") or 0) if isinstance(body, dict) else 0
        shared = [int(p["id"]) for p in ours if p.get("task") in holding]
        for i, prediction_id in enumerate(shared):
            before_call()
            if i % max(1, batch) == 0 and stop is not None and stop():
                return False
            try:
                report.timed(lambda pid=prediction_id: self._json(
                    "DELETE", f"api/predictions/{pid}/", f"delete prediction {pid} of project {project_id}"))
            except LabelStudioAPIError as exc:
                if exc.status_code != 404:  # already gone: what a retried DELETE finds
                    raise
            report.deleted += 1
        return True

    def verify_project_access(self, project_id: int) -> dict[str, Any]:
        """Prove that this server is a Label Studio that accepts the key for ``project_id``; return the project.

        One GET of the project (a personal access token is exchanged first, by the sdk). Raises
        LabelStudioAuthError (401/403), LabelStudioAPIError (another 4xx, or an answer that is not this
        project) or LabelStudioUnavailable; never returns for a server that did not answer as Label Studio.
        """
        try:
            project = self._json("GET", f"api/projects/{int(project_id)}/", f"read project {project_id}")
        except ValueError:  # not JSON: whatever answered is not Label Studio's API
            raise LabelStudioAPIError(f"{self.url} did not answer as Label Studio (not JSON) for project "
                                      f"{project_id}") from None
        if not isinstance(project, dict) or project.get("id") != int(project_id):
            raise LabelStudioAPIError(f"{self.url} did not answer with project {project_id}")
        return project

    def list_ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The ML backends connected to the project (url, auth_method, basic_auth_user; never the password)."""
        body = self._json("GET", "api/ml/", f"list ML backends of project {project_id}", params={"project": project_id})
        return [b for b in body if isinstance(b, dict)] if isinstance(body, list) else []

    def list_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        """The project's webhooks (url, headers, ...)."""
        body = self._json("GET", "api/webhooks/", f"list webhooks of project {project_id}",
                          params={"project": project_id})
        return [w for w in body if isinstance(w, dict)] if isinstance(body, list) else []

    def set_webhook_headers(self, webhook_id: int, headers: Mapping[str, str]) -> dict[str, Any]:
        """Replace a webhook's extra request headers (Label Studio sends them with every event)."""
        return self._json("PATCH", f"api/webhooks/{int(webhook_id)}/", f"update webhook {webhook_id}",
                          json_body={"headers": dict(headers)})

    def newest_annotation_update(self, project_id: int) -> str | None:
        """When an annotation of the project last changed (ISO-8601), or None when no task is annotated.

        One Data Manager page of one task: tasks with an annotation, newest ``updated_at`` first (Label Studio
        bumps a task's ``updated_at`` on every annotation save and delete). Measured on 2,000 tasks: 50-75 ms,
        like a GET of the project. Predictions bump it too, but rounds write predictions to unlabeled tasks only,
        which this filter leaves out. A task whose last annotation was deleted drops out of it as well.
        """
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]},
            "ordering": ["-tasks:updated_at"]}
        body = self._json("GET", "api/tasks/", f"read the newest annotated task of project {project_id}",
                          params={"project": project_id, "page_size": 1, "include": "id,updated_at",
                                  "query": json.dumps(query)})
        rows = body.get("tasks") if isinstance(body, dict) else None
        if not rows or not isinstance(rows[0], dict) or not isinstance(rows[0].get("updated_at"), str):
            return None
        return rows[0]["updated_at"]

    # ---------------------------------------------------------------- what changed (the task mirror's queries)

    def _task_pages(self, project_id: int, what: str, params: Mapping[str, Any],
                    page_size: int = 1000) -> list[dict[str, Any]]:
        """Every row of a (Data Manager) task query, page by page."""
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self._json("GET", "api/tasks/", what,
                              params={"project": project_id, "page": page, "page_size": page_size, **params})
            batch = body.get("tasks") if isinstance(body, dict) else None
            rows += batch or []
            if not batch or len(rows) >= int(body.get("total") or 0):
                return rows
            page += 1

    def newest_task_update(self, project_id: int) -> str | None:
        """The newest ``updated_at`` of any task of the project (one row), or None for an empty project."""
        query = {"ordering": ["-tasks:updated_at"]}
        body = self._json("GET", "api/tasks/", f"read the newest task change of project {project_id}",
                          params={"project": project_id, "page_size": 1, "include": "id,updated_at",
                                  "query": json.dumps(query)})
        rows = body.get("tasks") if isinstance(body, dict) else None
        return rows[0].get("updated_at") if rows and isinstance(rows[0], dict) else None

    def tasks_updated_since(self, project_id: int, since: str) -> list[dict[str, Any]]:
        """Tasks whose ``updated_at`` is after ``since`` (Label Studio's ``%Y-%m-%dT%H:%M:%S.%fZ``), oldest first.

        Label Studio bumps a task's ``updated_at`` when one of its annotations is saved, updated, skipped or
        deleted and when it is imported; predictions do not (measured on 1.23.2). Lean rows: id, data,
        updated_at and the annotation counts.
        """
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": since}]},
            "ordering": ["tasks:updated_at"]}
        return self._task_pages(project_id, f"list the changed tasks of project {project_id}",
                                {"include": "id,data,updated_at,total_annotations,cancelled_annotations",
                                 "query": json.dumps(query)})

    def tasks_with_annotations(self, project_id: int, task_ids: Sequence[int], chunk: int = 100
                               ) -> list[dict[str, Any]]:
        """The given tasks with all their annotations, cancelled ones included (100 a request)."""
        out: list[dict[str, Any]] = []
        ids = [int(i) for i in task_ids]
        for start in range(0, len(ids), chunk):
            query = {"selectedItems": {"all": False, "included": ids[start : start + chunk]}}
            out += self._task_pages(project_id, f"read {len(ids[start:start + chunk])} tasks of project {project_id}",
                                    {"fields": "all", "query": json.dumps(query)}, page_size=chunk)
        return out

    def task_ids(self, project_id: int) -> list[int]:
        """Every task id of the project."""
        return sorted(int(r["id"]) for r in self._task_pages(project_id, f"list the task ids of project {project_id}",
                                                              {"include": "id"}, page_size=5000))

    # ---------------------------------------------------------------- images

    def download(self, url_or_path: str, failures: FailedDownloads | None = None) -> bytes:
        """Bytes of a task's image reference.

        Supported: LS uploads (/data/upload/...), local-files storage (/data/local-files/?d=...), absolute
        http(s) URLs and data: URLs.  LS credentials go to this LS (its url and trusted_origins) only; any other
        host must resolve to public addresses only (see fetch.py), and the whole download, retries included,
        ends within the policy's deadline.  With `failures`, a URL whose download failed (DownloadError) within
        its TTL is not fetched again: the remembered error is raised at once; a new failure is remembered.  The
        memory is keyed by the reference as given (one memory per project, so per Label Studio), which lets the
        round code also ``failures.record(reference, reason)`` an image that downloaded but did not decode.
        """
        ref = (url_or_path or "").strip()
        where = safe_source(ref)
        if not ref:
            raise DownloadError("empty image reference")
        if ref.startswith("data:"):
            return _decode_data_url(ref, where)
        url = self.url + ref if ref.startswith("/") else ref
        if not ref.startswith("/"):
            parts = urlsplit(ref)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DownloadError(f"unsupported image reference {where}: expected /data/upload/..., "
                                    "/data/local-files/?d=..., http(s):// or data: (cloud storage URIs such as "
                                    "s3:// must be resolved by Label Studio)")
        if failures is not None:
            failure = failures.get(ref)
            if failure is not None:
                age = failure.age(failures.now())
                raise DownloadError(f"{failure.reason} (remembered from {age:.0f} s ago: not fetched again until "
                                    f"{failures.retry_seconds:g} s have passed, ISAL_FAILED_IMAGE_RETRY_SECONDS)")
        try:
            return self._fetch(url, where)
        except DownloadError as exc:
            if failures is not None:
                failures.record(ref, str(exc))
            raise

    def _fetch(self, url: str, where: str) -> bytes:
        ours = _origin(url) in self._origins
        seconds = self._policy.deadline_seconds
        with deadline(seconds):
            try:
                return self._call(f"download {where}", lambda: self._stream(url, ours, where), third_party=not ours,
                                  deadline_seconds=seconds)
            except FetchRefused as exc:
                raise DownloadError(f"image {where} refused: {exc}") from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # not a transport error: too many redirects, bad URL
                raise DownloadError(self._scrub(f"image {where} could not be downloaded: {type(exc).__name__}: "
                                                f"{redact_text(str(exc))[:300]}")) from None

    def _stream(self, url: str, ours: bool, where: str) -> bytes:
        headers = self._auth_headers() if ours else {}
        with self._images_http.stream("GET", url, headers=headers) as response:
            if response.status_code >= 400:
                body = _head(response, 4096)
                # LS itself (after any redirects), or a transient third-party failure
                if _origin(str(response.url)) in self._origins or response.status_code >= 500:
                    _raise_for_status(response.status_code, body, f"download {where}")
                raise DownloadError(f"image {where} could not be downloaded: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self._max_download_bytes:
                raise DownloadError(f"image {where} is {declared} bytes, over the {self._max_download_bytes} limit")
            buf = bytearray()
            for chunk in response.iter_bytes():
                buf.extend(chunk)
                if len(buf) > self._max_download_bytes:
                    raise DownloadError(f"image {where} is over the {self._max_download_bytes} byte limit")
            return bytes(buf)

    # ---------------------------------------------------------------- plumbing

    # The ONE place that goes below the sdk: endpoints it lacks (model-versions, lean task pages) and downloads
    # use the sdk's own httpx client and auth headers (which refresh the access token of a personal access token).
    def _raw_http(self) -> httpx.Client:
        return self._sdk._client_wrapper.httpx_client.httpx_client

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": self._sdk._client_wrapper.get_headers()["Authorization"]}

    def _json(self, method: str, path: str, what: str, params: Mapping[str, Any] | None = None,
              json_body: Any = None, idempotent: bool | None = None) -> Any:
        def send() -> Any:
            response = self._raw_http().request(method, f"{self.url}/{path.lstrip('/')}", params=params,
                                                json=json_body, headers=self._auth_headers())
            if response.status_code >= 400:
                _raise_for_status(response.status_code, response.text, what)
            return response.json() if response.content else {}

        if idempotent is None:
            idempotent = method in ("GET", "DELETE", "PATCH", "PUT")
        return self._call(what, send, idempotent=idempotent)

    def _call(self, what: str, fn: Callable[[], T], idempotent: bool = True, third_party: bool = False,
              deadline_seconds: float | None = None) -> T:
        """Run `fn`, retrying transient failures with exponential backoff; translate every failure into a
        LabelStudioError whose message is scrubbed of the key (and raised `from None`, so no sdk error with
        headers or bodies hangs off it).

        `third_party` (an image from another host): at most ONE retry, and only when no response arrived
        (connection refused, 5xx): a timed-out or cut-off body is not fetched again, since each try may cost the
        whole deadline and 64 MiB and the failure memory retries it in a later round.  Inside a
        :func:`fetch.deadline`, no retry starts once the deadline has passed or its backoff would pass it."""
        attempts = (min(self._retry.retries, 1) if third_party else self._retry.retries) + 1
        last = ""
        retry = False
        timed_out = False
        made = 0
        for attempt in range(attempts):
            made = attempt + 1
            start = time.perf_counter()
            try:
                answer = fn()
                if not third_party:  # how long each call held Label Studio, to set beside annotators' requests
                    log.debug("Label Studio: %s took %.3f s", what, time.perf_counter() - start)
                return answer
            except ApiError as exc:
                status = exc.status_code or 0
                if status < 500:
                    kind = LabelStudioAuthError if status in (401, 403) else LabelStudioAPIError
                    raise kind(self._scrub(_status_message(status, _body_text(exc.body), what)), status) from None
                last = f"HTTP {status}: {_body_text(exc.body)}"
                retry = idempotent
            except _TransientStatus as exc:
                last, retry = str(exc), idempotent
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last, retry = f"{type(exc).__name__}: {exc}", True  # the request never reached LS
            except httpx.TransportError as exc:
                last, retry = f"{type(exc).__name__}: {exc}", idempotent and not third_party
            left = deadline_left()
            if left is not None and left <= 0:
                timed_out = True
                break
            if not retry or attempt == attempts - 1:
                break
            delay = self._retry.delay(attempt)
            if left is not None and delay >= left:
                break
            log.warning("%s: %s failed (%s); retry %d/%d in %.1f s",
                        "third-party image" if third_party else f"Label Studio {self.url}", what,
                        self._scrub(last)[:200], attempt + 1, attempts - 1, delay)
            time.sleep(delay)
        if timed_out:
            tried = (f"did not finish within the {deadline_seconds or 0:g} s download deadline "
                     f"(ISAL_DOWNLOAD_DEADLINE_SECONDS; {made} attempt{'s' if made > 1 else ''})")
        elif retry:
            tried = f"failed after {made} attempt{'s' if made > 1 else ''}"
        elif third_party:
            tried = "failed (not retried: of a third-party image only a failed connection or a 5xx is retried)"
        else:
            tried = "failed (not retried: repeating it is not safe)"
        if third_party:
            raise DownloadError(self._scrub(f"{what} {tried}; last error: {last[:300]}")) from None
        raise LabelStudioUnavailable(self._scrub(f"Label Studio at {self.url} is unavailable: {what} {tried};"
                                                 f" last error: {last[:300]}")) from None

    def _scrub(self, text: str) -> str:
        secrets = {self._api_key}
        access = getattr(self._sdk._client_wrapper._tokens_client, "_access_token", None)
        if access:
            secrets.add(access)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text


class _TransientStatus(Exception):
    """A 5xx from a raw request: retried like a connection error."""


def _raise_for_status(status: int, body: str, what: str) -> None:
    if status >= 500:
        raise _TransientStatus(f"HTTP {status}: {body[:300]}")
    raise ApiError(status_code=status, body=body)


AUTH_FIX = ("Fix: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to a working key (a personal access token, or a "
            "legacy token where the organization enables them), or reconnect the backend to the project in Label "
            "Studio so that /setup stores a token it accepts; retrying cannot help")


def _status_message(status: int, body: str, what: str) -> str:
    hint = {401: " (authentication failed: the key is wrong or expired, or a legacy token where the organization "
                 "disables them)",
            403: " (the key's user lacks permission for this)", 404: " (not found)"}.get(status, "")
    fix = f". {AUTH_FIX}" if status in (401, 403) else ""
    return f"Label Studio refused to {what}: HTTP {status}{hint}: {body[:300]}{fix}"


def _head(response: httpx.Response, limit: int) -> str:
    """The first `limit` bytes of an error body as text: enough for the message, never a huge body in memory."""
    buf = bytearray()
    for chunk in response.iter_bytes():
        buf.extend(chunk)
        if len(buf) >= limit:
            break
    return bytes(buf[:limit]).decode(response.encoding or "utf-8", "replace")


def _body_text(body: Any) -> str:
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        try:
            body = json.dumps(body)
        except (TypeError, ValueError):
            body = repr(body)
    return body.replace("\n", " ")[:300]


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _check_prediction(index: int, item: Mapping[str, Any]) -> None:
    task = item.get("task")
    if not isinstance(task, int) or isinstance(task, bool):
        raise ValueError(f"prediction {index}: 'task' must be a task id (int), got {task!r}")
    version = item.get("model_version")
    if not isinstance(version, str) or not version:
        raise ValueError(f"prediction {index}: 'model_version' must be a non-empty string, got {version!r}")
    score = item.get("score")
    if score is not None and (not isinstance(score, int | float) or isinstance(score, bool)
                              or not math.isfinite(score) or not 0.0 <= score <= 1.0):
        raise ValueError(f"prediction {index}: 'score' must be within [0, 1] (LS drops others silently), "
                         f"got {score!r}")
    if not isinstance(item.get("result"), list):
        raise ValueError(f"prediction {index}: 'result' must be a list (may be empty)")


def decode_data_url(ref: str) -> bytes:
    """The bytes of a ``data:`` URL (what a task holds when its image was imported inline)."""
    return _decode_data_url(ref, safe_source(ref))


def _decode_data_url(ref: str, where: str) -> bytes:
    header, sep, payload = ref[5:].partition(",")
    if not sep:
        raise DownloadError(f"malformed data URL {where}: no ',' separator")
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise DownloadError(f"malformed data URL {where}: {exc}") from None


__all__ = [
    "CleanUpReport",
    "DownloadError",
    "LabelStudioAPIError",
    "LabelStudioAuthError",
    "LabelStudioClient",
    "LabelStudioError",
    "LabelStudioUnavailable",
    "PredictionsDropped",
    "UNCERTAINTY_SAMPLING",
]
