"""``bench loop --images static``: the tasks' images on a loopback static server, fetched through the same
guarded image client the rounds use, allowed only because the run lists 127.0.0.1 (as a user lists an
internal image host)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isal_backend.bench.loop import write_images
from isal_backend.bench.stack import start_static_server
from isal_backend.labelstudio.fetch import DownloadPolicy, FetchRefused, image_client


def test_static_server_serves_the_written_images_to_an_allowed_image_client(tmp_path: Path) -> None:
    root = tmp_path / "files"
    labels = np.array([0, 1, 1])
    root.mkdir()
    server = start_static_server(root, tmp_path / "static.log")
    try:
        refs = write_images(root, labels, base_url=server.url)
        assert refs == [f"{server.url}/bench/000/{i}.png" for i in range(3)]
        with image_client(DownloadPolicy(allowed=("127.0.0.1",))) as client:
            for ref, label in zip(refs, labels.tolist(), strict=True):
                answer = client.get(ref)
                assert answer.status_code == 200
                pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=float)
                red, blue = pixels[..., 0].mean(), pixels[..., 2].mean()
                assert (red > blue) == (label == 0), (ref, red, blue)  # the class is the dominant channel
        with image_client(DownloadPolicy()) as client, pytest.raises(FetchRefused, match="127.0.0.1"):
            client.get(refs[0])  # without the allowlist entry, loopback stays refused
    finally:
        server.stop()


def test_local_files_references_by_default(tmp_path: Path) -> None:
    assert write_images(tmp_path, np.array([1, 0])) == ["/data/local-files/?d=bench/000/0.png",
                                                        "/data/local-files/?d=bench/000/1.png"]
