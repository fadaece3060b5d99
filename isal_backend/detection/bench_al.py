"""``bench al --dataset bccd|PATH`` for detection: ISAL against random and mean-confidence on FCOS.

Protocol per seed: a random start of the pool (shared by every strategy, and so is the first
trained model: comparisons are paired), then ``cycles`` rounds of: let the strategy pick ``budget``
pool images, label them (their ground-truth boxes), continue training the SAME detector on the grown
set (warm start), measure mAP@0.5 on the test split. Costs are counted in images and in boxes. Every
strategy's evaluated detector trains on all its labeled images with the same recipe, so the curves
compare which images were picked, nothing else.

To fit 3 seeds x 3 strategies into about 30 minutes on 2 CPU cores the benchmark's detector keeps
the EfficientNet-Lite0 body FROZEN and caches its features per image (the backbone then runs once
per image and flip, not once per step); FPN, towers and prediction convs train (the backend's
round uses the same detector).

Strategies:

* ``isal``: as the backend runs it. R is the stable held-out slice of the labeled images
  (:func:`~isal_backend.detection.selection.stable_reference`); the scoring detector is a second,
  warm-started chain trained on the labeled images outside R only; s_test by block-preconditioned CG
  on the Gauss-Newton curvature; most negative influence first.
* ``isal-train-ref``: R is the whole labeled set and the evaluated detector scores (no second chain).
  Not a valid influence estimate in the textbook sense (R was trained on), kept to measure what
  holding R out costs or gains.
* ``isal-balanced``: ``isal``'s scores, the batch filled round-robin over each image's rarest
  predicted class (:func:`~isal_backend.detection.selection.rarest_class_groups`).
* ``random``; ``mean-confidence`` (lowest mean post-NMS detection score first).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from isal_backend.bench.report import area_under_curve, mean_std, paired
from isal_backend.detection.detector import DetectorConfig, LiteFCOS, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence, solve_detection_s_test
from isal_backend.detection.metrics import mean_average_precision
from isal_backend.detection.selection import order_by_mean_confidence, rarest_class_groups, stable_reference
from isal_backend.detection.voc import DetectionDataset, load_bccd, load_voc
from isal_backend.strategies.isal import balanced_order

STRATEGIES = ("isal", "random", "mean-confidence", "isal-train-ref", "isal-balanced")
DEFAULT_STRATEGIES = ("isal", "random", "mean-confidence")
#: Strategies that score with a second detector chain trained without R (as the backend does).
HELD_OUT_R = ("isal", "isal-balanced")
FIELDS = ("strategy", "seed", "images", "boxes", "map50")


@dataclass(frozen=True)
class DetectionProtocol:
    start: int = 20
    budget: int = 20
    cycles: int = 4
    first_steps: int = 150
    round_steps: int = 60
    batch_size: int = 4
    pool_limit: int | None = None
    test_limit: int | None = None
    cg_iterations: int = 30
    damping: float = 0.01
    score_threshold: float = 0.5
    reference_fraction: float = 0.2


DEFAULT = DetectionProtocol()
QUICK = DetectionProtocol(start=8, budget=8, cycles=2, first_steps=25, round_steps=10, pool_limit=48, test_limit=16,
                          cg_iterations=10)
BENCH_DETECTOR = {"image_size": 320, "fpn_channels": 64, "head_convs": 2, "freeze_blocks": -1, "cache_body": True}


def load_dataset(dataset: str, image_size: int) -> tuple[DetectionDataset, list[int], list[int]]:
    """``bccd`` or a VOC folder/archive; splits trainval/test when present, else a seeded 80/20 split."""
    data = load_bccd(max_side=image_size) if dataset == "bccd" else load_voc(dataset, max_side=image_size)
    if "test" in data.splits and ("trainval" in data.splits or "train" in data.splits):
        pool = data.splits.get("trainval") or data.splits["train"]
        return data, list(pool), list(data.splits["test"])
    order = np.random.default_rng(0).permutation(len(data)).tolist()
    cut = max(1, len(order) // 5)
    return data, sorted(order[cut:]), sorted(order[:cut])


def _evaluate(model: LiteFCOS, data: DetectionDataset, test: Sequence[int]) -> float:
    preds = model.predict([data.images[i] for i in test])
    return float(mean_average_precision(preds, [data.targets[i] for i in test], len(data.classes))["map"])


def _select(
    strategy: str,
    model: LiteFCOS,
    scorer: LiteFCOS | None,
    data: DetectionDataset,
    labeled: list[int],
    pool: list[int],
    protocol: DetectionProtocol,
    rng: np.random.Generator,
    salt: int,
) -> tuple[list[int], dict[str, float]]:
    """The ``budget`` pool indices the strategy labels next, and what it cost.

    ``scorer`` is ``isal``'s detector trained without R; the other strategies look at ``model``.
    """
    start = time.perf_counter()
    info: dict[str, float] = {}
    if strategy == "random":
        order = rng.permutation(len(pool))
    elif strategy == "mean-confidence":
        order = order_by_mean_confidence(model.predict([data.images[i] for i in pool]))
    elif strategy in (*HELD_OUT_R, "isal-train-ref"):
        if strategy in HELD_OUT_R:
            if scorer is None:
                raise ValueError(f"{strategy} needs its scoring detector trained without the reference set")
            train, ref = _split_reference(labeled, protocol, salt)
        else:
            scorer, train, ref = model, labeled, labeled
        problem = DetectionInfluence(scorer, [data.images[i] for i in train], [data.targets[i] for i in train],
                                     [data.images[i] for i in ref], [data.targets[i] for i in ref],
                                     score_threshold=protocol.score_threshold, damping=protocol.damping)
        s_test, report = solve_detection_s_test(problem, "cg", max_iter=protocol.cg_iterations)
        result = problem.score_images(s_test, [data.images[i] for i in pool])
        order = np.argsort(result.scores.numpy(), kind="stable")
        if strategy == "isal-balanced":
            counts = np.bincount(torch.cat([data.targets[i]["labels"] for i in labeled]).numpy(),
                                 minlength=len(data.classes))
            groups = rarest_class_groups(result.detections, counts.tolist(), protocol.score_threshold)
            order = balanced_order(result.scores, groups, len(pool), salt)
        info = {"cg_residual": float(report.relative_residual or 0.0), "no_box": int(result.no_box.sum()),
                "reference": len(ref)}
    else:
        raise ValueError(f"unknown detection strategy {strategy!r}: choose from {STRATEGIES}")
    info["select_seconds"] = time.perf_counter() - start
    return [pool[int(j)] for j in order[: protocol.budget]], info


def _split_reference(labeled: list[int], protocol: DetectionProtocol, salt: int) -> tuple[list[int], list[int]]:
    """(train, R) of the labeled indices, by the backend's stable rule."""
    train_pos, ref_pos = stable_reference(labeled, protocol.reference_fraction, salt)
    return [labeled[i] for i in train_pos], [labeled[i] for i in ref_pos]


def _train_outside_reference(model: LiteFCOS, data: DetectionDataset, labeled: list[int], steps: int,
                             protocol: DetectionProtocol, salt: int, seed: int) -> None:
    """Train the scoring detector on the labeled images outside R (warm start, in place)."""
    train, _ = _split_reference(labeled, protocol, salt)
    train_detector(model, [data.images[i] for i in train], [data.targets[i] for i in train], steps,
                   protocol.batch_size, seed=seed)


def _boxes(data: DetectionDataset, idx: Sequence[int]) -> int:
    return int(sum(len(data.targets[i]["labels"]) for i in idx))


def run_detection_al(
    dataset: str = "bccd",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    seeds: int | Sequence[int] = 3,
    out: str | Path = "bench-out/det-al",
    quick: bool = False,
    device: str = "cpu",
    protocol: DetectionProtocol | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Run the benchmark, write curves.csv, curves.png and summary.json under ``out``; return the summary."""
    if device != "cpu":
        raise ValueError("the detection benchmark runs on the CPU (the cached features live there)")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown detection strategies {unknown}: choose from {STRATEGIES}")
    protocol = protocol or (QUICK if quick else DEFAULT)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, pool_all, test = load_dataset(dataset, BENCH_DETECTOR["image_size"])
    pool_all = pool_all[: protocol.pool_limit] if protocol.pool_limit else pool_all
    test = test[: protocol.test_limit] if protocol.test_limit else test
    config = DetectorConfig(num_classes=len(data.classes), **BENCH_DETECTOR)
    base = build_detector(config, seed=0)
    cache = base.backbone.cache
    rows: list[dict[str, object]] = []
    timings: dict[str, list[dict[str, float]]] = {s: [] for s in strategies}

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    log(f"{dataset}: pool {len(pool_all)}, test {len(test)}, classes {data.classes}, issues {len(data.issues)}")
    for seed in seed_list:
        rng = np.random.default_rng(seed)
        start = sorted(rng.choice(pool_all, size=protocol.start, replace=False).tolist())
        first = build_detector(config, seed=seed)
        first.backbone.cache = cache  # the frozen body is identical across seeds
        train_detector(first, [data.images[i] for i in start], [data.targets[i] for i in start],
                       protocol.first_steps, protocol.batch_size, seed=seed)
        first_map = _evaluate(first, data, test)
        log(f"seed {seed}: start {len(start)} images, mAP {first_map:.3f}")
        first_scorer = None
        if set(HELD_OUT_R) & set(strategies):  # the scoring chain starts like ``first``, without R
            first_scorer = build_detector(config, seed=seed)
            first_scorer.backbone.cache = cache
            _train_outside_reference(first_scorer, data, start, protocol.first_steps, protocol, seed, seed)
        for strategy in strategies:
            model = copy.deepcopy(first)
            model.backbone.cache = cache
            scorer = copy.deepcopy(first_scorer) if strategy in HELD_OUT_R else None
            if scorer is not None:
                scorer.backbone.cache = cache
            labeled = list(start)
            rows.append({"strategy": strategy, "seed": seed, "images": len(labeled), "boxes": _boxes(data, labeled),
                         "map50": first_map})
            srng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
            for cycle in range(protocol.cycles):
                pool = [i for i in pool_all if i not in set(labeled)]
                picked, info = _select(strategy, model, scorer, data, labeled, pool, protocol, srng, seed)
                timings[strategy].append(info)
                labeled += picked
                train_seed = seed * 1000 + cycle + 1
                train_detector(model, [data.images[i] for i in labeled], [data.targets[i] for i in labeled],
                               protocol.round_steps, protocol.batch_size, seed=train_seed)
                if scorer is not None and cycle + 1 < protocol.cycles:
                    _train_outside_reference(scorer, data, labeled, protocol.round_steps, protocol, seed, train_seed)
                value = _evaluate(model, data, test)
                rows.append({"strategy": strategy, "seed": seed, "images": len(labeled),
                             "boxes": _boxes(data, labeled), "map50": value})
                log(f"seed {seed} {strategy} cycle {cycle + 1}: {len(labeled)} images, "
                    f"{rows[-1]['boxes']} boxes, mAP {value:.3f} (select {info['select_seconds']:.1f}s)")
            write_curves(rows, out / "curves.csv")
    meta = {"dataset": dataset, "seeds": seed_list, "protocol": asdict(protocol), "detector": BENCH_DETECTOR,
            "pool": len(pool_all), "test": len(test), "classes": list(data.classes),
            "data_issues": [i.message for i in data.issues], "seconds": round(time.perf_counter() - t0, 1)}
    summary = summarize_detection(rows, meta, timings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_detection_curves(rows, out / "curves.png", title=f"ISAL detection benchmark: {dataset}")
    log(f"done: {out}")
    return summary


def write_curves(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6f}" if k == "map50" else row[k]) for k in FIELDS})


def _curves(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[int, np.ndarray]]:
    """``strategy -> seed -> array (cycles, 3)`` of images, boxes, mAP (in %)."""
    out: dict[str, dict[int, list[tuple[float, float, float]]]] = {}
    for r in rows:
        out.setdefault(str(r["strategy"]), {}).setdefault(int(r["seed"]), []).append(
            (float(r["images"]), float(r["boxes"]), 100.0 * float(r["map50"])))
    return {s: {seed: np.array(sorted(v)) for seed, v in seeds.items()} for s, seeds in out.items()}


def summarize_detection(
    rows: Sequence[Mapping[str, object]],
    meta: Mapping[str, object],
    timings: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
) -> dict[str, object]:
    """Per strategy: AUC over images and over boxes, final mAP, paired differences to random (ttest_rel p)."""
    curves = _curves(rows)
    auc_img = {s: {k: area_under_curve(c[:, 0], c[:, 2]) for k, c in v.items()} for s, v in curves.items()}
    auc_box = {s: {k: area_under_curve(c[:, 1], c[:, 2]) for k, c in v.items()} for s, v in curves.items()}
    final = {s: {k: float(c[-1, 2]) for k, c in v.items()} for s, v in curves.items()}
    out: dict[str, object] = {}
    for name, seeds in curves.items():
        stack = np.stack([seeds[k] for k in sorted(seeds)])
        entry: dict[str, object] = {
            "images": [int(x) for x in stack[0, :, 0]],
            "mean_boxes": [round(float(x), 1) for x in stack[:, :, 1].mean(axis=0)],
            "mean_map50_pct": [round(float(x), 2) for x in stack[:, :, 2].mean(axis=0)],
            "auc_vs_images": mean_std(list(auc_img[name].values())),
            "auc_vs_boxes": mean_std(list(auc_box[name].values())),
            "final_map50": mean_std(list(final[name].values())),
        }
        if "random" in curves and name != "random":
            entry["vs_random"] = {
                "auc_vs_images": paired(auc_img[name], auc_img["random"]),
                "auc_vs_boxes": paired(auc_box[name], auc_box["random"]),
                "final_map50": paired(final[name], final["random"]),
            }
        if timings and timings.get(name):
            entry["select_seconds_per_cycle"] = round(float(np.mean([t["select_seconds"] for t in timings[name]])), 2)
            if name.startswith("isal"):
                entry["no_box_images_per_cycle"] = round(float(np.mean([t.get("no_box", 0) for t in timings[name]])), 2)
        out[name] = entry
    return {"meta": dict(meta), "strategies": out,
            "note": "AUC = trapezoidal mean mAP@0.5 (%) over the range of images (or boxes) labeled; "
                    "vs_random = per-seed paired differences (mean, std, scipy ttest_rel p)."}


def plot_detection_curves(rows: Sequence[Mapping[str, object]], path: Path, title: str = "") -> None:
    """mAP vs images, mAP vs boxes (mean ± std over seeds), and the paired difference to random vs images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(rows)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name, seeds in curves.items():
        stack = np.stack([seeds[k] for k in sorted(seeds)])
        mean, std = stack.mean(axis=0), stack[:, :, 2].std(axis=0)
        (line,) = axes[0].plot(mean[:, 0], mean[:, 2], marker="o", ms=3, label=name)
        axes[0].fill_between(mean[:, 0], mean[:, 2] - std, mean[:, 2] + std, color=line.get_color(), alpha=0.15)
        for k in sorted(seeds):
            axes[1].plot(seeds[k][:, 1], seeds[k][:, 2], color=line.get_color(), alpha=0.35, lw=0.8)
        axes[1].plot(mean[:, 1], mean[:, 2], marker="o", ms=3, color=line.get_color(), label=name)
        if "random" in curves and name != "random":
            ref = curves["random"]
            common = sorted(set(seeds) & set(ref))
            if common:
                diff = np.stack([seeds[k][:, 2] - ref[k][:, 2] for k in common])
                axes[2].plot(mean[:, 0], diff.mean(axis=0), marker="o", ms=3, color=line.get_color(), label=name)
                axes[2].fill_between(mean[:, 0], diff.mean(axis=0) - diff.std(axis=0),
                                     diff.mean(axis=0) + diff.std(axis=0), color=line.get_color(), alpha=0.15)
    axes[2].axhline(0.0, color="black", lw=0.8)
    axes[0].set(xlabel="images labeled", ylabel="test mAP@0.5 (%)", title="mean ± std over seeds")
    axes[1].set(xlabel="boxes labeled", ylabel="test mAP@0.5 (%)", title="per seed (thin) and mean")
    axes[2].set(xlabel="images labeled", ylabel="mAP − random (pp)", title="paired difference to random")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_detection_table(summary: Mapping[str, object]) -> str:
    """Headline figures, one strategy per line."""
    lines = [f"{'strategy':<17}{'AUC img %':>11}{'AUC box %':>11}{'final %':>9}{'dAUC img':>10}{'p':>9}"
             f"{'dAUC box':>10}{'p':>9}"]
    for name, e in summary["strategies"].items():  # type: ignore[union-attr]
        vr = e.get("vs_random", {})

        def f(stats: Mapping[str, object] | None, key: str = "mean") -> str:
            v = (stats or {}).get(key)
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}" if key == "mean" \
                else f"{v:.2g}"

        lines.append(f"{name:<17}{e['auc_vs_images']['mean']:>11.2f}{e['auc_vs_boxes']['mean']:>11.2f}"
                     f"{e['final_map50']['mean']:>9.2f}{f(vr.get('auc_vs_images')):>10}"
                     f"{f(vr.get('auc_vs_images'), 'p'):>9}{f(vr.get('auc_vs_boxes')):>10}"
                     f"{f(vr.get('auc_vs_boxes'), 'p'):>9}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``bench al --dataset bccd|VOC-FOLDER``: run, write the files, print the summary table."""
    strategies = [s.strip() for s in (args.strategies or ",".join(DEFAULT_STRATEGIES)).split(",") if s.strip()]
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    result = run_detection_al(args.dataset, strategies, seeds, args.out, args.quick, args.device)
    print(format_detection_table(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - manual runs; the CLI wires run_detection_al
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bccd")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench-out/det-al")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = run_detection_al(args.dataset, args.strategies.split(","), args.seeds, args.out, args.quick)
    print(format_detection_table(result))
