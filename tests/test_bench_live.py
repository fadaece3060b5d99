"""``bench live`` end to end on a real Label Studio: tiny sizes, so it checks the figures' shape, not their values.

The annotators must see no Label Studio error (nor on the baseline project no backend is connected to),
the first task served must be the cold-start round's first, the predictions Label Studio holds must stay
within two rounds' writes, and both arms must have their accuracy checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isal_backend.bench.stack import REPO
from isal_backend.settings import KNOWN_BACKBONES

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WRITE_TOP_M = 40


def test_bench_live_tiny_run_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    small = "small-cnn" in KNOWN_BACKBONES
    backbone = ["--env", "ISAL_BACKBONE=small-cnn", "--env", "ISAL_FEATURE_DIM=16"] if small else []
    command = [sys.executable, "-m", "isal_backend", "bench", "live", "--tasks", "120", "--labels", "20",
               "--every", "10", "--pause", "0.1", "--json", str(out), *backbone,
               "--env", f"ISAL_WRITE_TOP_M={WRITE_TOP_M}", "--env", "ISAL_WRITE_MIN=10"]
    done = subprocess.run(command, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    assert (figures["tasks"], figures["annotators"], figures["labels"]) == (120, 1, 20)
    for key in ("next_p50_ms", "next_p99_ms", "idle_next_p50_ms", "idle_next_p99_ms", "alone_next_p50_ms",
                "alone_next_p99_ms"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["next_p99_vs_alone"] == round(figures["next_p99_ms"] / figures["alone_next_p99_ms"], 2)
    assert isinstance(figures["alone_5xx"], int) and figures["alone_5xx"] == 0, figures["alone_5xx_details"]
    assert isinstance(figures["ls_5xx"], int) and figures["ls_5xx"] == 0, figures["ls_5xx_details"]
    assert figures["first_served_order"] == "cold-start", figures["first_served_orders"]
    assert 0 < figures["max_predictions_in_ls"] <= 2 * WRITE_TOP_M
    assert 10 <= figures["max_write_size"] <= WRITE_TOP_M
    ratio = figures["max_predictions_in_ls"] / figures["max_write_size"]
    assert figures["predictions_per_write_size"] == round(ratio, 2)
    assert figures["freshness_seconds"] and all(isinstance(f, float) and f > 0 for f in figures["freshness_seconds"])
    for arm in ("stream", "random"):
        curve = figures[f"{arm}_accuracy"]
        assert [p[0] for p in curve] == [10, 20], curve
        assert all(isinstance(p[1], float) and 0.0 <= p[1] <= 1.0 for p in curve), curve
