"""The VOC loader on a tiny VOC tree the test writes: bad boxes and a broken image are reported, not fatal."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isal_backend.bench.voc import load_voc

XML = """<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
       "<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _write_voc(root: Path) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    specs = {
        "a": [("cat", 10, 10, 50, 40)],
        "b": [("dog", 5, 5, 5, 30), ("cat", 60, -8, 120, 30), ("dog", 20, 20, 40, 45), ("bird", 1, 1, 9, 9)],
        "c": [("cat", 1, 1, 20, 20)],
    }
    for name, objects in specs.items():
        body = "".join(OBJ.format(label=lb, x0=x0, y0=y0, x1=x1, y1=y1) for lb, x0, y0, x1, y1 in objects)
        (root / "Annotations" / f"{name}.xml").write_text(XML.format(name=name, w=100, h=50, objects=body))
        if name == "c":
            (root / "JPEGImages" / "c.jpg").write_bytes(b"not a jpeg at all")
        else:
            Image.fromarray(np.full((50, 100, 3), 128, dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets/Main/train.txt").write_text("a\nc\n")
    (root / "ImageSets/Main/test.txt").write_text("b\n")


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "MyVOC"
    _write_voc(root)
    return root


def _check(data, scale: float = 1.0) -> None:
    assert data.names == ["a", "b"]  # c failed to decode and is reported, not fatal
    assert data.classes == ("cat", "dog")
    assert data.images[0].shape == (3, round(50 * scale), round(100 * scale))
    assert data.images[0].dtype == torch.uint8
    kinds = sorted((i.kind, i.region) for i in data.issues)
    assert kinds == [("clipped", "b object 1"), ("unknown_label", "b object 3"), ("unreadable", "c"),
                     ("zero_area", "b object 0")]
    assert all(i.region in i.message for i in data.issues)
    b = data.targets[1]
    assert b["labels"].tolist() == [0, 1]
    assert torch.allclose(b["boxes"], scale * torch.tensor([[60.0, 0.0, 100.0, 30.0], [20.0, 20.0, 40.0, 45.0]]))
    assert data.splits == {"train": [0], "test": [1]}
    assert data.num_boxes == 3


def test_voc_folder(voc: Path) -> None:
    _check(load_voc(voc, classes=("cat", "dog")))


def test_voc_archive_and_resizing(voc: Path, tmp_path: Path) -> None:
    archive = tmp_path / "myvoc.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(voc, arcname="./MyVOC")
    _check(load_voc(archive, classes=("cat", "dog"), max_side=50), scale=0.5)


def test_default_classes_and_missing_folder(voc: Path, tmp_path: Path) -> None:
    data = load_voc(voc)
    assert data.classes == ("bird", "cat", "dog")
    assert [i.kind for i in data.issues].count("unknown_label") == 0
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_voc(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="JPEGImages"):
        load_voc(tmp_path / "empty")
