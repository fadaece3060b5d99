"""``bench al``: loaders on real image files, the backend's round end to end through the CLI, its errors, its
statistics, and that its recipe is the backend's.

Everything runs on a tiny folder of PNGs written here (with the small random-init CNN), so the suite stays
fast; the heavy benchmarks on Fashion-MNIST, CIFAR-10 and BCCD are run by hand (see README / the issue).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ttest_rel

from isal_backend import cli
from isal_backend.bench import datasets, report
from isal_backend.bench.al import make_protocol
from isal_backend.bench.datasets import load_bench_set, read_idx, split_folder
from isal_backend.models.projection import Projection
from isal_backend.recipe import recipe
from isal_backend.settings import Settings
from isal_backend.tasks.classification import resolved_top_k

CLASSES = ("circle", "square", "stripes")
PER_CLASS = 15


def _draw(cls: int, rng: np.random.Generator, size: int = 20) -> np.ndarray:
    """Three visually different classes with per-image noise and colour jitter."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if cls == 0:
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    elif cls == 1:
        mask = (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4)
    else:
        mask = (xx // 3) % 2 == 0
    img[mask] = rng.integers(150, 256, 3)
    return img


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(_draw(c, rng)).save(root / name / f"{i:03d}.png")
    (root / "circle" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(autouse=True)
def feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ISAL_CACHE_DIR", str(cache))
    return cache


def test_folder_loader_gives_tasks_their_files_and_truth(image_folder: Path) -> None:
    bench = load_bench_set(str(image_folder), None, None)
    assert bench.kind == "classification" and bench.classes == list(CLASSES)
    assert len(bench.pool) + len(bench.test) == len(CLASSES) * PER_CLASS  # the .txt file is not an image
    # Stratified: every class in both splits, 20% of 15 = 3 per class in the test set.
    assert np.bincount([item.label for item in bench.test]).tolist() == [3, 3, 3]
    item = bench.pool[0]
    name = item.reference.removeprefix("bench://folder/")
    assert bench.images(item.reference) == (image_folder / name).read_bytes()  # the file's own bytes
    assert item.result[0]["value"]["choices"] == [CLASSES[item.label]] and name.startswith(CLASSES[item.label])
    assert load_bench_set(str(image_folder), None, None).identity == bench.identity
    assert load_bench_set(str(image_folder), 20, None).identity != bench.identity  # another subset, another cache


def test_split_folder_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 7])
    pool, test = split_folder(labels, seed=3)
    assert np.intersect1d(pool, test).size == 0 and pool.size + test.size == labels.size
    assert np.bincount(labels[test]).tolist() == [2, 1, 1, 1]
    again_pool, _ = split_folder(labels, seed=3)
    other_pool, _ = split_folder(labels, seed=4)
    assert np.array_equal(pool, again_pool) and not np.array_equal(pool, other_pool)


def test_read_idx_round_trip(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())
    assert np.array_equal(read_idx(path), data)


def test_real_fashion_mnist_labels_when_installed() -> None:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_cifar_tar_loader_reads_subsets_without_unpacking(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    archive = tmp_path / datasets.CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for split, n in (("train", 6), ("test", 3)):
            for c, name in enumerate(("cat", "dog")):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(_draw(c, rng, 32)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    bench = datasets.load_cifar10(tmp_path, 5, None, seed=0)
    assert bench.classes == ["cat", "dog"] and len(bench.pool) == 5 and len(bench.test) == 6
    assert sorted(item.label for item in bench.test) == [0, 0, 0, 1, 1, 1]
    with Image.open(io.BytesIO(bench.images(bench.pool[0].reference))) as image:
        assert image.format == "JPEG" and image.size == (32, 32)  # served as stored in the tar
    assert list(tmp_path.iterdir()) == [archive]  # nothing unpacked


ALL = "isal,isal-paper,random,entropy,margin,coreset"


def test_cli_end_to_end_on_a_folder_runs_the_backends_round(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISAL_BACKBONE", "small-cnn")
    monkeypatch.setenv("ISAL_FEATURE_DIM", "16")
    out = tmp_path / "out"
    argv = ["bench", "al", "--dataset", str(image_folder), "--strategies", ALL, "--seeds", "2",
            "--cycles", "3", "--budget", "4", "--out", str(out), "--quick"]
    assert cli.main(argv) == 0
    assert (out / "curves.png").stat().st_size > 10_000
    assert not (out / "rounds").exists()  # the projects' model stores are removed after the run
    with (out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(report.FIELDS)
    names = ALL.split(",")
    # Every strategy x seed x round (start + 3 cycles), labels growing by the budget from a 2-per-class start.
    got = {(r["strategy"], int(r["seed"]), int(r["cycle"])): r for r in rows}
    assert set(got) == {(s, seed, c) for s in names for seed in (0, 1) for c in range(4)}
    for (_, _, c), r in got.items():
        assert int(r["labels"]) == 6 + 4 * c
        assert 0.0 <= float(r["metric"]) <= 1.0 and float(r["round_seconds"]) > 0
    # The random start is shared by all strategies of a seed: the same labels, so the same first model.
    for seed in (0, 1):
        assert len({got[(s, seed, 0)]["metric"] for s in names}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["seeds"] == 2 and summary["meta"]["strategies"] == names
    assert set(summary["strategies"]) == set(names)
    for name in names:
        e = summary["strategies"][name]
        assert {"auc", "final", "labels", "mean_metric", "round_seconds"} <= set(e)
        assert e["auc"]["n"] == 2
        if name != "random":
            assert {"auc", "final"} == set(e["vs_random"])
            assert {"mean", "std", "p", "n"} == set(e["vs_random"]["auc"])
            assert {"mean_pct", "matched_cycles", "unmatched_cycles"} <= set(e["label_saving_vs_random"])
    assert "label_saving_noise_floor" in summary["strategies"]["random"]
    assert "vs_margin" in summary["strategies"]["isal"]
    # The benchmark's recipe is the backend's for the same settings (what `recipe` prints).
    assert summary["recipe"] == recipe(Settings.from_env(), "classification")
    assert summary["recipe"]["backbone"] == "small-cnn" and summary["recipe"]["feature_projection"]["dim"] == 16


def test_recipe_command_prints_the_environments_recipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ISAL_WEIGHT_DECAY", "0.003")
    monkeypatch.setenv("ISAL_STRATEGY", "margin")
    assert cli.main(["recipe"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == recipe(Settings.from_env(), "classification")
    assert printed["head"]["weight_decay"] == 0.003 and printed["strategy"] == {"name": "margin"}
    assert cli.main(["recipe", "--task", "detection"]) == 0
    detection = json.loads(capsys.readouterr().out)
    assert detection["task"] == "detection" and detection["strategy"]["name"] == "mean-confidence"
    assert "classification uncertainty measure" in detection["strategy"]["note"]


def test_unknown_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "al", "--dataset", "imagenet-42", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown data set 'imagenet-42'" in err and "fashion-mnist" in err


def test_unknown_strategy_is_a_clear_error(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "al", "--dataset", str(image_folder), "--strategies", "random,oracle", "--out", str(tmp_path)]
    rc = cli.main(argv)
    assert rc == 2 and "unknown strategy 'oracle'" in capsys.readouterr().err


def test_missing_cifar_archive_says_where_to_put_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "al", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cifar10-jpg.tar.gz" in err and "--data-root" in err


def test_missing_fashion_mnist_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (tmp_path / "nowhere",))
    rc = cli.main(["bench", "al", "--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "apt-get install dataset-fashion-mnist" in err


def test_budget_larger_than_pool_is_a_clear_error(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["bench", "al", "--dataset", str(image_folder), "--budget", "500", "--backbone", "small-cnn",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "budget 500 is larger than the unlabeled pool" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="larger than the pool"):
        make_protocol("classification", 100, 2, cycles=10, budget=10, quick=False)  # 4 + 100 > 100


def test_protocol_is_the_papers_shape() -> None:
    p = make_protocol("classification", 10_000, 10, cycles=None, budget=None, quick=False)
    assert (p.start, p.budget, p.final_labels) == (200, 200, 2200)
    d = make_protocol("detection", 292, 3, cycles=None, budget=None, quick=False)
    assert (d.start, d.budget, d.cycles) == (20, 20, 4)


def test_statistics_against_known_values() -> None:
    labels = np.array([100.0, 200.0, 300.0, 400.0])
    assert report.area_under_curve(labels, np.array([50.0, 60.0, 70.0, 80.0])) == pytest.approx(65.0)
    # Reference gains 10 points per 100 labels; a curve 10 points above needs 100 labels fewer.
    ref = np.array([50.0, 60.0, 70.0, 80.0])
    assert report.labels_to_reach(65.0, labels, ref) == pytest.approx(250.0)
    assert report.labels_to_reach(81.0, labels, ref) is None
    better = np.array([50.0, 70.0, 80.0, 90.0])
    savings = report.label_savings(labels, better, labels, ref)
    assert savings == pytest.approx([100 * (1 - 200 / 300), 100 * (1 - 300 / 400)])  # 90% is never matched
    summary = report.saving_summary(labels, {0: better, 1: better}, labels, {0: ref, 1: ref})
    assert summary["matched_cycles"] == 2 and summary["unmatched_cycles"] == 1
    assert summary["at_random_final_accuracy_pct"] == pytest.approx(100 * (1 - 300 / 400))  # 80% at 300 labels
    a = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.0}
    b = {0: 0.5, 1: 2.0, 2: 2.2, 3: 3.0, 9: 7.0}  # seed 9 has no partner and is ignored
    res = report.paired(a, b)
    seeds = [0, 1, 2, 3]
    assert res["n"] == 4 and res["mean"] == pytest.approx(np.mean([a[s] - b[s] for s in seeds]), abs=1e-4)
    assert res["p"] == pytest.approx(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue, rel=1e-2)
    assert report.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p"] is None  # identical: undefined, not NaN


@pytest.mark.parametrize("n, d", [(60, 12), (12, 60)])  # eigh of the covariance, and the thin-SVD path
def test_pca_projection_matches_numpy(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.normal(size=(n, d)) * np.linspace(5, 0.1, d)).float()
    projection = Projection.fit(pool, dim=4)
    out = projection(pool)
    assert out.shape == (n, 4) and projection(torch.zeros(7, d)).shape == (7, 4)
    assert float(out.var(dim=0).mean()) == pytest.approx(1.0, rel=1e-6)
    x = pool.double().numpy()
    centered = x - x.mean(axis=0)
    _, sing, vt = np.linalg.svd(centered, full_matrices=False)
    ref = centered @ vt[:4].T / np.sqrt((sing[:4] ** 2 / (n - 1)).mean())
    # Principal directions are defined up to sign: compare sign-free Gram matrices.
    got = out.numpy()
    assert np.allclose(got @ got.T, ref @ ref.T, atol=1e-6)
    assert projection.still_fits(n, d) and not projection.still_fits(2 * n, d)  # refitted as the pool grows


def test_projection_fits_on_a_fixed_sample_of_a_large_pool() -> None:
    pool = torch.randn(5000, 6, generator=torch.Generator().manual_seed(1))
    a, b = Projection.fit(pool, 3, max_rows=500), Projection.fit(pool, 3, max_rows=500)
    assert torch.equal(a.basis, b.basis) and a.fitted_on == 5000


def test_isal_default_top_k_is_two_but_one_for_two_classes() -> None:
    assert resolved_top_k(None, 10) == 2
    assert resolved_top_k(None, 2) == 1  # K = C would make the expected gradient exactly zero
    assert resolved_top_k(1, 10) == 1  # the authors' shipped setting stays
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        resolved_top_k(3, 3)
