"""The featurizer loads several images at once (downloads wait on the network, not the CPU) and gives the
same features, and the same per-image failures, as one image at a time."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isal_backend.bench.datasets import png_bytes
from isal_backend.models.featurizer import Featurizer, cache_key


class SlowSource:
    """Images behind a 20 ms 'network', counting how many loads are in flight at once."""

    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(0)
        self.blobs = {f"img-{i}": png_bytes(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(count)}
        self.blobs["img-broken"] = b"not an image"
        self.lock = threading.Lock()
        self.inflight = 0
        self.most = 0

    def __call__(self, reference: str) -> Image.Image:
        with self.lock:
            self.inflight += 1
            self.most = max(self.most, self.inflight)
        try:
            time.sleep(0.02)
            return Image.open(io.BytesIO(self.blobs[reference]))
        finally:
            with self.lock:
                self.inflight -= 1


def features(tmp_path: Path, threads: int, refs: list[str], source: SlowSource) -> tuple[torch.Tensor, dict]:
    featurizer = Featurizer("small-cnn", tmp_path / f"threads{threads}", batch_size=16, load_threads=threads)
    failures = featurizer.compute(refs, source)
    rows, found = featurizer.cache.matrix([cache_key(r) for r in refs], featurizer.model.feature_dim)
    return rows[found], failures


def test_loading_at_once_gives_the_same_features_and_failures(tmp_path: Path) -> None:
    refs = [f"img-{i}" for i in range(40)] + ["img-broken", "img-missing"]
    one, parallel = SlowSource(40), SlowSource(40)
    rows_one, failures_one = features(tmp_path, 1, refs, one)
    rows_many, failures_many = features(tmp_path, 4, refs, parallel)
    assert rows_one.shape == (40, rows_one.shape[1]) and torch.equal(rows_one, rows_many)
    assert set(failures_one) == set(failures_many) == {"img-broken", "img-missing"}
    assert "UnidentifiedImageError" in failures_many["img-broken"]
    assert "KeyError" in failures_many["img-missing"]
    assert one.most == 1 and 1 < parallel.most <= 4  # the next batch loads while the backbone runs


def test_an_empty_list_loads_nothing(tmp_path: Path) -> None:
    source = SlowSource(1)
    assert Featurizer("small-cnn", tmp_path, load_threads=4).compute([], source) == {} and source.most == 0
