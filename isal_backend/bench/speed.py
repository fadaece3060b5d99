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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device here; use --device cpu")
    figures = measure(args.quick, args.backbone, args.batch_size, args.device)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    return 0
