"""``bench speed --task detection``: ISAL scoring throughput against the detector's bare forward pass.

Both are measured in the same process on the same images, interleaved (forward, ISAL, forward, ...)
so machine load hits both alike; the median of the repeats is reported. The detector is the default
one (EfficientNet-Lite0 FPN FCOS at 320 px, nothing cached). ISAL scoring = the forward pass with
detection post-processing, pseudo-labels, location matching and ``s^T G_z`` over the final convs by
one forward-mode pass through them: the target is ``ratio_isal_vs_forward >= 0.8``.

The pseudo-label threshold is set low (0.05) on purpose: an untrained detector's boxes all score
about 0.07, so every image brings up to 100 pseudo boxes, the most expensive case for matching.

Second figure: what the round's disk cache of the frozen body's outputs saves. The round's own
detector (body frozen) trains ``steps`` mini-batches and predicts a pool, once with an empty cache
(the baseline: every image through the backbone, as in a project's first round) and once with the
cache the first pass left on disk (a later round on the same images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from isal_backend.detection.bench_al import BENCH_DETECTOR
from isal_backend.detection.detector import DetectorConfig, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence
from isal_backend.store import TensorListCache


def _rate(fn: Callable[[], object], samples: int) -> float:
    start = time.perf_counter()
    fn()
    return samples / (time.perf_counter() - start)


def _images(n: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], str]:
    """BCCD test images at 320 px when the archive is there, else seeded noise of the same size."""
    try:
        from isal_backend.detection.voc import load_bccd

        data = load_bccd(max_side=320, limit=n + 4)
        return data.images, data.targets, "bccd"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        images = [(torch.rand(3, 240, 320, generator=g) * 255).to(torch.uint8) for _ in range(n + 4)]
        targets = [{"boxes": torch.tensor([[40.0, 40.0, 120.0, 110.0]]), "labels": torch.tensor([0])}] * (n + 4)
        return images, targets, "synthetic"


def measure_detection_speed(quick: bool = False, device: str = "cpu", batch_size: int = 8) -> dict[str, object]:
    """Throughput of the bare forward and of ISAL scoring, and their ratio (JSON-ready)."""
    if device != "cpu":
        raise ValueError("detection speed is measured on the CPU")
    n = 8 if quick else 24
    repeats = 2 if quick else 3
    images, targets, source = _images(n)
    model = build_detector(DetectorConfig(num_classes=3), seed=0).eval()
    problem = DetectionInfluence(model, images[n:], targets[n:], images[n:], targets[n:], score_threshold=0.05,
                                 damping=0.01, batch_size=batch_size)
    s_test = problem.reference_gradient()
    pool = images[:n]
    model.predict(pool[:2], batch_size)  # warm-up: first calls allocate
    problem.score_images(s_test, pool[:2])
    forward, isal = [], []
    boxes = 0.0
    for _ in range(repeats):
        forward.append(_rate(lambda: model.predict(pool, batch_size), n))
        start = time.perf_counter()
        result = problem.score_images(s_test, pool)
        isal.append(n / (time.perf_counter() - start))
        boxes = float(result.num_boxes.float().mean())
    f, i = statistics.median(forward), statistics.median(isal)
    return {
        "task": "detection",
        "detector": "FCOS, EfficientNet-Lite0 FPN (64 ch), 320 px",
        "images": source,
        "samples": n,
        "repeats": repeats,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "influence_params": problem.dim,
        "pseudo_boxes_per_image": round(boxes, 1),
        "forward_samples_per_s": round(f, 3),
        "isal_samples_per_s": round(i, 3),
        "ratio_isal_vs_forward": round(i / f, 4),
    }


def measure_body_cache(quick: bool = False) -> dict[str, object]:
    """Seconds for a round's training and pool pass with an empty body cache and with a warm one."""
    train_n, pool_n, steps = (8, 8, 5) if quick else (40, 100, 60)
    images, targets, source = _images(train_n + pool_n)
    config = DetectorConfig(num_classes=3, **BENCH_DETECTOR)

    def one_round(cache: TensorListCache) -> float:
        model = build_detector(config, seed=0)
        model.backbone.cache = cache
        start = time.perf_counter()
        train_detector(model, images[:train_n], targets[:train_n], steps, batch_size=4, seed=1)
        model.predict(images[train_n : train_n + pool_n])
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        empty = TensorListCache(folder, max_bytes=2**40)
        cold = one_round(empty)
        stored = empty.flush()
        warm = one_round(TensorListCache(folder, max_bytes=2**40))
        disk = sum(p.stat().st_size for p in Path(folder).glob("chunk-*.pt"))
    return {
        "round_images": source, "round_train_images": train_n, "round_pool_images": pool_n, "round_steps": steps,
        "round_seconds_empty_body_cache": round(cold, 2), "round_seconds_warm_body_cache": round(warm, 2),
        "round_speedup_from_body_cache": round(cold / warm, 2), "body_cache_entries": stored,
        "body_cache_kib_per_entry": round(disk / max(1, stored) / 1024, 1),
    }


def main(args: argparse.Namespace) -> int:
    """``bench speed --task detection``: write the JSON, print the figures."""
    figures = {**measure_detection_speed(quick=args.quick, device=args.device), **measure_body_cache(args.quick)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover - manual runs; the CLI wires measure_detection_speed
    import sys

    torch.set_num_threads(2)
    print(json.dumps(measure_detection_speed(quick="--quick" in sys.argv), indent=2))
