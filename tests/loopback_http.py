"""Real HTTP servers on loopback for the download tests: a canary that records every request it gets, and
routes that misbehave the way third-party image hosts do (redirects, drip-fed and cut-off bodies, errors)."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png(color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, "PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LoopbackServer  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.requests.append({"path": self.path, "headers": dict(self.headers)})
        route = urlsplit(self.path).path
        query = parse_qs(urlsplit(self.path).query)
        if route.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route.startswith("/drip"):  # one byte a second, forever (well, for 120 s)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(120):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
        elif route.startswith("/cut"):  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
        elif route.startswith("/huge"):  # declares more than the 64 MiB cap
            self.send_response(200)
            self.send_header("Content-Length", str(100 * 2**20))
            self.end_headers()
        elif route.startswith("/missing"):
            self.send_error(404)
        elif route.startswith("/broken"):
            self.send_error(503)
        else:
            body = png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class LoopbackServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP/1.0 server (one connection per request) that records what it was asked."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.requests: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/img.png", host: str | None = None) -> str:
        host = host or str(self.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{path}"


@contextmanager
def serve(host: str = "127.0.0.1", port: int = 0) -> Iterator[LoopbackServer]:
    server = LoopbackServer(host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
