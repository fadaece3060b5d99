"""Small JPEG thumbnails of the tasks at the head of a project's stream, for the dashboard.

The round makes them after it commits (:meth:`isal_backend.round.Round.run`), from bytes it already
has or can read once: a detection project's image cache, else the datastore. The dashboard serves them
by key only, so a page never names an image URL (presigned URLs carry their signature in the query).

Layout: ``MODEL_DIR/projects/<id>/thumbnails/<key>.jpg``, ``key`` a hash of the image reference; made
once per image, written atomically, the least recently used dropped past :data:`KEEP`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from isal_backend.labelstudio.images import decode_image

log = logging.getLogger(__name__)

FOLDER = "thumbnails"
SIZE = 96  # pixels, the long side
KEEP = 240  # thumbnails per project (20 rounds of entirely new stream heads)
KEY = re.compile(r"[0-9a-f]{40}")


def thumbnail_key(reference: str) -> str:
    """The thumbnail's name: a hash of the image reference (never the reference itself)."""
    return hashlib.blake2b(reference.encode(), digest_size=20, person=b"isal-thumb").hexdigest()


class Thumbnails:
    """One project's thumbnails folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def of_project(cls, project_dir: str | Path) -> Thumbnails:
        return cls(Path(project_dir) / FOLDER)

    def path(self, key: str) -> Path | None:
        """The thumbnail's file, or None for a malformed key or one not made (yet)."""
        if not KEY.fullmatch(key):
            return None
        path = self.folder / f"{key}.jpg"
        return path if path.is_file() else None

    def ensure(self, references: Iterable[str], read: Callable[[str], bytes]) -> dict[str, int]:
        """Make the missing thumbnails of ``references`` from ``read(reference)`` bytes; never raises for an image.

        Returns ``{"made", "kept", "failed"}``. Thumbnails already there are touched, so the pruning keeps them.
        """
        counts = {"made": 0, "kept": 0, "failed": 0}
        self.folder.mkdir(parents=True, exist_ok=True)
        for reference in references:
            path = self.folder / f"{thumbnail_key(reference)}.jpg"
            if path.exists():
                with contextlib.suppress(OSError):
                    os.utime(path)
                counts["kept"] += 1
                continue
            try:
                self._write(path, make_thumbnail(read(reference), reference))
                counts["made"] += 1
            except Exception as exc:  # noqa: BLE001 - a missing thumbnail only shows a placeholder
                log.info("no thumbnail for an image: %s", exc)
                counts["failed"] += 1
        self.prune()
        return counts

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def prune(self, keep: int = KEEP) -> int:
        """Drop the least recently used thumbnails past ``keep``; returns how many."""
        files = []
        for path in self.folder.glob("*.jpg"):
            with contextlib.suppress(OSError):
                files.append((path.stat().st_mtime_ns, path))
        files.sort(reverse=True)
        for _, path in files[keep:]:
            with contextlib.suppress(OSError):
                path.unlink()
        return max(0, len(files) - keep)


def make_thumbnail(data: bytes, reference: str, size: int = SIZE) -> bytes:
    """JPEG bytes of the image shrunk to ``size`` pixels on its long side (never enlarged), decoded safely."""
    image = decode_image(data, reference)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
