"""``bench speed``: ISAL scoring throughput next to its baseline, measured in the same run.

The machines are shared and noisy, so every figure that has a baseline is measured interleaved
with it (A, B, A, B, ...) and reported as the median of the repeats:

* ``forward_samples_per_s``: the bare forward pass of the classifier (no_grad, eval);
* ``isal_head_samples_per_s``: ISAL head-mode scores from pixels (the same forward, then the
  closed form); ``ratio_head_vs_forward`` is the one to watch (target >= 0.8);
* ``cached_samples_per_s``: scores from cached features (C=10, d=512);
* ``full_param_samples_per_s``: the authors' parameter set (all conv and linear weights) through
  forward-mode ``torch.func`` (``jvp``); ``full_param_per_sample_samples_per_s``: the same scores
  through explicit per-sample gradients (the authors' way);
* ``s_test_seconds``: exact head ``s_test`` by conjugate gradient for 10,000 labeled samples.

Detection (``--task detection``): the FCOS detector's bare forward pass against ISAL scoring (the forward
with detection post-processing, pseudo-labels, location matching and ``s^T G_z`` over the final convs by
one forward-mode pass through them), interleaved, on the same images: ``ratio_isal_vs_forward`` (target
>= 0.8). The pseudo-label threshold is low (0.05) on purpose: an untrained detector's boxes all score
about 0.07, so every image brings up to 100 pseudo boxes, the most expensive case for matching. Second
figure: what the round's disk cache of the frozen body's outputs saves (a round's training and pool pass
with an empty cache, the baseline, and with the cache the first pass left on disk).
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

from isal_backend.bench.voc import load_bccd
from isal_backend.detection.detector import DetectorConfig, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence
from isal_backend.influence import (
    AutogradInfluence,
    HeadInfluence,
    LinearHead,
    conjugate_gradient,
    fit_linear_head,
    score_head,
    select_parameters,
)
from isal_backend.models.backbones import Classifier, build_backbone
from isal_backend.settings import Settings
from isal_backend.store import TensorListCache
from isal_backend.tasks.detection import detector_config


def _throughput(fn: Callable[[], None], samples: int) -> float:
    start = time.perf_counter()
    fn()
    return samples / (time.perf_counter() - start)


def synthetic_features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with a learnable but noisy class structure (labels from a random linear teacher)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen) / dim**0.5
    logits = 3 * x @ teacher + torch.randn(n, classes, generator=gen)
    return x, logits.argmax(dim=1)


def measure(quick: bool, backbone: str, batch_size: int, device: str) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    classes, repeats = 10, 3 if quick else 7
    batches = 2 if quick else 6
    net, preprocess = build_backbone(backbone)
    model = Classifier(net, classes).eval().to(device)
    images = torch.randint(0, 256, (batches * batch_size, 32, 32, 3), dtype=torch.uint8)
    inputs = [preprocess(images[i : i + batch_size]).to(device) for i in range(0, images.shape[0], batch_size)]
    n_images = images.shape[0]

    # s_test for the head: from features of a labeled set (synthetic features, same shapes).
    feat_dim = net.feature_dim
    xl, yl = synthetic_features(2_000 if quick else 10_000, feat_dim, classes, seed=1)
    head = fit_linear_head(xl.double(), yl, classes, weight_decay=1e-3, max_iter=100)
    xr, yr = synthetic_features(500, feat_dim, classes, seed=2)
    problem = HeadInfluence(head, xl.double(), xr.double(), yr, xr, weight_decay=1e-3)
    start = time.perf_counter()
    s_test, report = conjugate_gradient(problem, problem.reference_gradient(), tol=1e-6)
    s_test_seconds = time.perf_counter() - start
    s_matrix = s_test.view_as(head.weight).float().to(device)
    head32 = LinearHead(head.weight.float().to(device))
    with torch.no_grad():
        model.head.weight.copy_(head32.weight[:, :-1])
        model.head.bias.copy_(head32.weight[:, -1])

    @torch.no_grad()
    def forward() -> None:
        for x in inputs:
            model(x)

    @torch.no_grad()
    def isal_head() -> None:
        for x in inputs:
            score_head(head32, s_matrix, model.features(x), top_k=1)

    forward()  # warm-up
    fwd, isal = [], []
    for _ in range(repeats):
        fwd.append(_throughput(forward, n_images))
        isal.append(_throughput(isal_head, n_images))

    pool = torch.randn(100_000 if quick else 1_000_000, 512)
    head512 = LinearHead(torch.randn(classes, 513) * 0.1)
    s512 = torch.randn(classes, 513)
    cached = [
        _throughput(lambda: [score_head(head512, s512, pool[i : i + 65536], 1) for i in range(0, len(pool), 65536)],
                    len(pool))
        for _ in range(repeats)
    ]

    full_inputs = inputs[0][: 16 if quick else batch_size]
    names = select_parameters(model, "all-conv-linear")
    labels = torch.zeros(full_inputs.shape[0], dtype=torch.long)
    full = AutogradInfluence(model, names, full_inputs, labels, full_inputs, labels, full_inputs, batch_size=batch_size)
    direction = torch.randn(full.dim, generator=torch.Generator().manual_seed(3)).to(device)
    full.score(direction)  # warm-up
    jvp_rate = statistics.median(
        _throughput(lambda: full.score(direction), full_inputs.shape[0]) for _ in range(max(1, repeats // 2))
    )
    few = full_inputs[:4]
    full.method = "per_sample"
    per_sample_rate = _throughput(lambda: full.score_inputs(direction, few), few.shape[0])

    forward_rate = statistics.median(fwd)
    head_rate = statistics.median(isal)
    return {
        "device": device,
        "backbone": backbone,
        "batch_size": batch_size,
        "image_size": preprocess.size,
        "threads": torch.get_num_threads(),
        "forward_samples_per_s": round(forward_rate, 2),
        "isal_head_samples_per_s": round(head_rate, 2),
        "ratio_head_vs_forward": round(head_rate / forward_rate, 4),
        "cached_samples_per_s": round(statistics.median(cached), 1),
        "full_param_samples_per_s": round(jvp_rate, 3),
        "full_param_per_sample_samples_per_s": round(per_sample_rate, 3),
        "full_param_dim": full.dim,
        "s_test_seconds": round(s_test_seconds, 4),
        "s_test_labeled": xl.shape[0],
        "s_test_cg_iterations": report.iterations,
        "s_test_relative_residual": report.relative_residual or 0.0,
    }


def _images(n: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], str]:
    """BCCD test images at 320 px when the archive is there, else seeded noise of the same size."""
    try:
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
        forward.append(_throughput(lambda: model.predict(pool, batch_size), n))
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
    config = detector_config(3, Settings())  # the round's detector

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
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device here; use --device cpu")
    if args.task == "detection":
        figures = {**measure_detection_speed(quick=args.quick, device=args.device), **measure_body_cache(args.quick)}
    else:
        figures = measure(args.quick, args.backbone, args.batch_size, args.device)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    return 0
