"""``bench al``: pool-based active learning through the backend's own round, for every task kind.

Per seed and strategy, a project is made on an :class:`~isal_backend.bench.offline.OfflineDatastore`
holding the data set's pool, with the same random start for every strategy of a seed (comparisons are
paired). Then ``cycles`` times: the backend's :class:`~isal_backend.round.Round` runs (fetch, features,
fit, s_test, score, write back, commit), the round's stored model is evaluated on the test split as
``/predict`` would use it, and a simulated annotator labels the ``budget`` tasks the labeling stream
serves first (Label Studio's Uncertainty sampling rule). So the curves are the product's: the recipe
(:mod:`isal_backend.recipe`) is the backend's for the same settings and is written into summary.json.

Costs are counted in labels (annotations made); for detection also in boxes. The frozen backbone's
features and a detector's body outputs are cached across seeds and strategies, which is what lets ten
seeds of six strategies run on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isal_backend.bench import report
from isal_backend.bench.datasets import BenchSet, junk_for, load_bench_set
from isal_backend.bench.offline import OfflineDatastore
from isal_backend.bench.scenarios import Scenario, apply
from isal_backend.models.featurizer import Featurizer
from isal_backend.recipe import recipe
from isal_backend.round import Round
from isal_backend.settings import Settings
from isal_backend.store import ImageCache, ModelStore
from isal_backend.strategies.catalog import check_name
from isal_backend.tasks import TaskParts, task_for

#: Test items get task ids from here on, far from the pool's 1..n.
TEST_ID_BASE = 10_000_000


@dataclass(frozen=True)
class DatasetDefaults:
    """How much of a data set a run uses (None: all of it)."""

    pool_size: int | None
    test_size: int | None
    quick_pool_size: int | None
    quick_test_size: int | None


DEFAULTS: dict[str, DatasetDefaults] = {
    "fashion-mnist": DatasetDefaults(10_000, 2_000, 1_500, 500),
    "cifar10": DatasetDefaults(10_000, 2_000, 1_000, 400),
    "folder": DatasetDefaults(None, None, 1_000, 300),
    "detection": DatasetDefaults(None, None, 48, 16),
}
DEFAULT_STRATEGIES = {"classification": "isal,isal-paper,random,entropy,margin,coreset",
                      "detection": "isal,random,mean-confidence"}
DEFAULT_SEEDS = {"classification": (10, 3), "detection": (3, 2)}  # (full, --quick)
#: The paper's protocol for classification: start with 2% of the pool, add 2% per cycle, 10 cycles.
START_FRACTION = BUDGET_FRACTION = 0.02
CLASSIFICATION_CYCLES = (10, 4)
#: Detection: 20 images to start, then 4 cycles of 20 (BCCD's pool is 292 images).
DETECTION_PROTOCOL = ((20, 20, 4), (8, 8, 2))
#: ``--quick`` detection trains fewer steps (a recipe change the summary's recipe shows).
QUICK_DETECTION_STEPS = {"detection_steps": 10, "detection_first_steps": 25}


@dataclass(frozen=True)
class Protocol:
    start: int
    budget: int
    cycles: int

    @property
    def final_labels(self) -> int:
        return self.start + self.budget * self.cycles


def make_protocol(kind: str, pool_size: int, num_classes: int, cycles: int | None, budget: int | None,
                  quick: bool, start: int | None = None) -> Protocol:
    """The paper's 2% + 2% per cycle (classification; at least two labels per class to start), or 20 + 20.

    ``start`` 0: no random start, the first labels are the backend's cold-start order (the first hundred
    labels, measured on their own).
    """
    if kind == "detection":
        default_start, default_budget, default_cycles = DETECTION_PROTOCOL[int(quick)]
    else:
        default_start = max(math.ceil(START_FRACTION * pool_size), 2 * num_classes)
        default_budget = max(1, round(BUDGET_FRACTION * pool_size))
        default_cycles = CLASSIFICATION_CYCLES[int(quick)]
    start = default_start if start is None else start
    if start < 0:
        raise ValueError(f"--start must be at least 0, got {start}")
    budget = default_budget if budget is None else budget
    cycles = default_cycles if cycles is None else cycles
    if budget < 1:
        raise ValueError(f"--budget must be at least 1, got {budget}")
    if cycles < 1:
        raise ValueError(f"--cycles must be at least 1, got {cycles}")
    if start + budget > pool_size:
        raise ValueError(
            f"budget {budget} is larger than the unlabeled pool: {pool_size} images, {start} of them in the "
            f"random start, leave {pool_size - start}"
        )
    if start + budget * cycles > pool_size:
        raise ValueError(
            f"budget {budget} x {cycles} cycles + a start of {start} = {start + budget * cycles} labels is larger "
            f"than the pool ({pool_size} images): lower --budget or --cycles, or raise --pool-size"
        )
    return Protocol(start, budget, cycles)


def annotation(result: list[dict[str, Any]], annotation_id: int) -> dict[str, Any]:
    return {"id": annotation_id, "result": result, "was_cancelled": False,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}


class Harness:
    """One benchmark: the data set, the settings, and the parts every project of the run shares."""

    def __init__(self, bench: BenchSet, settings: Settings, work: Path) -> None:
        self.bench = bench
        self.settings = settings
        self.work = work
        self.featurizer = Featurizer(settings.backbone, bench.features_dir, settings.device,
                                     image_size=settings.image_size)
        self.body_cache: dict[bytes, list[torch.Tensor]] = {}  # a detector's frozen body: the same for every run
        self.image_cache = ImageCache(work / "images")
        self.test_tasks = [{"id": TEST_ID_BASE + i, "data": {"image": item.reference},
                            "annotations": [annotation(item.result, TEST_ID_BASE + i)]}
                           for i, item in enumerate(bench.test)]

    def parts(self, settings: Settings, project_id: int, store: ModelStore) -> TaskParts:
        return TaskParts(settings, project_id, store.project_dir(project_id), featurizer=self.featurizer,
                         body_cache=self.body_cache, image_cache=self.image_cache)

    def run(self, strategy: str, seed: int, protocol: Protocol) -> list[dict[str, Any]]:
        """One learning curve: a row per round (labels, boxes, test metric, what the round did)."""
        name, settings = variant(strategy, self.settings)
        settings = replace(settings, strategy=name)
        project_id = seed + 1  # every strategy of a seed shares the seed's folds, splits and draws
        store = ModelStore(self.work / f"seed{seed}-{strategy}")
        pool = self.bench.pool
        datastore = OfflineDatastore(project_id, self.bench.label_config,
                                     {i + 1: item.reference for i, item in enumerate(pool)}, self.bench.images,
                                     seed=seed)
        for i in np.random.default_rng(seed).choice(len(pool), protocol.start, replace=False):
            datastore.annotate(int(i) + 1, pool[int(i)].result, skipped=pool[int(i)].skip)
        parts = self.parts(settings, project_id, store)
        task = task_for(self.bench.config, parts)
        # The round writes as many predictions as the annotator labels before the next round: the batch.
        rows: list[dict[str, Any]] = []
        for cycle in range(protocol.cycles + 1):
            round_report = Round(project_id, datastore, store, settings, parts, write_size=protocol.budget,
                                 clean_up=datastore.clean_up).run()
            stored = store.load(project_id)
            model = task.load(stored) if stored is not None else None
            metric = float("nan")
            if model is not None:
                test = task.features(task.split(self.test_tasks), self.bench.images, model)
                metric = next(iter(task.evaluate(model, test).values()))
            labeled = datastore.annotated
            timings = round_report["timings"]
            if labeled and np.isfinite(metric):  # no model yet (no label, one class): no point on the curve
                rows.append({
                    "strategy": strategy, "seed": seed, "cycle": cycle, "labels": len(labeled),
                    "boxes": sum(pool[i - 1].label for i in labeled) if self.bench.kind == "detection" else "",
                    "metric": metric, "round_seconds": timings["total_seconds"],
                    "select_seconds": round(sum(timings.get(f"{k}_seconds", 0.0) for k in ("fit", "s_test", "score")),
                                            4),
                    "order": str(round_report["order"]).split(":")[0].split(" ")[0],
                    "skips": sum(1 for i in labeled if pool[i - 1].skip),
                })
            if cycle == protocol.cycles:
                break
            for task_id in datastore.stream(protocol.budget):
                datastore.annotate(task_id, pool[task_id - 1].result, skipped=pool[task_id - 1].skip)
        shutil.rmtree(store.root, ignore_errors=True)
        return rows


def run_benchmark(bench: BenchSet, strategies: Sequence[str], seeds: Sequence[int], protocol: Protocol,
                  settings: Settings, out: Path, meta: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Every strategy on every seed; writes curves.csv and summary.json after each seed, the plot at the end."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    work = out / "rounds"
    harness = Harness(bench, settings, work)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    bar = tqdm(total=len(seeds) * len(strategies) * (protocol.cycles + 1), desc="bench al", unit="round",
               disable=not progress, file=sys.stderr)
    try:
        with bar:
            for n, seed in enumerate(seeds, start=1):
                for strategy in strategies:
                    bar.set_postfix_str(f"seed {seed} {strategy}")
                    curve = harness.run(strategy, seed, protocol)
                    rows += curve
                    bar.update(len(curve))
                meta = {**meta, "wall_seconds": round(time.perf_counter() - started, 1), "seeds_done": n}
                report.write_curves(rows, out / "curves.csv")
                summary = report.summarize(rows, meta)
                report.write_summary(summary, out / "summary.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.plot_curves(rows, out / "curves.png", metric=str(meta["metric"]), title=str(meta.get("title", "")))
    return summary


#: Short names of the settings a variant may change (``isal[shortlist=2,dedupe=0.95]``).
VARIANT_ALIASES = {"shortlist": "isal_shortlist", "dedupe": "isal_dedupe", "skip_aware": "isal_skip_aware"}


def split_strategies(spec: str) -> list[str]:
    """Comma-separated strategies, commas inside ``[...]`` kept with their variant."""
    out, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return [s for s in out if s]


def variant(spec: str, settings: Settings) -> tuple[str, Settings]:
    """``name[key=value,...]`` -> the strategy's name and the settings it runs with (keys: Settings fields)."""
    name, _, rest = spec.partition("[")
    name = check_name(name.strip())
    if not rest:
        return name, settings
    if not rest.endswith("]"):
        raise ValueError(f"a strategy variant looks like isal[shortlist=2,dedupe=0.95], got {spec!r}")
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    overrides: dict[str, Any] = {}
    for item in split_strategies(rest[:-1]):
        key, _, value = item.partition("=")
        key = VARIANT_ALIASES.get(key.strip(), key.strip())
        if key not in fields or not value:
            raise ValueError(f"{spec!r}: {key!r} is not a setting (e.g. {', '.join(VARIANT_ALIASES)}, cold_start)")
        current = getattr(settings, key)
        overrides[key] = (value.lower() in ("1", "true", "yes") if isinstance(current, bool)
                          else type(current)(value) if current is not None else value)
    return name, replace(settings, **overrides)


def resolve_strategies(spec: str | None, kind: str) -> list[str]:
    names = split_strategies(spec or DEFAULT_STRATEGIES[kind])
    if not names:
        raise ValueError("--strategies is empty")
    for name in names:
        variant(name, Settings())  # "unknown strategy 'x': choose from ...", or a bad variant
    return list(dict.fromkeys(names))


def bench_settings(args: argparse.Namespace, kind: str) -> Settings:
    """The backend's settings from the environment, with the command line's overrides (backbone, device)."""
    settings = Settings.from_env()
    overrides: dict[str, Any] = {"redis_url": None}
    if getattr(args, "backbone", None):
        overrides["backbone"] = args.backbone
    if getattr(args, "device", None):
        overrides["device"] = args.device
    if kind == "detection" and args.quick:
        overrides.update(QUICK_DETECTION_STEPS)
    return replace(settings, **overrides)


def main(args: argparse.Namespace) -> int:
    from isal_backend.bench.datasets import check_dataset, is_detection_dataset

    check_dataset(args.dataset)
    kind = "detection" if is_detection_dataset(args.dataset) else "classification"
    defaults = DEFAULTS["detection" if kind == "detection" else args.dataset
                        if args.dataset in DEFAULTS else "folder"]
    quick = bool(args.quick)
    strategies = resolve_strategies(args.strategies, kind)
    if args.pool_size is not None and args.pool_size < 2:
        raise ValueError(f"--pool-size must be at least 2, got {args.pool_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    settings = bench_settings(args, kind)
    pool_size = args.pool_size or (defaults.quick_pool_size if quick else defaults.pool_size)
    test_size = defaults.quick_test_size if quick else defaults.test_size
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[kind][int(quick)]
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    bench = load_bench_set(args.dataset, pool_size, test_size, args.data_root)
    scenario = Scenario(junk=args.junk, imbalance=args.imbalance, duplicates=args.duplicates,
                        label_noise=args.label_noise)
    if scenario.junk:
        junk, junk_images = junk_for(bench, args.data_root)
        bench = apply(bench, scenario, junk, junk_images)
    else:
        bench = apply(bench, scenario)
    protocol = make_protocol(kind, len(bench.pool), len(bench.classes), args.cycles, args.budget, quick, args.start)
    metric = "map50" if kind == "detection" else "accuracy"
    meta: dict[str, Any] = {
        "title": f"{bench.name}: the backend's {kind} round, {settings.backbone} features" if kind == "classification"
        else f"{bench.name}: the backend's detection round (FCOS)",
        "dataset": args.dataset, "kind": kind, "metric": metric, "pool_size": len(bench.pool),
        "test_size": len(bench.test), "num_classes": len(bench.classes), "classes": bench.classes,
        "start_labels": protocol.start, "budget": protocol.budget, "cycles": protocol.cycles,
        "final_labels": protocol.final_labels, "seeds": seeds, "strategies": strategies, "quick": quick,
        "scenario": scenario.describe(),
        "recipe": recipe(settings, kind), **bench.info,
        "units": f"{metric} and AUC in percent; differences in percentage points",
    }
    out = Path(args.out)
    print(f"{bench.name}: pool {len(bench.pool)}, test {len(bench.test)}, {len(bench.classes)} classes, "
          f"{protocol.start} + {protocol.cycles} x {protocol.budget} labels, {seeds} seeds, strategies "
          f"{','.join(strategies)}", file=sys.stderr)
    summary = run_benchmark(bench, strategies, list(range(seeds)), protocol, settings, out, meta)
    print(report.format_table(summary))
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'summary.json'}")
    return 0
