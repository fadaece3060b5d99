"""Pascal VOC detection data: a folder (``JPEGImages/``, ``Annotations/``) or a ``.tar.gz`` of one.

The BCCD archive (``bccd-voc.tar.gz`` in the data root, see :func:`isal_backend.bench.paths.resolve_data_root`)
is read in place (no extraction): members
are looked up by their path suffix, so ``./BCCD/JPEGImages/x.jpg`` and ``JPEGImages/x.jpg`` both work.
Boxes go through :func:`~isal_backend.detection.boxes.validate_boxes` against the DECODED image size
(an XML ``<size>`` can lie): outside -> clipped, zero area -> dropped, each reported. An image that
fails to decode, or whose XML does not parse, is skipped and reported; it never stops the load.
Splits come from ``ImageSets/Main/<split>.txt`` where present.
"""

from __future__ import annotations

import io
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isal_backend.bench.paths import resolve_data_root
from isal_backend.detection.boxes import BoxIssue, validate_boxes

BCCD_ARCHIVE_NAME = "bccd-voc.tar.gz"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")


@dataclass
class DetectionDataset:
    """Decoded images (uint8, ``(3, H, W)``) with pixel boxes and class indices, and the files' bytes."""

    names: list[str]
    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]  # boxes float32 (n, 4) x0 y0 x1 y1; labels int64 (n,)
    classes: tuple[str, ...]
    data: list[bytes] = field(default_factory=list)  # each image file as stored (what a task would serve)
    scales: list[float] = field(default_factory=list)  # shrunk size / original size, per image
    splits: dict[str, list[int]] = field(default_factory=dict)
    issues: list[BoxIssue] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def split(self, name: str) -> list[int]:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; the data set has {sorted(self.splits) or 'no splits'}")
        return self.splits[name]

    @property
    def num_boxes(self) -> int:
        return sum(len(t["labels"]) for t in self.targets)


class _Source:
    """Uniform read access to a folder or a tar archive of a VOC tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}
        if path.is_dir():
            for p in path.rglob("*"):
                if p.is_file():
                    self.files[p.relative_to(path).as_posix()] = str(p)
        elif tarfile.is_tarfile(path):
            # One sequential pass: random access into a .tar.gz re-decompresses from the start each time.
            with tarfile.open(path) as tar:
                for member in tar:
                    handle = tar.extractfile(member) if member.isfile() else None
                    if handle is not None:
                        rel = member.name.removeprefix("./")
                        self.files[rel] = rel
                        self.blobs[rel] = handle.read()
        else:
            raise ValueError(f"{path}: neither a folder nor a tar archive of a Pascal VOC data set")

    def find(self, folder: str, keep_suffix: bool = False) -> dict[str, str]:
        """``name -> key`` of the files whose parent folder path ends with ``folder``."""
        out = {}
        for rel in self.files:
            parent, _, fname = rel.rpartition("/")
            if parent == folder or parent.endswith("/" + folder):
                out[fname if keep_suffix else Path(fname).stem] = rel
        return out

    def read(self, rel: str) -> bytes:
        if rel in self.blobs:
            return self.blobs[rel]
        return Path(self.files[rel]).read_bytes()


def _parse_xml(data: bytes, name: str) -> list[tuple[str, list[float], bool]]:
    root = ET.fromstring(data)
    out = []
    for obj in root.iter("object"):
        label = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{name}: an <object> without <bndbox>")
        coords = [float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        out.append((label, coords, (obj.findtext("difficult") or "0").strip() == "1"))
    return out


def load_voc(
    path: str | Path, classes: tuple[str, ...] | None = None, limit: int | None = None, max_side: int | None = None
) -> DetectionDataset:
    """Load a VOC folder or archive.

    ``classes`` fixes the label order (default: the sorted names found). ``max_side`` shrinks each
    image (and its boxes) so its long side is at most that: the detector resizes to its input size
    anyway, and BCCD at 320 px takes 84 MB instead of 335 MB.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or archive (expected JPEGImages/ and Annotations/)")
    src = _Source(path)
    images_by_stem = src.find("JPEGImages")
    xml_by_stem = src.find("Annotations")
    if not images_by_stem or not xml_by_stem:
        raise ValueError(f"{path}: a Pascal VOC data set needs JPEGImages/ and Annotations/ (found "
                         f"{len(images_by_stem)} images, {len(xml_by_stem)} annotation files)")
    issues: list[BoxIssue] = []
    parsed: list[tuple[str, torch.Tensor, float, list[tuple[str, list[float], bool]], bytes]] = []
    for stem in sorted(xml_by_stem):
        if limit is not None and len(parsed) >= limit:
            break
        if stem not in images_by_stem:
            issues.append(BoxIssue("missing_image", stem, f"{stem}: annotation without an image; skipped"))
            continue
        try:
            objects = _parse_xml(src.read(xml_by_stem[stem]), stem)
            raw = src.read(images_by_stem[stem])
            with Image.open(io.BytesIO(raw)) as im:
                rgb = im.convert("RGB")
                width, height = rgb.size
                scale = 1.0
                if max_side is not None and max(width, height) > max_side:
                    scale = max_side / max(width, height)
                    rgb = rgb.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
                array = np.asarray(rgb)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            issues.append(BoxIssue("unreadable", stem, f"{stem}: failed to load ({type(exc).__name__}: {exc}); "
                                   "skipped"))
            continue
        parsed.append((stem, torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), scale, objects, raw))
    found = sorted({label for _, _, _, objs, _ in parsed for label, _, _ in objs})
    classes = tuple(classes) if classes is not None else tuple(found)
    names, images, targets, data, scales = [], [], [], [], []
    for stem, image, scale, objects, raw in parsed:
        ok = [j for j, o in enumerate(objects) if o[0] in classes]
        for j, o in enumerate(objects):
            if o[0] not in classes:
                issues.append(BoxIssue("unknown_label", f"{stem} object {j}",
                                       f"{stem} object {j}: label {o[0]!r} not in {classes}; dropped"))
        boxes = torch.tensor([objects[j][1] for j in ok], dtype=torch.float64).reshape(-1, 4)
        # Validate in the original pixel frame (messages quote the file's numbers), then scale.
        full_w, full_h = image.shape[2] / scale, image.shape[1] / scale
        boxes, keep, more = validate_boxes(boxes, round(full_w), round(full_h), [f"{stem} object {j}" for j in ok])
        issues += more
        labels = torch.tensor([classes.index(objects[j][0]) for j in ok], dtype=torch.int64)
        names.append(stem)
        images.append(image)
        targets.append({"boxes": (boxes[keep] * scale).float(), "labels": labels[keep]})
        data.append(raw)
        scales.append(scale)
    splits: dict[str, list[int]] = {}
    index = {n: i for i, n in enumerate(names)}
    for fname, rel in src.find("ImageSets/Main", keep_suffix=True).items():
        if fname.endswith(".txt") and "_" not in fname:
            stems = src.read(rel).decode().split()
            splits[fname[:-4]] = [index[s] for s in stems if s in index]
    return DetectionDataset(names, images, targets, classes, data, scales, splits, issues)


def load_bccd(
    archive: str | Path | None = None, limit: int | None = None, max_side: int | None = None
) -> DetectionDataset:
    """BCCD from the data root's archive with the class order RBC, WBC, Platelets."""
    return load_voc(archive or bccd_archive(), BCCD_CLASSES, limit=limit, max_side=max_side)


def bccd_archive(data_root: str | Path | None = None) -> Path:
    """Where BCCD is looked for: the data root's ``bccd-voc.tar.gz`` (see ``ISAL_DATA_ROOT``)."""
    return resolve_data_root(data_root) / BCCD_ARCHIVE_NAME
