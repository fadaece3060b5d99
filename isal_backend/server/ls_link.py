"""What /setup does with Label Studio itself: verify the credentials it carries, and give the webhook basic auth.

**Credentials.** Without LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY, a project's jobs use the ``hostname`` and
``access_token`` that /setup received. Anyone who can reach /setup can send those, so they are stored
(``credentials.json``, 0600) only once Label Studio accepts them for that project: a GET of the project
with that token at that host (legacy tokens and personal access tokens alike, through
:class:`~isal_backend.labelstudio.client.LabelStudioClient`). A project already connected to one Label
Studio keeps it: credentials naming another host are taken only if the stored host accepts the new token
too. Label Studio calls /setup synchronously inside ``POST /api/ml`` (3 s timeout); the Community server is
multi-threaded and answers the verification meanwhile (measured: 40 ms for a legacy token, 140 ms for a
personal access token), so /setup waits for it up to :data:`SYNC_VERIFY_S` and answers 403/400 when
Label Studio refuses. A verification still running then (a Label Studio that serves one request at a
time, or a slow one) goes on in the background, /setup answers 200 with ``"credentials": "verifying"``,
and the outcome is logged; nothing is stored unless Label Studio accepts it.

**Webhook auth.** Label Studio creates the backend's webhook (``<ml url>/webhook``) after /setup returns,
with no headers, so with BASIC_AUTH_USER/PASS set every event would get 401. After /setup, a background
step finds the webhooks of the project that point at this backend (the ML backends whose URL is the
host /setup was called at, with basic auth as our user) and sets their ``Authorization`` header
(``PATCH /api/webhooks/<id>``), polling for up to :data:`WEBHOOK_WAIT_S` until Label Studio has created it.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from isal_backend.labelstudio.client import (
    LabelStudioAPIError,
    LabelStudioAuthError,
    LabelStudioClient,
    LabelStudioError,
    LabelStudioUnavailable,
)
from isal_backend.settings import (
    LabelStudioCredentials,
    Settings,
    SettingsError,
    project_credentials,
    save_project_credentials,
    stored_project_credentials,
)

logger = logging.getLogger(__name__)
SYNC_VERIFY_S = 2.0  # Label Studio gives /setup 3 s (ML_TIMEOUT_SETUP)
VERIFY_TIMEOUT_S = 10.0  # a verification /setup stopped waiting for may finish in the background
WEBHOOK_WAIT_S = 60.0
WEBHOOK_POLL_S = 1.0
WEBHOOK_RECHECK_S = 600.0
MAX_TOKEN_CHARS = 4096
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what a header value may carry


class SetupRefused(Exception):
    """/setup's credentials cannot be used; ``status`` and message go back to the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SetupCredentials:
    """How /setup's credentials ended: ``state`` is environment, stored, verified or verifying."""

    state: str
    message: str


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _netloc(host: str) -> tuple[str, int | None]:
    """``"Host:port"`` -> (host, port or None); default ports are dropped so they compare equal to none."""
    parts = urlsplit(f"//{host}")
    port = parts.port if parts.port not in (80, 443) else None
    return (parts.hostname or "").lower(), port


def check_setup_credentials(hostname: Any, token: Any) -> tuple[str, str]:
    """/setup's ``hostname`` and ``access_token`` as (base URL, token); SetupRefused(400) naming what is wrong."""
    if not isinstance(hostname, str) or not hostname or not isinstance(token, str) or not token:
        raise SetupRefused(400, "/setup carried no 'hostname' and 'access_token' and LABEL_STUDIO_URL / "
                                "LABEL_STUDIO_API_KEY are not set: the backend has no way to reach Label Studio")
    parts = urlsplit(hostname)
    if (len(hostname) > 2048 or parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or parts.username is not None or parts.query or parts.fragment):
        raise SetupRefused(400, f"'hostname' must be Label Studio's http(s) base URL without user info, query or "
                                f"fragment, got {hostname[:100]!r}")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise SetupRefused(400, f"'hostname' has an invalid port: {hostname[:100]!r}") from None
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
        raise SetupRefused(400, "'access_token' must be a token of printable ASCII characters without spaces, "
                                f"at most {MAX_TOKEN_CHARS} long")
    return hostname.rstrip("/"), token


def _verify(url: str, token: str, project_id: int) -> None:
    """Raise SetupRefused unless the Label Studio at ``url`` accepts ``token`` for ``project_id``."""
    try:
        with LabelStudioClient(url, token, timeout=VERIFY_TIMEOUT_S, retries=0) as client:
            client.verify_project_access(project_id)
    except LabelStudioAuthError as exc:
        raise SetupRefused(403, f"Label Studio at {url} refused the access token for project {project_id} "
                                f"(HTTP {exc.status_code}): nothing stored. If the organization disables legacy "
                                "tokens, set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access "
                                "token) instead") from None
    except LabelStudioAPIError as exc:
        # Never the answer's body: /setup is open to anyone without basic auth, and must not become a way to
        # read what some internal host answers.
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        raise SetupRefused(400, f"{url} did not confirm project {project_id} with this token{status}") from None
    except LabelStudioUnavailable:
        raise SetupRefused(400, f"cannot reach Label Studio at {url} to verify the access token for project "
                                f"{project_id} (connection failed, timed out or answered 5xx). Set Label Studio's "
                                "HOST to an address this backend reaches, or set LABEL_STUDIO_URL and "
                                "LABEL_STUDIO_API_KEY") from None
    except (LabelStudioError, ValueError):
        raise SetupRefused(400, f"cannot verify the access token with {url}") from None


class ProjectLinks:
    """Per process: /setup credential verification and the basic-auth webhook step, on a few threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._verifying: dict[tuple[int, str, str], Future] = {}
        self._webhook_checked: dict[int, float] = {}
        self._webhook_running: set[int] = set()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:  # created on first use: after gunicorn's fork
                self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="isal-link")
            return self._executor

    # -- /setup --------------------------------------------------------------------------------------
    def setup(self, project_id: int, hostname: Any, token: Any, backend_host: str,
              on_verified: Callable[[], object] | None = None) -> SetupCredentials:
        """Decide what /setup's credentials become; raise SetupRefused for the answer when they are refused.

        ``on_verified`` runs once credentials that were still ``verifying`` when /setup answered are stored
        (the caller acts itself on every other outcome)."""
        s = self.settings
        if s.label_studio_url is not None and s.label_studio_api_key is not None:
            self.schedule_webhook_auth(project_id, backend_host)
            return SetupCredentials("environment", "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are used; /setup's "
                                                   "hostname and access_token are ignored")
        url, key = check_setup_credentials(hostname, token)
        stored = stored_project_credentials(s, project_id)
        if stored is not None and stored.url == url and stored.api_key == key:
            self.schedule_webhook_auth(project_id, backend_host)
            return SetupCredentials("stored", "the stored credentials are unchanged")
        future = self._verification(project_id, url, key, stored)
        try:
            future.result(timeout=SYNC_VERIFY_S)
        except FutureTimeout:
            logger.warning("project %s: Label Studio at %s did not confirm /setup's access token within %.0f s; "
                           "verifying in the background, nothing is stored until it accepts it", project_id, url,
                           SYNC_VERIFY_S)
            future.add_done_callback(lambda f: self._after_background(f, project_id, url, backend_host, on_verified))
            return SetupCredentials("verifying", f"verifying the access token with {url}; stored once Label Studio "
                                                 "accepts it (see the server log)")
        self.schedule_webhook_auth(project_id, backend_host)
        return SetupCredentials("verified", f"Label Studio at {url} accepted the access token; stored")

    def _verification(self, project_id: int, url: str, key: str,
                      stored: LabelStudioCredentials | None) -> Future:
        """One verify-then-store per (project, url, token) at a time; SetupRefused is the future's exception."""
        job = (project_id, url, key)
        with self._lock:
            running = self._verifying.get(job)
            if running is not None and not running.done():
                return running

        def run() -> None:
            _verify(url, key, project_id)
            if stored is not None and _origin(stored.url) != _origin(url):
                try:
                    _verify(stored.url, key, project_id)
                except SetupRefused:
                    raise SetupRefused(403, f"project {project_id} is connected to Label Studio at {stored.url}, "
                                            f"which does not accept this token: credentials for another host ({url}) "
                                            "are not taken. To move the project, delete its credentials.json in "
                                            "MODEL_DIR, or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY") from None
            save_project_credentials(self.settings, project_id, url, key)
            logger.info("project %s: Label Studio at %s accepted /setup's access token; credentials stored",
                        project_id, url)

        future = self._pool().submit(run)
        with self._lock:
            self._verifying[job] = future
        future.add_done_callback(lambda _: self._forget(job, future))
        return future

    def _forget(self, job: tuple[int, str, str], future: Future) -> None:
        with self._lock:
            if self._verifying.get(job) is future:
                del self._verifying[job]

    def _after_background(self, future: Future, project_id: int, url: str, backend_host: str,
                          on_verified: Callable[[], object] | None = None) -> None:
        exc = future.exception()
        if exc is None:
            self.schedule_webhook_auth(project_id, backend_host)
            if on_verified is not None:
                try:
                    on_verified()
                except Exception:  # noqa: BLE001 - logged; the next /setup tries again
                    logger.exception("project %s: the step after verifying /setup's credentials failed", project_id)
        else:
            logger.error("project %s: /setup's credentials for %s were not stored: %s", project_id, url, exc)

    # -- webhook basic auth --------------------------------------------------------------------------
    def schedule_webhook_auth(self, project_id: int, backend_host: str) -> None:
        """With basic auth on, make the project's webhook to this backend carry it (in the background)."""
        if not self.settings.basic_auth_enabled:
            return
        with self._lock:
            if project_id in self._webhook_running:
                return
            if time.monotonic() - self._webhook_checked.get(project_id, -1e9) < WEBHOOK_RECHECK_S:
                return
            self._webhook_running.add(project_id)

        def run() -> None:
            try:
                if self.ensure_webhook_auth(project_id, backend_host):
                    with self._lock:
                        self._webhook_checked[project_id] = time.monotonic()
            except (LabelStudioError, SettingsError) as exc:  # the next /setup tries again
                logger.warning("project %s: could not give the webhook basic auth: %s", project_id, exc)
            except Exception:  # noqa: BLE001 - logged; the next /setup tries again
                logger.exception("project %s: could not give the webhook basic auth", project_id)
            finally:
                with self._lock:
                    self._webhook_running.discard(project_id)

        self._pool().submit(run)

    def authorization(self) -> str:
        s = self.settings
        raw = f"{s.basic_auth_user}:{s.basic_auth_pass}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def ensure_webhook_auth(self, project_id: int, backend_host: str, wait_s: float = WEBHOOK_WAIT_S,
                            sleep: Callable[[float], None] = time.sleep) -> bool:
        """Set ``Authorization`` on the project's webhooks to this backend; True when at least one carries it."""
        creds = project_credentials(self.settings, project_id)
        ours, user = _netloc(backend_host), self.settings.basic_auth_user
        header = self.authorization()
        deadline = time.monotonic() + wait_s
        with LabelStudioClient(creds.url, creds.api_key, retries=1) as client:
            while True:
                urls = {
                    str(b.get("url", "")).rstrip("/") + "/webhook"
                    for b in client.list_ml_backends(project_id)
                    if _netloc(urlsplit(str(b.get("url", ""))).netloc) == ours
                    and b.get("auth_method") == "BASIC_AUTH" and b.get("basic_auth_user") == user
                }
                hooks = [h for h in client.list_webhooks(project_id) if str(h.get("url", "")).rstrip("/") in urls]
                for hook in hooks:
                    headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
                    if headers.get("Authorization") == header:
                        continue
                    client.set_webhook_headers(int(hook["id"]), {**headers, "Authorization": header})
                    logger.info("project %s: webhook %s (%s) now sends the backend's basic auth", project_id,
                                hook["id"], hook.get("url"))
                if hooks:
                    return True
                if time.monotonic() >= deadline:
                    logger.warning(
                        "project %s: no webhook of Label Studio points at this backend (%s) with basic auth as %r "
                        "after %.0f s, so events will get 401. One step fixes it: PATCH /api/webhooks/<id> with "
                        '{"headers": {"Authorization": "Basic <base64 of user:password>"}}', project_id,
                        backend_host, self.settings.basic_auth_user, wait_s)
                    return False
                sleep(WEBHOOK_POLL_S)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
