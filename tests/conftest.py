"""Shared fixtures: real Label Studio 1.23.2 servers for the e2e tests (started once per session).

``label_studio`` keeps its data in SQLite, ``label_studio_pg`` in a PostgreSQL database of its own on the local
server (as Label Studio runs in production), created before it starts and dropped after, even on failure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from isal_backend.bench.stack import REPO, Postgres, start_label_studio


@dataclass
class LabelStudioServer:
    """A running Label Studio: its url, the admin's legacy token, and a folder LS serves as local files."""

    url: str
    token: str
    files_root: Path  # LOCAL_FILES_DOCUMENT_ROOT: local-files storages must point inside it
    log_path: Path
    username: str = "admin@example.com"
    password: str = field(default="", repr=False)  # the admin's, for a browser's login page
    db_env: dict[str, str] = field(default_factory=dict, repr=False)  # data dir and database, for `label-studio shell`
    database: str = "sqlite"
    _pat: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:  # never print the token in test output
        return f"LabelStudioServer(url={self.url!r})"

    @property
    def legacy_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def personal_access_token(self) -> str:
        """The admin's personal access token (a refresh JWT).  LS lets a user hold one at a time, so it is
        created once and cached."""
        with self._lock:
            if self._pat is None:
                r = requests.post(f"{self.url}/api/token/", headers=self.legacy_headers, timeout=30)
                assert r.status_code == 201, f"creating a personal access token: HTTP {r.status_code} {r.text[:200]}"
                self._pat = r.json()["token"]
            return self._pat


def _serve(base: Path, database: str | None = None) -> Iterator[LabelStudioServer]:
    ls_venv = Path(os.environ.get("LS_VENV") or REPO / ".ls-venv")
    try:
        ls = start_label_studio(ls_venv, base, database)
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield LabelStudioServer(url=ls.url, token=ls.token, files_root=ls.files_root, log_path=ls.log_path,
                                username=ls.username, password=ls.password, db_env=ls.db_env, database=ls.database)
    finally:
        ls.stop()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Start Label Studio as docs/label-studio.md says, on a fresh data dir and a free port; stop it at the end."""
    yield from _serve(tmp_path_factory.mktemp("label-studio"))


@pytest.fixture(scope="session")
def label_studio_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """The same on PostgreSQL: a database for this session, dropped at the end whatever happened.

    The server must be up (scripts/ensure-test-services starts it): if it is not, this fails, naming it.
    """
    server = Postgres.from_env()
    try:
        name = server.create_database("isal_test")
    except RuntimeError as exc:  # it names the server and the variables that set it
        raise pytest.fail.Exception(f"the PostgreSQL e2e tests need their server: {exc}", pytrace=False) from None
    try:
        yield from _serve(tmp_path_factory.mktemp("label-studio-pg"), name)
    finally:
        server.drop_database(name)

