"""Frozen-backbone features per image reference, cached on disk.

The backbone never changes between rounds (head training is the default), so an image's
features are computed once and a round only pays for the images it has not seen: this is what
makes "retrain on every annotation" cheap.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isal_backend.models.backbones import build_backbone, extract_features
from isal_backend.store import FeatureCache

_MODELS: dict[tuple[str, str, str, int | None], tuple[torch.nn.Module, object]] = {}
_LOCK = threading.Lock()
#: The backbone as shipped (ImageNet or random weights); fine-tuned versions are named by their round.
STOCK = "stock"


@functools.lru_cache(maxsize=262_144)
def _short_key(reference: str) -> str:
    return hashlib.sha1(reference.encode("utf-8")).hexdigest()


def cache_key(reference: str) -> str:
    """A short, stable key for an image reference (data URLs can be megabytes long).

    Short references (URLs, paths) are remembered per process: a round over 100,000 tasks hashes each once.
    """
    if len(reference) <= 2048:
        return _short_key(reference)
    return hashlib.sha1(reference.encode("utf-8")).hexdigest()


def _backbone(name: str, device: str, version: str = STOCK, weights: dict[str, torch.Tensor] | None = None,
              image_size: int | None = None):
    """The process's one copy of a backbone version (fine-tuned versions carry their weights)."""
    key = (name, device, version, image_size)
    with _LOCK:
        if key not in _MODELS:
            if version != STOCK:  # only the current fine-tuned version is kept besides the stock one
                for old in [k for k in _MODELS if k[2] != STOCK]:
                    del _MODELS[old]
            net, preprocess = build_backbone(name, image_size)
            if weights is not None:
                net.load_state_dict(weights)
            _MODELS[key] = (net.eval().to(device), preprocess)
        return _MODELS[key]


class Featurizer:
    """Features of task images by reference; failures are returned, never raised.

    ``version``/``weights``: a fine-tuned backbone (ISAL_TRAIN_MODE=finetune) with its own cache folder;
    ``image_size``: the backbone's input size (None: its native one), part of the cache folder's name;
    ``load_threads``: images loaded at once (downloads wait on the network, not the CPU; the next batch
    loads while the backbone runs on this one).
    """

    def __init__(self, backbone: str, cache_dir: str | Path, device: str = "cpu", batch_size: int = 64,
                 version: str = STOCK, weights: dict[str, torch.Tensor] | None = None,
                 image_size: int | None = None, load_threads: int = 1) -> None:
        self.backbone_name = backbone
        self.load_threads = max(1, int(load_threads))
        self.device = device
        self.batch_size = batch_size
        self.version = version
        self.weights = weights
        self.image_size = image_size
        folder = Path(cache_dir) / (backbone if image_size is None else f"{backbone}-{image_size}px")
        self.cache = FeatureCache.shared(folder if version == STOCK else folder / "finetuned" / version)

    @property
    def model(self) -> torch.nn.Module:
        return self._loaded()[0]

    def _loaded(self):
        return _backbone(self.backbone_name, self.device, self.version, self.weights, self.image_size)

    def drop_other_versions(self) -> None:
        """Delete the feature caches of fine-tuned backbones other than this one (they are never read again)."""
        folder = self.cache.folder.parent if self.version != STOCK else self.cache.folder / "finetuned"
        if not folder.is_dir():
            return
        for old in folder.iterdir():
            if old != self.cache.folder:
                shutil.rmtree(old, ignore_errors=True)

    def missing(self, references: list[str]) -> list[str]:
        """The references (deduplicated) whose features are not cached yet."""
        unique = list(dict.fromkeys(references))
        present = self.cache.contains([cache_key(r) for r in unique])
        return [r for r, there in zip(unique, present, strict=True) if not there]

    def compute(self, references: list[str], load: Callable[[str], Image.Image]) -> dict[str, str]:
        """Extract and cache the features of ``references``; returns a reason for each one that failed."""
        failures: dict[str, str] = {}
        if not references:
            return failures
        net, preprocess = self._loaded()
        size = preprocess.size

        def pixels(ref: str) -> np.ndarray | str:
            try:
                image = load(ref).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except Exception as exc:  # noqa: BLE001 - every failure is reported per image
                return f"{type(exc).__name__}: {exc}"
            return np.asarray(image, dtype=np.uint8)

        batches = [references[i : i + self.batch_size] for i in range(0, len(references), self.batch_size)]
        pool = ThreadPoolExecutor(self.load_threads, thread_name_prefix="isal-load") if self.load_threads > 1 else None

        def loading(batch: list[str]) -> list[Future[np.ndarray | str]] | list[np.ndarray | str]:
            return [pool.submit(pixels, ref) for ref in batch] if pool is not None else [pixels(r) for r in batch]

        try:
            ahead = loading(batches[0])
            for n, batch in enumerate(batches):
                loaded = [f.result() if isinstance(f, Future) else f for f in ahead]
                if n + 1 < len(batches):
                    ahead = loading(batches[n + 1])  # at most two batches of pixels in memory
                batch_refs, arrays = [], []
                for ref, got in zip(batch, loaded, strict=True):
                    if isinstance(got, str):
                        failures[ref] = got
                    else:
                        batch_refs.append(ref)
                        arrays.append(got)
                if not arrays:
                    continue
                feats = extract_features(net, preprocess, torch.from_numpy(np.stack(arrays)),
                                         batch_size=self.batch_size, device=self.device)
                self.cache.put_many([cache_key(r) for r in batch_refs], feats)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return failures

    def __call__(
        self, references: list[str], load: Callable[[str], Image.Image]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Features for each reference (by reference) and a reason for each one that failed."""
        failures = self.compute(self.missing(references), load)
        keys = {ref: cache_key(ref) for ref in references}
        cached = self.cache.get_many(list(set(keys.values())))
        return {ref: cached[key] for ref, key in keys.items() if key in cached}, failures

    def matrix(self, references: list[str], load: Callable[[str], Image.Image]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                           dict[str, str]]:
        """The features of ``references`` as one matrix (a row each, zeros where the image failed), the mask of
        rows that have features, and a reason for each reference that failed."""
        failures = self.compute(self.missing(references), load)
        rows, found = self.cache.matrix([cache_key(r) for r in references], self.model.feature_dim)
        return rows, found, failures
