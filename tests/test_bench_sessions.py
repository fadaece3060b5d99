"""The benchmarks' Label Studio sessions: a 5xx is a recorded figure (when, which call, what was answered),
retried so one error does not end a run, and counted once per answer, whichever session saw it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from isal_backend.bench.live import CountingSession
from isal_backend.bench.loop import NextProbe


@pytest.fixture
def flaky_server() -> Iterator[str]:
    """A loopback HTTP server that answers each path's first request with a 500, then with JSON."""
    seen: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            first = self.path not in seen
            seen.add(self.path)
            body = b"database is locked" if first else json.dumps({"id": 7}).encode()
            self.send_response(500 if first else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_5xx_is_retried_and_recorded_with_its_call_and_answer(flaky_server: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("isal_backend.bench.live.time.sleep", lambda _s: None)
    errors: list[str] = []
    session = CountingSession(flaky_server, "token", errors)
    assert session.call("GET", "/api/projects/1/next") == {"id": 7}
    assert len(errors) == 1
    assert "GET /api/projects/1/next: HTTP 500 'database is locked'" in errors[0]


def test_the_next_probe_records_its_5xx_as_the_sessions_do(flaky_server: str) -> None:
    probe = NextProbe(CountingSession(flaky_server, "token", []), project=3)
    probe.once()
    probe.once()
    assert len(probe.latencies) == 2
    assert len(probe.errors) == 1 and "GET /api/projects/3/next: HTTP 500 'database is locked'" in probe.errors[0]
