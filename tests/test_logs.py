"""No log line, from any library, carries a URL's query values or userinfo: the redacting filter that
configure_logging installs on the root handler(s), on gunicorn's own handlers, and what it leaves alone."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loopback_http import serve

from isal_backend.labelstudio.client import LabelStudioClient
from isal_backend.labelstudio.fetch import DownloadPolicy
from isal_backend.logs import RedactingFilter, redact_text
from isal_backend.settings import Settings, configure_logging

REPO = Path(__file__).resolve().parent.parent
PRESIGNED = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=SECRET&X-Amz-Credential=SECRET2"
SECRETS = ("SECRET", "SECRET2", "pass@", "user:")


@pytest.fixture
def root_output() -> Iterator[io.StringIO]:
    """What a handler on the root logger writes, after configure_logging set the backend's logging up."""
    root = logging.getLogger()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    configure_logging(Settings())
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, (secret, text)


def test_httpx_request_lines_are_redacted(root_output: io.StringIO) -> None:
    """httpx logs every request's full URL at INFO: through a real request to a loopback server."""
    assert any(isinstance(f, RedactingFilter) for h in logging.getLogger().handlers for f in h.filters)
    with serve() as server, httpx.Client() as http:
        port = server.port
        http.get(f"http://127.0.0.1:{port}/a.png?X-Amz-Signature=SECRET&X-Amz-Credential=SECRET2")
        http.get(f"http://user:pass@127.0.0.1:{port}/x.png")
        assert len(server.requests) == 2
    text = root_output.getvalue()
    assert f'httpx: HTTP Request: GET http://127.0.0.1:{port}/a.png?X-Amz-Signature=REDACTED&X-Amz-Credential=' \
           'REDACTED "HTTP/1.0 200 OK"' in text
    assert f"GET http://127.0.0.1:{port}/x.png " in text
    _clean(text)


def test_image_downloads_log_no_secret(root_output: io.StringIO) -> None:
    with serve() as server, LabelStudioClient("http://127.0.0.1:9", "k" * 40, retries=0,
                                              download_policy=DownloadPolicy(allowed=("127.0.0.1",))) as c:
        c.download(f"http://user:pass@127.0.0.1:{server.port}/b.png?token=SECRET")
        with pytest.raises(Exception, match="HTTP 404"):
            c.download(server.url("/missing.png?sig=SECRET"))
    text = root_output.getvalue()
    assert "/b.png?token=REDACTED" in text and "/missing.png?sig=REDACTED" in text
    _clean(text)


def test_plain_loggers_with_args_tracebacks_and_stacks(root_output: io.StringIO) -> None:
    log = logging.getLogger("some.library")
    log.warning("fetching %s for %r", PRESIGNED, {"url": "http://user:pass@host/x.png"})
    log.info("local file %s kept", "/data/local-files/?d=imgs/a.png")
    log.info("request line %s", "GET /predict?token=SECRET HTTP/1.1")
    try:
        raise RuntimeError(f"could not fetch {PRESIGNED}")
    except RuntimeError:
        log.exception("download failed")
    log.info("here", stack_info=True, extra={"u": PRESIGNED})
    text = root_output.getvalue()
    assert "https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED" in text
    assert "'http://host/x.png'" in text and "/data/local-files/?d=imgs/a.png kept" in text
    assert "GET /predict?token=REDACTED HTTP/1.1" in text
    assert "RuntimeError: could not fetch https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=REDACTED" in text
    _clean(text)


def test_redact_text_leaves_plain_text_alone() -> None:
    for text in ("round 3 done in 2.5 s", "http://ls:8080/api/projects/3", "what? 50% done", "a@b c#d",
                 "/data/upload/1/a.png"):
        assert redact_text(text) == text
    assert redact_text("see http://u:p@[::1]:8080/x#access_token=T and redis://:pw@r:6379/0") == \
        "see http://[::1]:8080/x and redis://r:6379/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_with_its_default_config_logs_no_secret(tmp_path: Path) -> None:
    """`gunicorn _wsgi:app` keeps its own error-log handler (gunicorn.error does not propagate): a hostile request
    line lands there, the app's own lines on the root handler, and, when enabled, the access log on stdout."""
    port = _free_port()
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "models"),
           "LABEL_STUDIO_URL": "http://admin:HUNTER2@127.0.0.1:9",
           "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567"}
    env.pop("LOG_LEVEL", None)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([gunicorn, "--bind", f"127.0.0.1:{port}", "--access-logfile", "-", "_wsgi:app"],
                                cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, err.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health?token=SECRET", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /x.png?X-Amz-Signature=SECRET\x01 HTTP/1.1\r\nHost: a\r\n\r\n")  # a bad request line
            s.recv(1000)
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    errors, access = err.read_text(), out.read_text()
    assert "Invalid request from ip=127.0.0.1: Invalid HTTP request line: 'GET /x.png?X-Amz-Signature=REDACTED " \
        in errors
    assert "app configured" in errors and "label_studio_url='http://127.0.0.1:9'" in errors
    assert "GET /health?token=REDACTED HTTP/1.1" in access
    for text in (errors, access):
        assert "SECRET" not in text and "HUNTER2" not in text
