"""Model store and feature cache: atomic rounds, crash safety, sharing between processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from isal_backend.models.featurizer import Featurizer, cache_key
from isal_backend.store import FeatureCache, ImageCache, ModelStore, TensorListCache


def test_commit_makes_a_round_current_and_loadable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.load(7) is None
    store.commit(7, "isal-1", {"w": torch.ones(2, 3)}, {"kind": "classification"},
                 {"labels": ["a", "b"], "validation_accuracy": 0.5})
    store.commit(7, "isal-2", {"w": torch.zeros(2, 3)}, {"kind": "detection"}, {"labels": ["a", "b"]})
    state = store.load(7)
    assert state is not None and state.round_id == "isal-2"
    assert torch.equal(state.tensors["w"], torch.zeros(2, 3)) and state.meta == {"kind": "detection"}
    assert store.load(7, "isal-1").report["validation_accuracy"] == 0.5
    assert store.rounds(7) == ["isal-1", "isal-2"]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_failed_write_leaves_the_previous_round_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.commit(1, "isal-1", {"w": torch.ones(1)}, {}, {})
    with pytest.raises(RuntimeError, match="disk full"):
        store.commit(1, "isal-2", {"w": Unpicklable()}, {}, {})  # type: ignore[dict-item]
    assert store.current_id(1) == "isal-1"
    assert store.rounds(1) == ["isal-1"]
    assert not list((tmp_path / "projects" / "1" / "rounds").glob(".staging-*"))


def _commit_slowly(root: str) -> None:
    store = ModelStore(root)
    big = {"w": torch.zeros(30_000_000)}  # ~120 MB: the write takes a while
    store.commit(3, "isal-2", big, {}, {})


def test_a_killed_writer_leaves_the_previous_round_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.commit(3, "isal-1", {"w": torch.ones(1)}, {}, {})
    proc = mp.get_context("spawn").Process(target=_commit_slowly, args=(str(tmp_path),))
    proc.start()
    staging = tmp_path / "projects" / "3" / "rounds"
    deadline = time.time() + 60
    while time.time() < deadline and not list(staging.glob(".staging-*")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert store.current_id(3) == "isal-1"
    assert torch.equal(store.load(3).tensors["w"], torch.ones(1))
    assert store.sweep_staging(3) in (0, 1)
    assert not list(staging.glob(".staging-*"))


def test_prune_keeps_the_newest_and_the_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for i in range(8):
        store.commit(2, f"isal-{i}", {"w": torch.ones(1)}, {}, {})
    store.prune(2, keep=3)
    assert store.rounds(2) == ["isal-5", "isal-6", "isal-7"]


def test_feature_cache_is_shared_between_writers(tmp_path: Path) -> None:
    a, b = FeatureCache(tmp_path), FeatureCache(tmp_path)
    a.put_many(["x", "y"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    b.put_many(["z"], torch.tensor([[5.0, 6.0]]))
    fresh = FeatureCache(tmp_path)
    got = fresh.get_many(["x", "z", "missing"])
    assert set(got) == {"x", "z"} and torch.equal(got["z"], torch.tensor([5.0, 6.0]))
    assert set(a.get_many(["z"])) == {"z"}  # a sees b's later chunk


def test_featurizer_caches_and_reports_failures(tmp_path: Path) -> None:
    images = {f"img-{i}": Image.new("RGB", (40, 30), (i * 40, 255 - i * 40, 90)) for i in range(4)}
    calls: list[str] = []

    def load(ref: str) -> Image.Image:
        calls.append(ref)
        if ref == "broken":
            raise OSError("cannot identify image file 'broken'")
        return images[ref]

    featurizer = Featurizer("small-cnn", tmp_path)
    refs = [*images, "broken"]
    feats, failures = featurizer(refs, load)
    assert set(feats) == set(images)
    assert set(failures) == {"broken"} and "cannot identify image" in failures["broken"]
    assert feats["img-0"].shape == (512,)
    assert not torch.equal(feats["img-0"], feats["img-3"])
    calls.clear()
    again, _ = featurizer(list(images), load)
    assert calls == []  # all from the cache
    assert all(torch.equal(again[r], feats[r]) for r in images)
    assert cache_key("data:image/png;base64,AAAA") == cache_key("data:image/png;base64,AAAA")


def test_resnet18_uses_torchvision_weights_only_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline: the torch hub cache's file when this machine has it, random weights otherwise; no download."""
    from torchvision.models import resnet18

    from isal_backend.models.backbones import build_backbone, cached_resnet18_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cached_resnet18_weights() is None
    net, _ = build_backbone("resnet18")
    assert net.checkpoint is None
    reference = resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    net, _ = build_backbone("resnet18")
    assert net.checkpoint == cached_resnet18_weights()
    assert torch.equal(net.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_image_cache_keeps_bytes_under_hashed_names(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "images")
    reference = "http://ls:8080/data/upload/3/a.jpg?token=SECRET123"
    assert cache.get(reference) is None and not cache.has(reference)
    cache.put(reference, b"\xff\xd8jpeg bytes")
    cache.put(reference, b"\xff\xd8jpeg bytes")  # a second writer replaces the file whole
    assert cache.get(reference) == b"\xff\xd8jpeg bytes" and cache.get(reference + "x") is None
    assert cache.has(reference) and not cache.has(reference + "x")
    names = [p.name for p in (tmp_path / "images").iterdir()]
    assert len(names) == 1 and "SECRET" not in names[0] and not names[0].startswith(".tmp-")


def test_tensor_list_cache_persists_float16_chunks_within_its_budget(tmp_path: Path) -> None:
    folder = tmp_path / "body"
    value = [torch.randn(4, 8, 8), torch.randn(8, 4, 4)]
    first = TensorListCache(folder, max_bytes=10 * 2**20)
    first[b"k1"] = value
    assert [t.dtype for t in first[b"k1"]] == [torch.float32, torch.float32]
    assert first.flush() == 1 and first.flush() == 0  # nothing new the second time
    again = TensorListCache(folder, max_bytes=10 * 2**20)
    assert again.loaded == 1 and list(again) == [b"k1"]
    for got, want in zip(again[b"k1"], value, strict=True):
        assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)  # float16 on disk
    # Past the budget the oldest chunks go first; their entries are simply computed again later.
    one_chunk = next(folder.glob("chunk-*.pt")).stat().st_size
    small = TensorListCache(folder, max_bytes=int(1.5 * one_chunk))
    small[b"k2"] = value
    assert small.flush() == 1
    assert TensorListCache(folder, max_bytes=0).loaded == 1 and b"k2" in TensorListCache(folder, 1)
    off = TensorListCache(tmp_path / "off", max_bytes=0)
    off[b"k"] = value
    assert off.flush() == 0 and not (tmp_path / "off").exists() and len(off) == 1
