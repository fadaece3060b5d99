"""Decode task images safely, with errors that name the image but never leak credentials."""

from __future__ import annotations

import io
import warnings
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats an annotator's browser shows and Pillow decodes; anything else (SVG, PDF, EPS, ...) is refused.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# 50 Mpx: far above any image a classifier needs, far below what would exhaust memory (a decompression bomb).
DEFAULT_MAX_PIXELS = 50_000_000
# Query parameters that are paths, not secrets: LS local-files storage puts the file path in ?d=.
_PUBLIC_QUERY_KEYS = {"d"}


class ImageLoadError(ValueError):
    """An image could not be decoded; the message names the (redacted) source."""


def safe_source(source: str, limit: int = 200) -> str:
    """`source` fit for logs and errors: no userinfo, no fragment, no query values (presigned URLs carry tokens
    there; a query item without ``=`` is all value), except local-files storage's ``d`` path."""
    if source.startswith("data:"):
        header = source[5:].split(",", 1)[0]
        return f"data:{header[:60]},... ({len(source)} chars)"
    try:
        parts = urlsplit(source)
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal keeps its brackets
            netloc = f"[{netloc}]"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        cleaned = urlunsplit((parts.scheme, netloc, parts.path, _redacted_query(parts.query), ""))
    except ValueError:
        cleaned = "<unparseable reference>"
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _redacted_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        if not item:
            continue
        if "=" not in item:  # a bare item is all value
            items.append("REDACTED")
            continue
        key, value = (parse_qsl(item, keep_blank_values=True) or [("", "")])[0]
        items.append(urlencode([(key, value if key in _PUBLIC_QUERY_KEYS else "REDACTED")], safe="/"))
    return "&".join(items)


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image, upright as the annotator saw it (EXIF orientation applied)."""
    where = safe_source(source)
    if not data:
        raise ImageLoadError(f"image {where} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make every bomb an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(f"image {where} is too large: {width}x{height} pixels exceeds {max_pixels} "
                                     "(possible decompression bomb)")
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"image {where} is not in a supported format ({', '.join(SUPPORTED_FORMATS)}) "
                             f"or is corrupt ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"image {where} is too large (possible decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"image {where} is corrupt or truncated: {exc}") from None
