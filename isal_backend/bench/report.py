"""Figures of ``bench al`` for every task kind: curves.csv, curves.png and summary.json with paired statistics.

Active learning often fails to beat random selection at small budgets and few seeds, and curves of
different seeds differ more than strategies do. So every comparison here is PAIRED: strategy and
random share the seed and therefore the random start, and the per-seed differences (of the area
under the curve and of the final metric) are tested with a paired t-test. Label saving at matched
metric is reported with its noise floor: random's own seeds measured against random's mean curve.

A row is one round: ``labels`` (annotations made, the cost), ``boxes`` (detection: boxes in them, a
second cost axis), ``metric`` (test accuracy, or mAP@0.5 for detection, as a fraction).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("strategy", "seed", "cycle", "labels", "boxes", "metric", "round_seconds", "select_seconds", "order",
          "skips")
#: The strategies every other is compared with, when the run has them.
BASELINES = ("random", "margin", "mean-confidence")


def write_curves(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6f}" if k == "metric" else row.get(k, "")) for k in FIELDS})


def read_curves(path: Path) -> list[dict[str, object]]:
    with path.open() as f:
        return [
            {"strategy": r["strategy"], "seed": int(r["seed"]), "cycle": int(r["cycle"]), "labels": int(r["labels"]),
             "boxes": int(r["boxes"]) if r.get("boxes") else "", "metric": float(r["metric"]),
             "round_seconds": float(r.get("round_seconds") or 0), "select_seconds": float(r.get("select_seconds") or 0),
             "order": r.get("order", ""), "skips": int(r.get("skips") or 0)}
            for r in csv.DictReader(f)
        ]


def curves_by_strategy(
    rows: Sequence[Mapping[str, object]], cost: str = "labels"
) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """``strategy -> (cost per cycle, {seed: metric in % per cycle})``; ``cost`` is labels or boxes.

    With ``boxes`` the cost axis differs per seed; its mean over seeds is returned (each seed's own
    axis is used for its area under the curve by :func:`curve_aucs`).
    """
    out: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
    for name, seeds in _grouped(rows, cost).items():
        costs = np.mean(np.stack([c for c, _ in seeds.values()]), axis=0)
        out[name] = (costs, {seed: m for seed, (_, m) in seeds.items()})
    return out


def _grouped(rows: Sequence[Mapping[str, object]], cost: str) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    grouped: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for r in rows:
        grouped.setdefault(str(r["strategy"]), {}).setdefault(int(r["seed"]), []).append(
            (int(r["cycle"]), float(r[cost]), float(r["metric"])))
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for name, seeds in grouped.items():
        out[name] = {}
        for seed, points in seeds.items():
            points.sort()
            out[name][seed] = (np.asarray([p[1] for p in points]), 100.0 * np.asarray([p[2] for p in points]))
    return out


def curve_aucs(rows: Sequence[Mapping[str, object]], cost: str) -> dict[str, dict[int, float]]:
    """``strategy -> {seed: area under that seed's curve over its own cost axis}``."""
    return {name: {seed: area_under_curve(c, m) for seed, (c, m) in seeds.items()}
            for name, seeds in _grouped(rows, cost).items()}


def area_under_curve(labels: np.ndarray, accuracy: np.ndarray) -> float:
    """Trapezoidal area divided by the label range: the mean accuracy over the budget, in %."""
    if labels.size < 2 or labels[-1] == labels[0]:
        return float(accuracy.mean())
    return float(np.trapezoid(accuracy, labels) / (labels[-1] - labels[0]))


def _num(x: float) -> float | None:
    """JSON has no NaN: undefined figures (a t-test on constant differences, one seed) become null."""
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": _num(v.mean()), "std": _num(v.std(ddof=1) if v.size > 1 else float("nan")), "n": int(v.size)}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, float | None]:
    """Per-seed differences ``a - b`` over the seeds both have: mean, std and the paired t-test p."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a) & set(b))
    x = np.asarray([a[s] for s in seeds])
    y = np.asarray([b[s] for s in seeds])
    out = mean_std(x - y)
    p = float("nan")
    if len(seeds) > 1 and np.ptp(x - y) > 0:
        p = float(ttest_rel(x, y).pvalue)
    out["p"] = _num(p) if not math.isfinite(p) else float(f"{p:.3g}")
    return out


def labels_to_reach(target: float, labels: np.ndarray, accuracy: np.ndarray) -> float | None:
    """Labels a curve needs to reach ``target`` accuracy, linearly interpolated on its running maximum.

    None when the curve never gets there (the saving is then unknown, not infinite).
    """
    best = np.maximum.accumulate(accuracy)
    above = np.flatnonzero(best >= target)
    if above.size == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(labels[0])
    a0, a1 = best[i - 1], best[i]
    frac = (target - a0) / (a1 - a0) if a1 > a0 else 1.0
    return float(labels[i - 1] + frac * (labels[i] - labels[i - 1]))


def label_savings(
    labels: np.ndarray, accuracy: np.ndarray, ref_labels: np.ndarray, ref_accuracy: np.ndarray
) -> list[float]:
    """Per cycle after the shared start: ``1 - labels / labels the reference needs for the same accuracy``, in %.

    Cycles whose accuracy the reference never reaches are left out (see ``unmatched_cycles``), so a
    strategy that ends above random's best is judged on its early cycles only; hence also
    ``at_random_final_accuracy_pct`` in the summary.
    """
    out = []
    for n, acc in zip(labels[1:], accuracy[1:], strict=True):
        need = labels_to_reach(acc, ref_labels, ref_accuracy)
        if need is not None and need > 0:
            out.append(100.0 * (1.0 - n / need))
    return out


def saving_summary(
    labels: np.ndarray, accs: Mapping[int, np.ndarray], ref_labels: np.ndarray, ref_accs: Mapping[int, np.ndarray]
) -> dict[str, float | int | None]:
    ref_mean = np.mean(np.stack(list(ref_accs.values())), axis=0)
    mean_curve = np.mean(np.stack(list(accs.values())), axis=0)
    on_means = label_savings(labels, mean_curve, ref_labels, ref_mean)
    per_seed = [s for s in (label_savings(labels, a, ref_labels, ref_mean) for a in accs.values()) if s]
    per_seed_means = [float(np.mean(s)) for s in per_seed]
    # One cleaner number: labels this strategy's mean curve needs to reach random's final accuracy.
    need = labels_to_reach(float(ref_mean[-1]), labels, mean_curve)
    at_final = float("nan") if need is None else 100.0 * (1.0 - need / float(ref_labels[-1]))
    return {
        "mean_pct": _num(float(np.mean(on_means)) if on_means else float("nan")),
        "at_random_final_accuracy_pct": _num(at_final),
        "matched_cycles": len(on_means),
        "unmatched_cycles": int(labels.size - 1 - len(on_means)),
        "per_seed_mean_pct": _num(float(np.mean(per_seed_means)) if per_seed_means else float("nan")),
        "per_seed_std_pct": _num(float(np.std(per_seed_means, ddof=1)) if len(per_seed_means) > 1 else float("nan")),
    }


def summarize(rows: Sequence[Mapping[str, object]], meta: Mapping[str, object]) -> dict[str, object]:
    """summary.json: per strategy AUC, final metric, paired differences to the baselines, label saving.

    ``recipe`` (the backend's recipe these curves describe, see :mod:`isal_backend.recipe`) is moved from
    ``meta`` to the top level.
    """
    meta = dict(meta)
    recipe = meta.pop("recipe", None)
    curves = curves_by_strategy(rows)
    aucs = curve_aucs(rows, "labels")
    box_aucs = curve_aucs(rows, "boxes") if all(r.get("boxes") not in ("", None) for r in rows) else None
    finals = {name: {s: float(a[-1]) for s, a in accs.items()} for name, (_, accs) in curves.items()}
    out: dict[str, object] = {}
    for name, (labels, accs) in curves.items():
        entry: dict[str, object] = {
            "labels": [int(n) for n in labels],
            "mean_metric": [_num(x) for x in np.mean(np.stack(list(accs.values())), axis=0)],
            "auc": mean_std(list(aucs[name].values())),
            "final": mean_std(list(finals[name].values())),
        }
        if box_aucs is not None:
            entry["mean_boxes"] = [round(float(x), 1) for x in curves_by_strategy(rows, "boxes")[name][0]]
            entry["auc_vs_boxes"] = mean_std(list(box_aucs[name].values()))
        for base in BASELINES:
            if base in curves and base != name and np.array_equal(curves[base][0], labels):
                versus: dict[str, object] = {"auc": paired(aucs[name], aucs[base]),
                                             "final": paired(finals[name], finals[base])}
                if box_aucs is not None:
                    versus["auc_vs_boxes"] = paired(box_aucs[name], box_aucs[base])
                entry[f"vs_{base}"] = versus
        if "random" in curves and name != "random" and np.array_equal(curves["random"][0], labels):
            ref = curves["random"][1]  # every point of the curve, paired: the first labels matter most
            entry["points_vs_random"] = [
                {"labels": int(n), **paired({s: float(a[j]) for s, a in accs.items()},
                                            {s: float(a[j]) for s, a in ref.items()})}
                for j, n in enumerate(labels)]
        if "random" in curves and np.array_equal(curves["random"][0], labels):
            key = "label_saving_vs_random" if name != "random" else "label_saving_noise_floor"
            entry[key] = saving_summary(labels, accs, *curves["random"])
        mine = [r for r in rows if r["strategy"] == name]
        entry["round_seconds"] = _num(float(np.mean([float(r["round_seconds"]) for r in mine])))
        entry["select_seconds"] = _num(float(np.mean([float(r["select_seconds"]) for r in mine])))
        entry["cold_start_rounds"] = sum(1 for r in mine if r.get("order") == "cold-start")
        out[name] = entry
    summary: dict[str, object] = {"meta": meta, "strategies": out}
    if recipe is not None:
        summary = {"recipe": recipe, **summary}
    return summary


def write_summary(summary: Mapping[str, object], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)


def _fmt(stats: Mapping[str, object] | None, key: str = "mean", spread: str = "std") -> str:
    if not stats or stats.get(key) is None:
        return "-"
    s = stats.get(spread)
    return f"{stats[key]:+.2f}±{s:.2f}" if s is not None else f"{stats[key]:+.2f}"


def format_table(summary: Mapping[str, object]) -> str:
    """A plain-text table of the headline figures, one strategy per line.

    The second comparison column is margin sampling (classification) or mean-confidence (detection),
    whichever the run has; for detection a last column gives the AUC over boxes against random.
    """
    strategies: Mapping[str, Any] = summary["strategies"]  # type: ignore[assignment]
    second = next((b for b in BASELINES[1:] if b in strategies), "margin")
    boxes = any("auc_vs_boxes" in e for e in strategies.values())
    head = (
        f"{'strategy':<18}{'AUC %':>14}{'final %':>14}{'dAUC vs rnd':>14}{'p':>9}"
        f"{'dAUC vs ' + second[:4]:>14}{'p':>9}{'saving %':>10}{'@final %':>10}{'round s':>9}"
        + (f"{'dAUC box vs rnd':>17}{'p':>9}" if boxes else "")
    )
    lines = [head]
    for name, e in strategies.items():
        auc, fin = e["auc"], e["final"]
        vr = e.get("vs_random", {}).get("auc")
        vm = e.get(f"vs_{second}", {}).get("auc")
        sav = e.get("label_saving_vs_random") or e.get("label_saving_noise_floor") or {}
        line = (
            f"{name:<18}{auc['mean']:>8.2f}±{auc['std'] or 0:<5.2f}{fin['mean']:>8.2f}±{fin['std'] or 0:<5.2f}"
            f"{_fmt(vr):>14}{(vr or {}).get('p') if vr else '-'!s:>9}{_fmt(vm):>14}"
            f"{(vm or {}).get('p') if vm else '-'!s:>9}{sav.get('mean_pct', '-')!s:>10}"
            f"{sav.get('at_random_final_accuracy_pct', '-')!s:>10}{e.get('round_seconds') or 0:>9.2f}"
        )
        if boxes:
            vb = e.get("vs_random", {}).get("auc_vs_boxes")
            line += f"{_fmt(vb):>17}{(vb or {}).get('p') if vb else '-'!s:>9}"
        lines.append(line)
    return "\n".join(lines)


def plot_curves(rows: Sequence[Mapping[str, object]], path: Path, metric: str = "accuracy", title: str = "") -> None:
    """Left: mean metric with a ±1 std band per strategy. Right: paired difference to random per cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves_by_strategy(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, (labels, accs) in curves.items():
        stack = np.stack([accs[s] for s in sorted(accs)])
        mean, std = stack.mean(axis=0), stack.std(axis=0)
        (line,) = left.plot(labels, mean, marker="o", ms=3, label=name)
        left.fill_between(labels, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if "random" in curves and name != "random" and np.array_equal(curves["random"][0], labels):
            ref = curves["random"][1]
            seeds = sorted(set(accs) & set(ref))
            diff = np.stack([accs[s] - ref[s] for s in seeds])
            dm, ds = diff.mean(axis=0), diff.std(axis=0)
            right.plot(labels, dm, marker="o", ms=3, color=line.get_color(), label=name)
            right.fill_between(labels, dm - ds, dm + ds, color=line.get_color(), alpha=0.15)
    right.axhline(0.0, color="black", lw=0.8)
    label = {"accuracy": "test accuracy (%)", "map50": "test mAP@0.5 (%)"}.get(metric, metric)
    left.set(xlabel="labels", ylabel=label, title="mean ± std over seeds")
    right.set(xlabel="labels", ylabel=f"{metric} − random (pp)", title="paired difference to random (mean ± std)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
