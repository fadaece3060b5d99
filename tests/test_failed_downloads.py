"""Failed image downloads are remembered per URL for a while: a broken image is not fetched again every round
(an oversized one cost 64 MiB each time), the memory holds no URL on disk, and concurrent writers lose nothing."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
from loopback_http import LoopbackServer, serve

from isal_backend.labelstudio.client import DownloadError, LabelStudioClient, LabelStudioUnavailable
from isal_backend.labelstudio.failures import FailedDownloads
from isal_backend.labelstudio.fetch import DownloadPolicy
from isal_backend.settings import Settings

KEY = "0123456789abcdef0123456789abcdef01234567"


class Clock:
    """A wall clock the test moves by hand, so the TTL can pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> LoopbackServer:
    with serve() as s:
        yield s


def _client() -> LabelStudioClient:
    return LabelStudioClient("http://127.0.0.1:9", KEY, retries=3, backoff=0.05,
                             download_policy=DownloadPolicy(allowed=("127.0.0.1",)))


@pytest.mark.parametrize(("path", "reason"), [("/missing.png?sig=SECRET", "HTTP 404"),
                                              ("/huge.png", "over the 67108864 limit")])
def test_a_failed_url_is_not_requested_again_within_the_ttl(server: LoopbackServer, tmp_path: Path, path: str,
                                                            reason: str) -> None:
    clock = Clock()
    failures = FailedDownloads(tmp_path / "failed-images.json", retry_seconds=600, clock=clock)
    url = server.url(path)
    with _client() as c:
        with pytest.raises(DownloadError, match=reason) as first:
            c.download(url, failures=failures)
        assert len(server.requests) == 1
        clock.now += 599
        with pytest.raises(DownloadError, match=reason) as again:
            c.download(url, failures=failures)
        assert len(server.requests) == 1  # no request: the remembered reason is raised at once
        assert str(first.value) in str(again.value) and "remembered from 599 s ago" in str(again.value)
        assert c.download(server.url("/fine.png"), failures=failures)  # other URLs are unaffected
        assert len(server.requests) == 2
        clock.now += 2  # past the TTL: tried again
        with pytest.raises(DownloadError, match=reason) as late:
            c.download(url, failures=failures)
        assert "remembered" not in str(late.value)
        assert len(server.requests) == 3
        with pytest.raises(DownloadError):  # without a memory, every call fetches
            c.download(url)
        assert len(server.requests) == 4


def test_refused_urls_are_remembered_and_the_file_holds_no_url(server: LoopbackServer, tmp_path: Path) -> None:
    failures = FailedDownloads(tmp_path / "failed-images.json", retry_seconds=600)
    secret_url = server.url("/missing.png?X-Amz-Signature=SECRET", host="localhost").replace(
        "http://", "http://user:HUNTER2@")
    with LabelStudioClient("http://127.0.0.1:9", KEY) as c:  # SSRF protection on, nothing allowlisted
        with pytest.raises(DownloadError, match="refused"):
            c.download(secret_url, failures=failures)
        assert failures.get(secret_url) is not None and len(failures) == 1
    assert server.requests == []
    text = (tmp_path / "failed-images.json").read_text()
    assert "SECRET" not in text and "HUNTER2" not in text and "user" not in text
    assert list(json.loads(text)) == [hashlib.sha256(secret_url.encode()).hexdigest()]
    assert "missing.png?X-Amz-Signature=REDACTED" in text  # the reason names the image, redacted


def test_label_studio_outages_and_successes_are_not_remembered(server: LoopbackServer, tmp_path: Path) -> None:
    """Only the image's own failures count: Label Studio being down is retried by the job, not remembered."""
    failures = FailedDownloads(tmp_path / "failed-images.json", retry_seconds=600)
    with LabelStudioClient("http://127.0.0.1:9", KEY, retries=0) as down, pytest.raises(LabelStudioUnavailable):
        down.download("/data/upload/1/a.png", failures=failures)
    with _client() as c:
        assert c.download(server.url("/ok.png"), failures=failures)
    assert len(failures) == 0


def test_a_damaged_file_is_an_empty_memory(tmp_path: Path) -> None:
    path = tmp_path / "failed-images.json"
    path.write_text("{not json")
    failures = FailedDownloads(path, retry_seconds=60)
    assert failures.get("http://x/a.png") is None
    failures.record("http://x/a.png", "image http://x/a.png could not be downloaded: HTTP 404")
    assert failures.get("http://x/a.png").reason.endswith("HTTP 404")


def _record_many(path: str, worker: int) -> None:
    failures = FailedDownloads(path, retry_seconds=600)
    for i in range(40):
        failures.record(f"http://h/{worker}/{i}.png", f"failure {worker}/{i}")


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Four processes (RQ workers of one project) record at the same time: every entry survives, the file is
    always whole JSON (atomic replace under a lock)."""
    path = str(tmp_path / "failed-images.json")
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_record_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    failures = FailedDownloads(path, retry_seconds=600)
    assert len(failures) == 160
    assert failures.get("http://h/3/39.png").reason == "failure 3/39"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".failed-images.json-")]  # no temp left


def test_the_project_path_convention(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, failed_image_retry_seconds=120)
    failures = FailedDownloads.for_project(settings, 7)
    assert failures is not None and failures.retry_seconds == 120
    assert failures.path == tmp_path / "projects" / "7" / "failed-images.json"
    assert FailedDownloads.for_project(Settings(model_dir=tmp_path, failed_image_retry_seconds=0), 7) is None


def test_label_studio_references_are_remembered_by_the_reference(server: LoopbackServer, tmp_path: Path) -> None:
    """An oversized image in Label Studio itself: remembered under the task's reference as given (the key the
    round code uses to record an image that downloaded but did not decode)."""
    failures = FailedDownloads(tmp_path / "failed-images.json", retry_seconds=600)
    with LabelStudioClient(server.url(""), KEY, retries=0) as ls:
        for _ in range(2):
            with pytest.raises(DownloadError, match="over the 67108864 limit"):
                ls.download("/huge/upload.png", failures=failures)
    assert len(server.requests) == 1
    assert failures.get("/huge/upload.png") is not None
    failures.record("/data/upload/1/bad.png", "image /data/upload/1/bad.png is corrupt or truncated")
    with LabelStudioClient(server.url(""), KEY, retries=0) as ls, pytest.raises(DownloadError, match="truncated"):
        ls.download("/data/upload/1/bad.png", failures=failures)
    assert len(server.requests) == 1
