"""Start and stop the real parts on loopback: Label Studio, the backend under gunicorn, an RQ worker.

Used by ``bench loop``, ``bench live`` and by the end-to-end tests, so both measure and check the same stack.
Every process gets its own process group, so stopping it also stops its children.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

REPO = Path(__file__).resolve().parents[2]
LS_BOOT_TIMEOUT_S = 300  # first boot runs the migrations (~90 s on a 2-core machine)
#: Label Studio's own feature flag (off in 1.23.2) for its prediction import: off, every import recounts the
#: annotations and predictions of every task of the project (an UPDATE of each task without any, holding
#: SQLite's lock); on, only the tasks the predictions are for. Measured at 100,000 tasks, 20 predictions:
#: 4.2 s off, 0.09 s on.
LS_FAST_PREDICTION_IMPORT = {"fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def stop_process(proc: subprocess.Popen, term_wait_s: float = 20) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def wait_http_ok(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting; log tail:\n"
                               f"{log_tail(log_path)}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout_s} s; log tail:\n{log_tail(log_path)}")
        time.sleep(0.5)


def await_started(proc: subprocess.Popen, log_path: Path, url: str, timeout_s: float, what: str) -> None:
    """:func:`wait_http_ok`, stopping the process (its whole group) when it does not come up."""
    try:
        wait_http_ok(url, proc, log_path, timeout_s, what)
    except BaseException:
        stop_process(proc)
        raise


@dataclass
class Service:
    """A started process with its log."""

    proc: subprocess.Popen
    log_path: Path
    url: str = ""

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server for Label Studio, from psql's own variables (PGHOST, PGPORT, PGUSER, PGPASSWORD).

    The defaults are the local test server (127.0.0.1:5432, user postgres, trust auth). Databases are made
    and dropped with ``createdb``/``dropdb``, so the backend's virtualenv needs no PostgreSQL driver.
    """

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = field(default="", repr=False)

    @classmethod
    def from_env(cls) -> Postgres:
        e = os.environ
        return cls(e.get("PGHOST") or "127.0.0.1", int(e.get("PGPORT") or 5432), e.get("PGUSER") or "postgres",
                   e.get("PGPASSWORD", ""))

    def __str__(self) -> str:
        return f"PostgreSQL at {self.host}:{self.port} (user {self.user}; set by PGHOST, PGPORT, PGUSER, PGPASSWORD)"

    def _run(self, *command: str) -> str:
        env = {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
               "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        except FileNotFoundError as exc:
            raise RuntimeError(f"{command[0]} is not installed (Debian package postgresql-client): {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed on {self}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def create_database(self, prefix: str = "isal") -> str:
        """A new, empty database with a unique name; returns the name."""
        name = f"{re.sub(r'[^a-z0-9_]', '_', prefix.lower())}_{secrets.token_hex(4)}"
        self._run("createdb", "--template=template0", "--encoding=UTF8", name)
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, disconnecting whoever is still connected (a Label Studio that did not stop cleanly)."""
        self._run("dropdb", "--if-exists", "--force", name)

    def query(self, database: str, sql: str) -> list[str]:
        """The rows ``psql`` prints for ``sql`` (unaligned, ``|`` between columns): for tests and checks."""
        return self._run("psql", "--no-psqlrc", "-tA", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql).splitlines()

    def label_studio_env(self, name: str) -> dict[str, str]:
        """Label Studio's settings for this database (its ``DJANGO_DB=default`` reads the ``POSTGRE_*``)."""
        return {"DJANGO_DB": "default", "POSTGRE_NAME": name, "POSTGRE_USER": self.user,
                "POSTGRE_PASSWORD": self.password, "POSTGRE_HOST": self.host, "POSTGRE_PORT": str(self.port)}


@dataclass
class LabelStudio(Service):
    """A running Label Studio: the admin's login and legacy token, a folder served as local files, its database."""

    token: str = field(default="", repr=False)
    files_root: Path = Path()
    username: str = "admin@example.com"
    password: str = field(default="", repr=False)  # for a browser's login page; never printed
    #: The database settings (DJANGO_DB, POSTGRE_*) and data dir, for ``label-studio shell`` on the same data.
    db_env: dict[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # never print the token or the password
        return f"LabelStudio(url={self.url!r})"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    @property
    def database(self) -> str:
        return "postgres" if self.db_env.get("DJANGO_DB") == "default" else "sqlite"


def start_label_studio(ls_venv: Path, base: Path, database: str | None = None,
                       postgres: Postgres | None = None, settings: dict[str, str] | None = None) -> LabelStudio:
    """Label Studio 1.23.2 as docs/label-studio.md says: fresh data dir, legacy token, loopback allowed.

    ``database`` names an existing, empty PostgreSQL database (``Postgres.create_database``) on ``postgres``
    (default: ``Postgres.from_env()``), as Label Studio runs in production; ``None`` keeps its SQLite file.
    ``settings``: more of Label Studio's environment (its feature flags, e.g.
    :data:`LS_FAST_PREDICTION_IMPORT`), applied last.
    """
    exe = Path(ls_venv) / "bin" / "label-studio"
    if not exe.exists():
        raise FileNotFoundError(f"Label Studio is not installed at {exe}: `make test` installs it "
                                f"(label-studio==1.23.2 in its own virtualenv); or set LS_VENV")
    base.mkdir(parents=True, exist_ok=True)
    files_root = base / "files"
    files_root.mkdir(exist_ok=True)
    port, token, password = free_port(), secrets.token_hex(20), secrets.token_urlsafe(16)
    db_env = {"LABEL_STUDIO_BASE_DATA_DIR": str(base / "data")}
    if database is not None:
        db_env.update((postgres or Postgres.from_env()).label_studio_env(database))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "POSTGRE_"))}
    env.update(db_env)
    env.update({
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
    })
    env.update(settings or {})
    log_path = base / "label-studio.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=base, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    await_started(proc, log_path, f"{url}/health", LS_BOOT_TIMEOUT_S, "Label Studio")
    return LabelStudio(proc=proc, log_path=log_path, url=url, token=token, files_root=files_root,
                       password=password, db_env=db_env)


def run_in_workdir(prefix: str, what: str, run: Callable[[Path], dict[str, Any]], json_path: str | Path,
                   keep: bool = False) -> dict[str, Any]:
    """Run a benchmark of the live stack in a fresh temporary folder and write its figures to ``json_path``.

    On failure, or with ``keep``, the folder stays (it holds the logs of Label Studio, the backend and the
    workers) and is named; otherwise it is removed.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        figures = run(work)
    except BaseException:
        print(f"{what} failed; the logs of Label Studio, the backend and the workers are in {work}")
        raise
    if keep:
        print(f"{what}: the logs of Label Studio, the backend and the workers are in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


@contextmanager
def label_studio_database(database: str, prefix: str = "isal_bench") -> Iterator[str | None]:
    """``sqlite``: None (Label Studio's own file); ``postgres``: a fresh database on ``Postgres.from_env()``,
    dropped at the end whatever happened, so a benchmark leaves no database behind."""
    postgres = Postgres.from_env() if database == "postgres" else None
    name = postgres.create_database(prefix) if postgres else None
    try:
        yield name
    finally:
        if postgres and name:
            postgres.drop_database(name)


def clear_redis(redis_url: str, prefix: str) -> None:
    """Remove a run's keys (its ISAL_REDIS_PREFIX and RQ queue) from a shared Redis."""
    r = redis.Redis.from_url(redis_url)
    for key in [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"rq:*{prefix}*")]:
        r.delete(key)


def create_annotator(ls: Any, email: str, ls_venv: Path | None = None) -> str:
    """Another user of the admin's organization with a legacy token, made in Label Studio's Django shell.

    Label Studio's API makes no user with a token, and ``/next`` locks and serves tasks per user: each
    simulated annotator of ``bench live`` (and of the e2e tests) needs its own. Returns the token.
    """
    token = secrets.token_hex(20)
    script = "\n".join([
        "from users.models import User",
        "from rest_framework.authtoken.models import Token",
        "org = User.objects.get(email='admin@example.com').active_organization",
        f"u = User.objects.create_user(email='{email}', username='{email}', password='{secrets.token_urlsafe(12)}')",
        "org.add_user(u)",
        "u.active_organization = org",
        "u.save()",
        "Token.objects.filter(user=u).delete()",  # Label Studio made one on creation; use ours
        f"Token.objects.create(user=u, key='{token}')",
        "print('ANNOTATOR-CREATED')",
        "",
    ])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "POSTGRE_"))}
    env.update(ls.db_env)  # its data dir and database (SQLite or PostgreSQL)
    exe = Path(ls_venv or os.environ.get("LS_VENV") or REPO / ".ls-venv") / "bin" / "label-studio"
    done = subprocess.run([str(exe), "shell"], input=script, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or "ANNOTATOR-CREATED" not in done.stdout:
        raise RuntimeError(f"creating annotator {email} failed: {(done.stdout + done.stderr)[-2000:]}")
    return token


def backend_env(model_dir: Path, redis_url: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a backend or worker: the caller's, minus stray settings, plus these."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ISAL_", "LABEL_STUDIO_", "BASIC_AUTH_")) and k not in ("REDIS_URL", "MODEL_DIR")}
    env["MODEL_DIR"] = str(model_dir)
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


def start_backend(env: dict[str, str], log_path: Path, port: int | None = None, threads: int = 16) -> Service:
    """``gunicorn _wsgi:app`` on loopback (one worker: the embedded queue lives in it)."""
    port = port or free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(gunicorn), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", str(threads),
             "--timeout", "120", "_wsgi:app"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    await_started(proc, log_path, f"{url}/health", 120, "the backend")
    return Service(proc=proc, log_path=log_path, url=url)


def start_worker(env: dict[str, str], log_path: Path) -> Service:
    """``python -m isal_backend worker`` (RQ) with the backend's environment."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "isal_backend", "worker"], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(proc=proc, log_path=log_path)


def start_static_server(root: Path, log_path: Path) -> Service:
    """A plain static file server for ``root`` on loopback (Python's threaded ``http.server``).

    For benchmarks that must not be bound by how fast Label Studio serves its local files (a Django view,
    one core, a permission check per image): in production images come from a web server or a bucket.
    """
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    await_started(proc, log_path, f"{url}/", 60, "the static image server")
    return Service(proc=proc, log_path=log_path, url=url)
