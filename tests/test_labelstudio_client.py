"""LabelStudioClient behaviour that needs no Label Studio: unreachable servers, input checks, secrets."""

from __future__ import annotations

import logging
import socket
import time
import traceback

import jwt
import pytest

from isal_backend.labelstudio.client import (
    DownloadError,
    LabelStudioClient,
    LabelStudioUnavailable,
    pause_between,
)

LEGACY_KEY = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connection refused


def _pat() -> str:
    # The shape of an LS personal access token: a refresh JWT with an expiry.
    return jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 3600, "user_id": "1"}, "k" * 32, "HS256")


@pytest.mark.parametrize("key", [LEGACY_KEY, _pat()], ids=["legacy", "pat"])
def test_unreachable_server_raises_after_retries_without_the_key(key: str, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    caplog.set_level(logging.DEBUG)
    client = LabelStudioClient(f"http://127.0.0.1:{_closed_port()}", key, timeout=2, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(LabelStudioUnavailable) as err:
        client.get_project(1)
    assert time.monotonic() - started >= 0.05 + 0.1  # it did back off between the 3 attempts
    message = str(err.value)
    assert "is unavailable" in message and "after 3 attempts" in message and "ConnectError" in message
    assert err.value.__cause__ is None
    text = "".join(traceback.format_exception(err.value)) + caplog.text + repr(client) + message
    assert key not in text
    assert len(caplog.records) >= 2  # the retries were logged (without the key, checked above)
    with pytest.raises(LabelStudioUnavailable):
        client.download("/data/upload/1/a.png")


def test_repr_and_str_do_not_show_the_key() -> None:
    client = LabelStudioClient("http://127.0.0.1:9", LEGACY_KEY)
    assert LEGACY_KEY not in repr(client) and LEGACY_KEY not in str(client)
    assert "127.0.0.1:9" in repr(client)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="http"):
        LabelStudioClient("127.0.0.1:8080", LEGACY_KEY)
    with pytest.raises(ValueError, match="empty"):
        LabelStudioClient("http://127.0.0.1:8080", " ")


@pytest.mark.parametrize(("item", "fragment"), [
    ({"task": 1, "model_version": "r", "score": 1.5, "result": []}, "within [0, 1]"),
    ({"task": 1, "model_version": "r", "score": -0.1, "result": []}, "within [0, 1]"),
    ({"task": 1, "model_version": "r", "score": float("nan"), "result": []}, "within [0, 1]"),
    ({"task": "1", "model_version": "r", "score": 0.5, "result": []}, "'task'"),
    ({"task": 1, "model_version": "", "score": 0.5, "result": []}, "'model_version'"),
    ({"task": 1, "model_version": "r", "score": 0.5}, "'result'"),
])
def test_invalid_predictions_are_refused_before_any_request(item: dict, fragment: str) -> None:
    # The port is closed: reaching the network would raise LabelStudioUnavailable instead of ValueError.
    client = LabelStudioClient(f"http://127.0.0.1:{_closed_port()}", LEGACY_KEY, retries=0)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        client.import_predictions(1, [{"task": 2, "model_version": "r", "score": 0.1, "result": []}, item])


def test_data_urls_and_bad_references() -> None:
    client = LabelStudioClient(f"http://127.0.0.1:{_closed_port()}", LEGACY_KEY, retries=0)
    assert client.download("data:image/png;base64,aGVsbG8=") == b"hello"
    assert client.download("data:text/plain,hi%20there") == b"hi there"
    with pytest.raises(DownloadError, match="malformed data URL"):
        client.download("data:image/png;base64")
    with pytest.raises(DownloadError, match="unsupported image reference s3://bucket/a.png"):
        client.download("s3://bucket/a.png?X-Amz-Signature=abc")
    with pytest.raises(DownloadError, match="empty"):
        client.download("")
    with pytest.raises(DownloadError) as err:
        client.download("s3://bucket/a.png?X-Amz-Signature=SECRETSIG")
    assert "SECRETSIG" not in str(err.value)


def test_expired_personal_access_token_is_reported_clearly() -> None:
    from isal_backend.labelstudio.client import LabelStudioAPIError

    expired = jwt.encode({"token_type": "refresh", "exp": int(time.time()) - 60, "user_id": "1"}, "k" * 32, "HS256")
    with pytest.raises(LabelStudioAPIError, match="expired") as err:
        LabelStudioClient("http://127.0.0.1:9", expired)
    assert expired not in str(err.value)


def test_an_unpaced_clean_up_pauses_between_calls_not_before_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a pacer the clean-up's calls are spaced by a fixed pause, so Label Studio's own writers get
    SQLite's lock in between; the first call needs none (nothing of ours ran just before it)."""
    slept: list[float] = []
    monkeypatch.setattr("isal_backend.labelstudio.client.time.sleep", slept.append)
    wait = pause_between(0.2)
    for _ in range(3):
        wait()
    assert slept == [0.2, 0.2]
    no_pause = pause_between(0.0)
    no_pause()
    no_pause()
    assert slept == [0.2, 0.2]
