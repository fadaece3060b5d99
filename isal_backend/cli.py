"""``python -m isal_backend``: the benchmarks, the recipe, each project's status and the RQ worker.

Each sub-command is defined here and implemented where its code lives, imported lazily so that
``worker`` does not pay for matplotlib and ``bench`` does not need Redis.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isal_backend", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    al = bench.add_parser("al", help="pool-based active-learning benchmark")
    al.add_argument("--dataset", required=True,
                    help="fashion-mnist, cifar10, a folder of class sub-folders; bccd or a VOC folder (detection)")
    al.add_argument("--strategies", default=None,
                    help="comma-separated; default classification: isal,isal-paper,random,entropy,margin,coreset; "
                    "detection: isal,random,mean-confidence")
    al.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10; 3 with --quick)")
    al.add_argument("--out", required=True, help="output folder for curves.csv, curves.png, summary.json")
    al.add_argument("--quick", action="store_true", help="a small run that finishes within a few minutes")
    al.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: ISAL_DEVICE")
    al.add_argument("--backbone", default=None, help="classification feature extractor (default: ISAL_BACKBONE)")
    al.add_argument("--cycles", type=int, default=None, help="selection cycles")
    al.add_argument("--budget", type=int, default=None, help="labels added per cycle")
    al.add_argument("--pool-size", type=int, default=None, help="subsample the pool to this many images")
    al.add_argument("--data-root", default=None, help="where data files are looked for (default ../shared/data)")
    al.add_argument("--start", type=int, default=None,
                    help="labels of the random start (default 2%% of the pool; 0: the cold-start order picks them)")
    al.add_argument("--junk", type=float, default=0.0,
                    help="share of out-of-distribution images in the pool; the annotator skips them")
    al.add_argument("--imbalance", type=float, default=1.0, help="most to least frequent class in the pool")
    al.add_argument("--duplicates", type=float, default=0.0, help="share of near-copies added to the pool")
    al.add_argument("--label-noise", type=float, default=0.0, help="share of the annotator's answers that are wrong")

    speed = bench.add_parser("speed", help="ISAL scoring throughput against a bare forward pass")
    speed.add_argument("--quick", action="store_true")
    speed.add_argument("--task", default="classification", choices=["classification", "detection"])
    speed.add_argument("--json", required=True, help="write the figures here as JSON")
    speed.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    speed.add_argument("--backbone", default="resnet18-cifar")
    speed.add_argument("--batch-size", type=int, default=64)

    loop = bench.add_parser("loop", help="annotation-to-new-order freshness against a real Label Studio")
    loop.add_argument("--tasks", type=int, default=1000, help="tasks in the benchmark project")
    loop.add_argument("--repeats", type=int, default=3, help="annotations whose freshness is measured")
    loop.add_argument("--json", required=True, help="write the figures here as JSON")
    loop.add_argument("--ls-venv", default=None, help="virtualenv with label-studio 1.23.2 (default $LS_VENV)")
    loop.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    loop.add_argument("--workers", type=int, default=1, help="RQ workers (they share the first featurization)")
    loop.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                      help="Label Studio's database: its SQLite file, or a fresh PostgreSQL database on the server "
                           "of PGHOST/PGPORT/PGUSER (default 127.0.0.1:5432, user postgres), dropped at the end")
    loop.add_argument("--images", choices=("local-files", "static"), default="local-files",
                      help="where the tasks' images are served from: Label Studio's local-files storage, or a "
                           "loopback static file server (the first featurization then measures the backend, not "
                           "Label Studio's file view)")
    loop.add_argument("--ls-env", action="append", metavar="NAME=VALUE",
                      help="a setting of Label Studio's for this run (repeatable), e.g. its feature flag "
                           "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true")
    loop.add_argument("--keep-workdir", action="store_true",
                      help="keep the run's folder (the logs of Label Studio, the backend, the workers, the model "
                           "store with every round's report) and name it")
    loop.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="a backend setting for this run (repeatable), e.g. --env ISAL_BACKBONE=small-cnn")

    live = bench.add_parser("live", help="simulated annotators on a real Label Studio: stream vs random order")
    live.add_argument("--tasks", type=int, default=None, help="tasks in each project (default 1000; 300 with --quick)")
    live.add_argument("--labels", type=int, default=None, help="labels per project (default 200; 50 with --quick)")
    live.add_argument("--annotators", type=int, default=1, help="Label Studio users labeling at once")
    live.add_argument("--pause", type=float, default=None, help="seconds an annotator takes per label (default 1; "
                      "0.5 with --quick)")
    live.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                      help="Label Studio's database (postgres: a fresh database on PGHOST/PGPORT/PGUSER, dropped)")
    live.add_argument("--seeds", type=int, default=1, help="seeds (a stream and a random project each)")
    live.add_argument("--every", type=int, default=None, help="labels between accuracy checkpoints (default 25)")
    live.add_argument("--json", default="bench-out/live.json", help="write the figures here as JSON")
    live.add_argument("--png", default=None, help="the accuracy curves (default: next to the JSON)")
    live.add_argument("--quick", action="store_true", help="300 tasks, 50 labels, pause 0.5, small-cnn: "
                      "about five minutes")
    live.add_argument("--ls-venv", default=None, help="virtualenv with label-studio 1.23.2 (default $LS_VENV)")
    live.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    live.add_argument("--keep-workdir", action="store_true",
                      help="keep the run's folder (the logs of Label Studio, the backend, the worker) and name it")
    live.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="a backend setting for this run (repeatable), e.g. --env ISAL_WRITE_TOP_M=100")

    recipe = sub.add_parser("recipe", help="print the recipe a round runs with the current environment (JSON)")
    recipe.add_argument("--task", default="classification", choices=["classification", "detection"])

    status = sub.add_parser("status", help="each project's active learning, as /dashboard shows it (a table)")
    status.add_argument("project", nargs="?", type=int, default=None, help="one project in detail")
    status.add_argument("--json", action="store_true", help="the summary as JSON, for scripts")

    worker = sub.add_parser("worker", help="run an RQ worker for the backend's queue (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--name", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "recipe":
            from isal_backend.recipe import main as run

        elif args.command == "bench" and args.bench == "al":
            from isal_backend.bench.al import main as run

        elif args.command == "bench" and args.bench == "speed":
            from isal_backend.bench.speed import main as run

        elif args.command == "bench" and args.bench == "loop":
            from isal_backend.bench.loop import main as run

        elif args.command == "bench" and args.bench == "live":
            from isal_backend.bench.live import main as run

        elif args.command == "status":
            from isal_backend.summary import main as run

        else:
            from isal_backend.queue.worker import main as run
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
