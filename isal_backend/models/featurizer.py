"""Frozen-backbone features per image reference, cached on disk.

The backbone never changes between rounds (head training is the default), so an image's
features are computed once and a round only pays for the images it has not seen: this is what
makes "retrain on every annotation" cheap.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isal_backend.models.backbones import build_backbone, extract_features
from isal_backend.store import FeatureCache

_MODELS: dict[tuple[str, str], tuple[torch.nn.Module, object]] = {}
_LOCK = threading.Lock()


def cache_key(reference: str) -> str:
    """A short, stable key for an image reference (data URLs can be megabytes long)."""
    return hashlib.sha1(reference.encode("utf-8")).hexdigest()


def _backbone(name: str, device: str):
    with _LOCK:
        if (name, device) not in _MODELS:
            net, preprocess = build_backbone(name)
            _MODELS[(name, device)] = (net.eval().to(device), preprocess)
        return _MODELS[(name, device)]


class Featurizer:
    """Features of task images by reference; failures are returned, never raised."""

    def __init__(self, backbone: str, cache_dir: str | Path, device: str = "cpu", batch_size: int = 64) -> None:
        self.backbone_name = backbone
        self.device = device
        self.batch_size = batch_size
        self.cache = FeatureCache(Path(cache_dir) / backbone)

    @property
    def model(self) -> torch.nn.Module:
        return _backbone(self.backbone_name, self.device)[0]

    def missing(self, references: list[str]) -> list[str]:
        """The references (deduplicated) whose features are not cached yet."""
        unique = list(dict.fromkeys(references))
        cached = self.cache.get_many([cache_key(r) for r in unique])
        return [r for r in unique if cache_key(r) not in cached]

    def __call__(
        self, references: list[str], load: Callable[[str], Image.Image]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Features for each reference (by reference) and a reason for each one that failed."""
        keys = {ref: cache_key(ref) for ref in references}
        cached = self.cache.get_many(list(set(keys.values())))
        out = {ref: cached[key] for ref, key in keys.items() if key in cached}
        missing = [ref for ref in dict.fromkeys(references) if ref not in out]
        failures: dict[str, str] = {}
        if missing:
            net, preprocess = _backbone(self.backbone_name, self.device)
            for start in range(0, len(missing), self.batch_size):
                batch_refs, arrays = [], []
                for ref in missing[start : start + self.batch_size]:
                    try:
                        image = load(ref).convert("RGB").resize((preprocess.size, preprocess.size),
                                                                Image.Resampling.BILINEAR)
                    except Exception as exc:  # noqa: BLE001 - every failure is reported per image
                        failures[ref] = f"{type(exc).__name__}: {exc}"
                        continue
                    batch_refs.append(ref)
                    arrays.append(np.asarray(image, dtype=np.uint8))
                if not arrays:
                    continue
                feats = extract_features(net, preprocess, torch.from_numpy(np.stack(arrays)),
                                         batch_size=self.batch_size, device=self.device)
                self.cache.put_many([keys[r] for r in batch_refs], feats)
                out.update(zip(batch_refs, feats, strict=True))
        return out, failures
