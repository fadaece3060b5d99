"""Task image downloads: SSRF protection checked at connect time and on every redirect hop, the allowlist and
the off switch, and a total deadline per download.  Every server here is a real HTTP server on loopback; a
"canary" is one that must not be reached."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from loopback_http import LoopbackServer, png, serve

from isal_backend.labelstudio.client import DownloadError, LabelStudioClient, LabelStudioUnavailable
from isal_backend.labelstudio.fetch import DownloadPolicy, FetchRefused, GuardedBackend, address_refusal
from isal_backend.settings import Settings, SettingsError

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
# An unused port on loopback stands in for "Label Studio": these tests download third-party images only.
LS_URL = "http://127.0.0.1:9"


def client(policy: DownloadPolicy | None = None, **kw: object) -> LabelStudioClient:
    return LabelStudioClient(LS_URL, LEGACY_KEY, retries=3, backoff=0.05, download_policy=policy, **kw)


@pytest.fixture
def canary() -> LoopbackServer:
    with serve("127.0.0.1") as server:
        yield server


@pytest.fixture
def canary6() -> LoopbackServer:
    with serve("::1") as server:
        yield server


# ------------------------------------------------------------------------------------------ SSRF


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LocalHost.", "0x7f000001", "2130706433", "127.1",
                                  "127.0.0.255", "[::ffff:127.0.0.1]"])
def test_loopback_in_every_spelling_is_refused_before_any_request(canary: LoopbackServer, host: str) -> None:
    url = canary.url("/img.png?X-Amz-Signature=SECRET", host=host.strip("[]"))
    with client() as c, pytest.raises(DownloadError) as err:
        c.download(url)
    message = str(err.value)
    assert "refused" in message and "loopback" in message
    assert f"host {host.strip('[]').lower().rstrip('.')} " in message
    assert "ISAL_IMAGE_HOSTS_ALLOWED" in message and "SECRET" not in message
    assert canary.requests == []


def test_octal_spelling_is_not_fetched_either(canary: LoopbackServer) -> None:
    """httpx itself rejects 0177.0.0.1 (glibc would read it as 127.0.0.1): a per-image error, no request."""
    with client() as c, pytest.raises(DownloadError, match="could not be downloaded: InvalidURL"):
        c.download(canary.url(host="0177.0.0.1"))
    assert canary.requests == []


def test_ipv6_loopback_is_refused(canary6: LoopbackServer) -> None:
    with client() as c, pytest.raises(DownloadError, match=r"host ::1 is a loopback address"):
        c.download(canary6.url())
    assert canary6.requests == []


def test_allowlisted_hosts_and_networks_are_fetched(canary: LoopbackServer, canary6: LoopbackServer) -> None:
    with client(DownloadPolicy(allowed=("localhost",))) as c:
        assert c.download(canary.url(host="localhost")) == png()
        with pytest.raises(DownloadError, match="host 127.0.0.1 is a loopback"):  # the name, not its address
            c.download(canary.url())
    assert len(canary.requests) == 1
    with client(DownloadPolicy(allowed=("127.0.0.0/8", "::1"))) as c:
        assert c.download(canary.url(host="0x7f000001")) == png()
        assert c.download(canary6.url()) == png()
    assert len(canary.requests) == 2 and len(canary6.requests) == 1


def test_protection_off_fetches_loopback(canary: LoopbackServer) -> None:
    with client(DownloadPolicy(ssrf_protection=False)) as c:
        assert c.download(canary.url(host="localhost")) == png()
    assert len(canary.requests) == 1


def test_a_redirect_to_loopback_is_refused_at_the_hop(canary: LoopbackServer) -> None:
    with serve("127.0.0.1") as allowed, client(DownloadPolicy(allowed=("localhost",))) as c:
        for target in (canary.url("/img.png?token=SECRET"), canary.url(host="0x7f000001"),
                       canary.url(host="::1")):
            hop = allowed.url(f"/redirect?to={target}", host="localhost")
            with pytest.raises(DownloadError) as err:
                c.download(hop)
            assert "refused" in str(err.value) and "loopback" in str(err.value) and "SECRET" not in str(err.value)
        assert canary.requests == [] and len(allowed.requests) == 3
        # the same redirect to a host the allowlist names is followed: redirects do work
        assert c.download(allowed.url(f"/redirect?to={canary.url(host='localhost')}", host="localhost")) == png()
        assert len(canary.requests) == 1


def test_dns_rebinding_cannot_swap_the_address_after_the_check() -> None:
    """A rebinding resolver answers an acceptable address first and loopback afterwards.  The connection is made
    to the address that was checked, never to a second lookup: the canary on 127.0.0.1 hears nothing.

    127.0.0.2/32 is allowlisted to play the acceptable ("public") address: these tests send traffic to
    loopback only.  Both servers listen on the same port, so only the address tells them apart."""
    with serve("127.0.0.2") as good, serve("127.0.0.1", good.port) as canary:
        answers: list[str] = []

        def rebinding(host: str, port: int) -> Sequence[str]:
            answers.append(host)
            return ["127.0.0.2"] if len(answers) == 1 else ["127.0.0.1"]

        with client(DownloadPolicy(allowed=("127.0.0.2/32",)), resolver=rebinding) as c:
            url = f"http://rebind.example:{good.port}/img.png"
            assert c.download(url) == png()
            assert answers == ["rebind.example"] and len(good.requests) == 1 and canary.requests == []
            with pytest.raises(DownloadError, match=r"host rebind\.example resolves to 127\.0\.0\.1, a loopback"):
                c.download(url)  # HTTP/1.0: a new connection, so a new lookup, checked again
        assert len(answers) == 2 and len(good.requests) == 1 and canary.requests == []


def test_every_address_of_a_name_must_be_public() -> None:
    """A name with one public and one internal address is refused (the classic multi-A-record rebinding).
    Checked on the guard itself: nothing is connected to, so no packet leaves loopback."""
    table = {"mixed.example": ["93.184.215.14", "127.0.0.1"], "meta.example": ["169.254.169.254"],
             "lan.example": ["192.168.1.10"], "cgnat.example": ["100.64.3.4"], "ula.example": ["fd00::5"],
             "mapped.example": ["::ffff:10.0.0.1"], "6to4.example": ["2002:0a00:0001::1"],
             "public.example": ["93.184.215.14", "2606:4700:4700::1111"]}
    guard = GuardedBackend(DownloadPolicy(), resolver=lambda host, port: table[host])
    reasons = {}
    for name in table:
        try:
            guard.vet(name, 443)
        except FetchRefused as exc:
            reasons[name] = exc.reason
    assert "public.example" not in reasons
    assert "loopback" in reasons["mixed.example"] and "link-local" in reasons["meta.example"]
    assert "private" in reasons["lan.example"] and "carrier-grade NAT" in reasons["cgnat.example"]
    assert "unique-local" in reasons["ula.example"] and "private" in reasons["mapped.example"]
    assert "embedded in IPv6 2002:a00:1::1" in reasons["6to4.example"]
    assert guard.vet("public.example", 443) == table["public.example"]
    allowing = GuardedBackend(DownloadPolicy(allowed=("192.168.0.0/16", "*.example")), resolver=table.get)
    assert allowing.vet("lan.example", 80) == ["lan.example"]  # the name is allowlisted: connect by name


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("198.18.0.1", "private"), ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"),
    ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"), ("ff02::1", "multicast"),
    ("fec0::1", "site-local"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:192.168.1.1", "private"),
    ("::127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"), ("2001:db8::1", "private"),
])
def test_non_public_ranges(address: str, reason: str) -> None:
    assert reason in (address_refusal(ipaddress.ip_address(address)) or "public")


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1", "64:ff9b::808:808"])
def test_public_addresses(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_environment_proxies_are_never_used(canary: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment would connect to the image host on our behalf, past the guard."""
    with serve("127.0.0.1") as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url(""))
        with client(DownloadPolicy(allowed=("localhost",))) as c:
            assert c.download(canary.url(host="localhost")) == png()
            with pytest.raises(DownloadError, match="refused"):
                c.download(canary.url())
        assert proxy.requests == [] and len(canary.requests) == 1


def test_label_studio_origin_is_exempt_and_only_it_gets_credentials(canary: LoopbackServer) -> None:
    """The backend's own Label Studio (here a loopback server) is fetched with credentials although it is on
    loopback; its redirect to another loopback port is a third party: vetted (refused), and with the host
    allowlisted, fetched without credentials."""
    with serve("127.0.0.1") as ls:
        with LabelStudioClient(ls.url(""), LEGACY_KEY, retries=0) as c:
            assert c.download("/data/upload/1/a.png") == png()
            assert ls.requests[-1]["headers"]["Authorization"] == f"Token {LEGACY_KEY}"
            with pytest.raises(DownloadError, match="refused: host 127.0.0.1 is a loopback"):
                c.download(f"/redirect?to={canary.url()}")
        assert canary.requests == []
        with LabelStudioClient(ls.url(""), LEGACY_KEY, retries=0,
                               download_policy=DownloadPolicy(allowed=("localhost",))) as c:
            assert c.download(f"/redirect?to={canary.url(host='localhost')}") == png()
        assert len(canary.requests) == 1
        assert not {k.lower() for k in canary.requests[0]["headers"]} & {"authorization", "cookie"}


# ------------------------------------------------------------------------------------------ deadline


def test_a_drip_fed_image_fails_at_the_deadline(canary: LoopbackServer) -> None:
    """One byte a second: every read succeeds, so only a total deadline stops it (it took 140 s before)."""
    policy = DownloadPolicy(allowed=("127.0.0.1",), deadline_seconds=3)
    start = time.monotonic()
    with client(policy) as c, pytest.raises(DownloadError) as err:
        c.download(canary.url("/drip.png?X-Amz-Signature=SECRET"))
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 3 + 1, elapsed
    message = str(err.value)
    assert "/drip.png?X-Amz-Signature=REDACTED" in message and "SECRET" not in message
    assert "3 s download deadline" in message and "ISAL_DOWNLOAD_DEADLINE_SECONDS" in message
    assert len(canary.requests) == 1  # not retried: the deadline covers the retries too


def test_label_studio_downloads_have_the_deadline_too(canary: LoopbackServer) -> None:
    start = time.monotonic()
    with LabelStudioClient(canary.url(""), LEGACY_KEY, retries=3, backoff=0.05,
                           download_policy=DownloadPolicy(deadline_seconds=2)) as c, \
            pytest.raises(LabelStudioUnavailable, match="2 s download deadline"):
        c.download("/drip/upload.png")
    assert time.monotonic() - start < 2 + 1
    assert len(canary.requests) == 1


def test_a_cut_off_third_party_body_is_not_retried(canary: LoopbackServer) -> None:
    with client(DownloadPolicy(allowed=("127.0.0.1",))) as c, pytest.raises(DownloadError) as err:
        c.download(canary.url("/cut.png"))
    assert "not retried" in str(err.value)
    assert len(canary.requests) == 1  # it was 4 (retries=3) before


def test_a_third_party_5xx_is_retried_once(canary: LoopbackServer) -> None:
    with client(DownloadPolicy(allowed=("127.0.0.1",))) as c, pytest.raises(DownloadError, match="HTTP 503"):
        c.download(canary.url("/broken.png"))
    assert len(canary.requests) == 2


def test_the_size_cap_still_holds(canary: LoopbackServer) -> None:
    with client(DownloadPolicy(allowed=("127.0.0.1",))) as c, pytest.raises(DownloadError, match="over the"):
        c.download(canary.url("/huge.png"))


# ------------------------------------------------------------------------------------------ settings


def test_settings_of_the_download_policy() -> None:
    settings = Settings.from_env({"ISAL_IMAGE_HOSTS_ALLOWED": " Images.Corp.Example. , *.cdn.example,10.0.0.0/8,"
                                                              "127.0.0.1,[::1],10.0.0.0/8",
                                  "ISAL_DOWNLOAD_DEADLINE_SECONDS": "12.5", "ISAL_SSRF_PROTECTION": "FALSE",
                                  "ISAL_FAILED_IMAGE_RETRY_SECONDS": "0"})
    assert settings.image_hosts_allowed == ("images.corp.example", "*.cdn.example", "10.0.0.0/8", "127.0.0.1/32",
                                            "::1/128")
    assert settings.download_deadline_seconds == 12.5 and settings.ssrf_protection is False
    assert settings.failed_image_retry_seconds == 0
    policy = DownloadPolicy.from_settings(settings)
    assert policy == DownloadPolicy(False, settings.image_hosts_allowed, 12.5)
    assert policy.host_allowed("a.cdn.example") and not policy.host_allowed("cdn.example.evil")
    defaults = Settings.from_env({})
    assert (defaults.ssrf_protection, defaults.image_hosts_allowed, defaults.download_deadline_seconds,
            defaults.failed_image_retry_seconds) == (True, (), 30.0, 3600)
    assert DownloadPolicy.from_settings(defaults) == DownloadPolicy()
    c = LabelStudioClient.from_settings(LS_URL, LEGACY_KEY, settings, retries=0)
    assert c.download_policy == policy
    c.close()


@pytest.mark.parametrize(("env", "words"), [
    ({"ISAL_IMAGE_HOSTS_ALLOWED": "http://images.example"}, "ISAL_IMAGE_HOSTS_ALLOWED"),
    ({"ISAL_IMAGE_HOSTS_ALLOWED": "10.0.0.0/33"}, "bad entry"),
    ({"ISAL_SSRF_PROTECTION": "no"}, "ISAL_SSRF_PROTECTION"),
    ({"ISAL_DOWNLOAD_DEADLINE_SECONDS": "0"}, "ISAL_DOWNLOAD_DEADLINE_SECONDS"),
    ({"ISAL_FAILED_IMAGE_RETRY_SECONDS": "-1"}, "ISAL_FAILED_IMAGE_RETRY_SECONDS"),
])
def test_bad_download_settings_are_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)


def test_rounds_build_their_client_from_the_settings(canary: LoopbackServer, tmp_path: Path) -> None:
    """The jobs' datastore (which rounds, new-task scoring and /predict read images through) follows the settings:
    protection on by default, and a project's failed images remembered."""
    from isal_backend.jobs.entry import live_datastore

    settings = Settings(label_studio_url=LS_URL, label_studio_api_key=LEGACY_KEY, model_dir=tmp_path,
                        backbone="small-cnn", image_hosts_allowed=("images.corp.example",), download_deadline_seconds=7)
    datastore = live_datastore(settings, 1)
    assert datastore.client.download_policy == DownloadPolicy(True, ("images.corp.example",), 7)
    failures = datastore.failures
    assert failures is not None and failures.path == tmp_path / "projects" / "1" / "failed-images.json"
    with pytest.raises(DownloadError, match="refused"):
        datastore.image(canary.url(host="localhost"))
    assert canary.requests == []


def test_https_connects_to_the_vetted_address_with_the_name_for_sni_and_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket goes to the vetted IP, but TLS (SNI, certificate check) and the Host header keep the name:
    a certificate for `localhost` validates although the connection is made to 127.0.0.1."""
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate (and only it)
    server = LoopbackServer("127.0.0.1")
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    try:
        with client(DownloadPolicy(allowed=("127.0.0.0/8",)), resolver=resolver) as c:  # a network, not the name
            assert c.download(f"https://localhost:{server.port}/img.png") == png()
        with client(resolver=resolver) as guarded, \
                pytest.raises(DownloadError, match="refused: host localhost resolves to 127.0.0.1"):
            guarded.download(f"https://localhost:{server.port}/img.png")
    finally:
        server.shutdown()
        server.server_close()
    assert resolved == ["localhost", "localhost"] and names == ["localhost"]
    assert len(server.requests) == 1 and server.requests[0]["headers"]["Host"] == f"localhost:{server.port}"
