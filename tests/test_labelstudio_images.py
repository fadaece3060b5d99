"""Image decoding: formats, orientation, and every bad input names its (redacted) source."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from isal_backend.labelstudio.images import ImageLoadError, decode_image, safe_source


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "JPEG"), ("P", "GIF"),
                                           ("RGB", "WEBP"), ("RGB", "BMP")])
def test_decodes_common_formats_to_rgb(mode: str, fmt: str) -> None:
    out = decode_image(_encode(Image.new(mode, (7, 5)), fmt), "/data/upload/1/x")
    assert out.mode == "RGB"
    assert out.size == (7, 5)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the browser shows it upright, so must we
    out = decode_image(_encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif), "x.jpg")
    assert out.size == (20, 40)


def test_corrupt_and_truncated_and_empty() -> None:
    png = _encode(Image.new("RGB", (64, 64), "red"), "PNG")
    with pytest.raises(ImageLoadError, match="not in a supported format"):
        decode_image(b"definitely not an image", "https://cdn.example.com/a.png")
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        decode_image(png[: len(png) // 2], "/data/upload/1/half.png")
    with pytest.raises(ImageLoadError, match="empty"):
        decode_image(b"", "/data/upload/1/empty.png")


def test_unsupported_format() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    with pytest.raises(ImageLoadError, match="not in a supported format"):
        decode_image(svg, "/data/upload/1/a.svg")
    with pytest.raises(ImageLoadError, match="not in a supported format"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "ICO"), "/data/upload/1/a.ico")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _encode(Image.new("1", (12_000, 12_000)), "PNG")  # 144 Mpx, a few KB on disk
    assert len(bomb) < 200_000
    with pytest.raises(ImageLoadError, match="too large") as err:
        decode_image(bomb, "/data/upload/1/bomb.png")
    assert "bomb.png" in str(err.value)
    with pytest.raises(ImageLoadError, match="too large"):
        decode_image(_encode(Image.new("RGB", (100, 100)), "PNG"), "small.png", max_pixels=5_000)


def test_errors_name_the_source_without_secrets() -> None:
    src = "https://user:pw@bucket.s3.amazonaws.com/imgs/cat.png?X-Amz-Signature=SECRETSIG&X-Amz-Credential=AKIA"
    with pytest.raises(ImageLoadError) as err:
        decode_image(b"junk", src)
    message = str(err.value)
    assert "bucket.s3.amazonaws.com/imgs/cat.png" in message
    for secret in ("SECRETSIG", "AKIA", "pw", "user:"):
        assert secret not in message


def test_safe_source() -> None:
    assert safe_source("/data/local-files/?d=imgs/a.png") == "/data/local-files/?d=imgs/a.png"
    assert safe_source("http://h/x.png?token=abc&d=p/q") == "http://h/x.png?token=REDACTED&d=p/q"
    assert safe_source("http://h/x.png?SECRETTOKEN&a=") == "http://h/x.png?REDACTED&a=REDACTED"  # bare item: a value
    assert safe_source("http://u:pw@[::1]:8080/x.png#access_token=T") == "http://[::1]:8080/x.png"
    data_url = "data:image/png;base64," + "A" * 5000
    assert safe_source(data_url).startswith("data:image/png;base64,...")
    assert len(safe_source(data_url)) < 80
    assert len(safe_source("http://h/" + "x" * 1000)) == 200


def test_package_does_not_import_torch() -> None:
    code = ("import sys, isal_backend.labelstudio, isal_backend.labelstudio.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
