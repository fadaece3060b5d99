"""Benchmark data as a Label Studio project would hold it: tasks with image references, their bytes, the truth.

Classification: Fashion-MNIST (the Debian package ``dataset-fashion-mnist``), CIFAR-10
(``cifar10-jpg.tar.gz`` in the data root, read from the tar, never unpacked) and a user's folder of class
sub-folders. Detection: BCCD (``bccd-voc.tar.gz``) or a Pascal VOC folder. Nothing is downloaded.

Each image is served as the bytes of a file (the CIFAR-10 JPEGs, a folder's files, Fashion-MNIST's
arrays encoded as PNG once), so the benchmark's round decodes images exactly as the product does. The
truth of each item is the Label Studio ``result`` an annotator would submit. The frozen backbone's
features are cached by the round's own feature cache, in a folder named by a hash of the data set's
identity (``$ISAL_CACHE_DIR``), so a later run of any strategy or seed reads them back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from isal_backend.bench.paths import cache_dir, resolve_data_root
from isal_backend.bench.voc import BCCD_CLASSES, bccd_archive, load_voc
from isal_backend.detection.boxes import boxes_to_regions
from isal_backend.labelstudio.config import ClassificationConfig, DetectionConfig
from isal_backend.labelstudio.convert import prediction_result

#: Bumped whenever what a reference names changes, so old cached features are not reused.
CACHE_VERSION = 2
CLASSIFICATION_BUILTIN = ("fashion-mnist", "cifar10")
DETECTION_BUILTIN = ("bccd",)
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
CIFAR10_ARCHIVE = "cifar10-jpg.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Share of each class a folder data set keeps for testing.
FOLDER_TEST_FRACTION = 0.2
IMAGE_NAME, CONTROL_NAME = "image", "label"


@dataclass
class BenchItem:
    """One image: its reference, its class (classification) and the ``result`` the annotator submits."""

    reference: str
    label: int  # class index (classification, -1 for none); number of boxes (detection)
    result: list[dict[str, Any]]
    #: None of the classes: the annotator skips it (Label Studio stores a cancelled annotation).
    skip: bool = False


@dataclass
class BenchSet:
    """A benchmark data set: pool and test items, their bytes, and the label config of its project."""

    name: str
    kind: str  # "classification" | "detection"
    classes: list[str]
    pool: list[BenchItem]
    test: list[BenchItem]
    images: Callable[[str], bytes]
    identity: str  # a hash of everything that makes the items what they are (the feature cache's folder)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label_config(self) -> str:
        return label_config(self.kind, self.classes)

    @property
    def config(self) -> ClassificationConfig | DetectionConfig:
        if self.kind == "detection":
            return DetectionConfig(IMAGE_NAME, IMAGE_NAME, CONTROL_NAME, list(self.classes))
        return ClassificationConfig(IMAGE_NAME, IMAGE_NAME, CONTROL_NAME, list(self.classes))

    @property
    def features_dir(self) -> Path:
        """Where the round's feature cache keeps this data set's features between runs."""
        return cache_dir() / f"{self.name}-{self.identity}"


def label_config(kind: str, classes: list[str]) -> str:
    """The Label Studio config of a benchmark project: one <Image>, one <Choices> or <RectangleLabels>."""
    if kind == "detection":
        options = "".join(f'<Label value="{c}"/>' for c in classes)
        control = f'<RectangleLabels name="{CONTROL_NAME}" toName="{IMAGE_NAME}">{options}</RectangleLabels>'
    else:
        options = "".join(f'<Choice value="{c}"/>' for c in classes)
        control = f'<Choices name="{CONTROL_NAME}" toName="{IMAGE_NAME}">{options}</Choices>'
    return f'<View><Image name="{IMAGE_NAME}" value="${IMAGE_NAME}"/>{control}</View>'


def is_detection_dataset(name: str) -> bool:
    """BCCD, or a Pascal VOC folder (``JPEGImages/`` and ``Annotations/``)."""
    path = Path(name).expanduser()
    return name in DETECTION_BUILTIN or ((path / "JPEGImages").is_dir() and (path / "Annotations").is_dir())


def check_dataset(dataset: str) -> None:
    """A clear error for a name that is neither a built-in data set nor an existing folder."""
    if dataset in CLASSIFICATION_BUILTIN or dataset in DETECTION_BUILTIN:
        return
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ValueError(
            f"unknown data set {dataset!r}: choose {', '.join(CLASSIFICATION_BUILTIN + DETECTION_BUILTIN)}, or give "
            "a folder with one sub-folder of images per class (or a Pascal VOC folder for detection)"
        )
    if not path.is_dir() and not tarfile.is_tarfile(path):
        raise ValueError(f"data set {dataset!r} is a file: give a folder with one sub-folder of images per class")


def _identity(*parts: object) -> str:
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _subset(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _choice_items(prefix: str, labels: np.ndarray, config: ClassificationConfig) -> list[BenchItem]:
    return [BenchItem(f"{prefix}{i}", int(y), prediction_result(config, config.labels[int(y)]))
            for i, y in zip(range(len(labels)), labels, strict=True)]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir(data_root: Path) -> Path:
    """The folder holding the four IDX files: ``<data root>/fashion-mnist`` or the Debian package's."""
    for candidate in (data_root / "fashion-mnist", *FASHION_MNIST_DIRS):
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked for train-images-idx3-ubyte.gz in "
        f"{data_root / 'fashion-mnist'} and {', '.join(map(str, FASHION_MNIST_DIRS))}): "
        "install it with `sudo apt-get install dataset-fashion-mnist`"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: magic, dims, then big-endian data."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: reinstall it with `sudo apt-get install dataset-fashion-mnist`")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = dtypes[data[2]], data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_root: Path, pool_size: int | None, test_size: int | None, seed: int) -> BenchSet:
    folder = fashion_mnist_dir(data_root)
    arrays: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split, prefix, size, salt in (("pool", "train", pool_size, 0), ("test", "t10k", test_size, 1)):
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        keep = _subset(len(y), size, seed + salt)
        arrays[split], labels[split] = np.ascontiguousarray(images[keep]), y[keep]
    config = ClassificationConfig(IMAGE_NAME, IMAGE_NAME, CONTROL_NAME, list(FASHION_MNIST_CLASSES))
    encoded: dict[str, bytes] = {}

    def image(reference: str) -> bytes:
        if reference not in encoded:
            _, split, index = reference.rsplit("/", 2)
            encoded[reference] = png_bytes(arrays[split][int(index)])
        return encoded[reference]

    source = sorted((p.name, p.stat().st_size) for p in folder.glob("*-ubyte.gz"))
    return BenchSet("fashion-mnist", "classification", list(FASHION_MNIST_CLASSES),
                    _choice_items("bench://fashion-mnist/pool/", labels["pool"], config),
                    _choice_items("bench://fashion-mnist/test/", labels["test"], config), image,
                    _identity("fashion-mnist", source, pool_size, test_size, seed))


# --------------------------------------------------------------------------- CIFAR-10


def cifar10_archive(data_root: Path) -> Path:
    path = data_root / CIFAR10_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 not found: {path} is missing. Put the project's {CIFAR10_ARCHIVE} "
            "(train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) there, or point --data-root / ISAL_DATA_ROOT "
            "at the folder that holds it"
        )
    return path


def _tar_images(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``split -> [(member name, class)]`` of every image in the archive, sorted by name."""
    out: dict[str, list[tuple[str, str]]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                out.setdefault(parts[-3], []).append((member.name, parts[-2]))
    return {k: sorted(v) for k, v in out.items()}


def load_cifar10(data_root: Path, pool_size: int | None, test_size: int | None, seed: int) -> BenchSet:
    """Seeded subsets of the train (pool) and test splits; each item serves its JPEG straight from the tar."""
    path = cifar10_archive(data_root)
    listing = _tar_images(path)
    if "train" not in listing or "test" not in listing:
        raise ValueError(f"{path} must hold train/<class>/*.jpg and test/<class>/*.jpg")
    classes = sorted({c for _, c in listing["train"]})
    config = ClassificationConfig(IMAGE_NAME, IMAGE_NAME, CONTROL_NAME, classes)
    wanted: dict[str, tuple[str, int]] = {}
    for split, tar_split, size, salt in (("pool", "train", pool_size, 0), ("test", "test", test_size, 1)):
        members = listing[tar_split]
        for i in np.sort(np.random.default_rng(seed + salt).permutation(len(members))[: size or len(members)]):
            name, cls = members[int(i)]
            wanted[name] = (split, classes.index(cls))
    blobs: dict[str, bytes] = {}
    items: dict[str, list[BenchItem]] = {"pool": [], "test": []}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.name in wanted:
                split, label = wanted[member.name]
                handle = tar.extractfile(member)
                assert handle is not None
                reference = f"bench://cifar10/{member.name}"
                blobs[reference] = handle.read()
                items[split].append(BenchItem(reference, label, prediction_result(config, classes[label])))
    return BenchSet("cifar10", "classification", classes, items["pool"], items["test"], blobs.__getitem__,
                    _identity("cifar10", path.stat().st_size, pool_size, test_size, seed))


# --------------------------------------------------------------------------- a folder of class folders


def folder_listing(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(image path, class index)]`` sorted, and the class names (the sub-folder names, sorted).

    Folders whose name starts with ``_`` or ``.`` are not classes.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    files = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders of images, found {len(classes)}")
    counts = np.bincount([y for _, y in files], minlength=len(classes))
    if counts.min() < 2:
        empty = [c for c, n in zip(classes, counts, strict=True) if n < 2]
        raise ValueError(f"every class folder in {root} needs at least two images; too few in: {', '.join(empty)}")
    return files, classes


def split_folder(
    labels: np.ndarray, seed: int, test_fraction: float = FOLDER_TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (pool, test) index split: each class gives ``test_fraction`` (at least one) to the test set."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        take = min(idx.size - 1, max(1, round(test_fraction * idx.size)))
        test.extend(idx[:take])
        pool.extend(idx[take:])
    return np.sort(np.asarray(pool)), np.sort(np.asarray(test))


def load_folder(root: Path, pool_size: int | None, test_size: int | None, seed: int) -> BenchSet:
    files, classes = folder_listing(root)
    config = ClassificationConfig(IMAGE_NAME, IMAGE_NAME, CONTROL_NAME, classes)
    labels = np.asarray([y for _, y in files], dtype=np.int64)
    pool_idx, test_idx = split_folder(labels, seed)
    pool_idx = pool_idx[_subset(pool_idx.size, pool_size, seed)]
    test_idx = test_idx[_subset(test_idx.size, test_size, seed + 1)]
    by_reference = {f"bench://folder/{f.relative_to(root).as_posix()}": f for f, _ in files}

    def items(index: np.ndarray) -> list[BenchItem]:
        out = []
        for i in index:
            path, y = files[int(i)]
            out.append(BenchItem(f"bench://folder/{path.relative_to(root).as_posix()}", y,
                                 prediction_result(config, classes[y])))
        return out

    def image(reference: str) -> bytes:
        return by_reference[reference].read_bytes()

    source = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f, _ in files]
    return BenchSet(root.name, "classification", classes, items(pool_idx), items(test_idx), image,
                    _identity(str(root), source, pool_size, test_size, seed), info={"folder": str(root)})


# --------------------------------------------------------------------------- detection: Pascal VOC, BCCD


def load_detection(dataset: str, pool_size: int | None, test_size: int | None, seed: int,
                   data_root: Path | None = None) -> BenchSet:
    """``bccd`` or a VOC folder/archive; its trainval/test splits where present, else a seeded 80/20 split.

    The annotator's boxes are the files' boxes, in percent of each image (what Label Studio stores).
    """
    path = bccd_archive(data_root) if dataset == "bccd" else Path(dataset).expanduser()
    data = load_voc(path, BCCD_CLASSES if dataset == "bccd" else None, max_side=320)  # percent is scale-free
    if "test" in data.splits and ("trainval" in data.splits or "train" in data.splits):
        pool_idx = list(data.splits.get("trainval") or data.splits["train"])
        test_idx = list(data.splits["test"])
    else:
        order = np.random.default_rng(0).permutation(len(data)).tolist()
        cut = max(1, len(order) // 5)
        pool_idx, test_idx = sorted(order[cut:]), sorted(order[:cut])
    pool_idx = [pool_idx[int(i)] for i in _subset(len(pool_idx), pool_size, seed)]
    test_idx = [test_idx[int(i)] for i in _subset(len(test_idx), test_size, seed + 1)]
    classes = list(data.classes)
    blobs = {f"bench://{dataset if dataset == 'bccd' else path.name}/{data.names[i]}.jpg": data.data[i]
             for i in range(len(data))}
    references = list(blobs)

    def items(index: list[int]) -> list[BenchItem]:
        out = []
        for i in index:
            target, image = data.targets[i], data.images[i]
            regions = boxes_to_regions(target["boxes"].double(), target["labels"], classes, image.shape[2],
                                       image.shape[1], from_name=CONTROL_NAME, to_name=IMAGE_NAME)
            for region in regions:  # drop what only a prediction carries
                region.pop("id", None)
            out.append(BenchItem(references[i], len(target["labels"]), regions))
        return out

    return BenchSet(dataset if dataset == "bccd" else path.name, "detection", classes, items(pool_idx),
                    items(test_idx), blobs.__getitem__,
                    _identity(str(path), path.stat().st_size if path.is_file() else len(data), pool_size,
                              test_size, seed),
                    info={"data_issues": [i.message for i in data.issues]})


def junk_for(bench: BenchSet, data_root: str | None = None, seed: int = 0) -> tuple[list[BenchItem], Any]:
    """Images that are none of ``bench``'s classes, and their bytes: another data set's pool (CIFAR-10 for
    Fashion-MNIST and the reverse), or a folder data set's ``_skip`` sub-folder."""
    root = resolve_data_root(data_root)
    if bench.name == "fashion-mnist":
        other = load_cifar10(root, 6000, 0, seed)
    elif bench.name == "cifar10":
        other = load_fashion_mnist(root, 6000, 0, seed)
    elif bench.kind == "classification" and bench.info.get("folder"):
        skip = Path(str(bench.info["folder"])) / "_skip"
        files = sorted(f for f in skip.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) \
            if skip.is_dir() else []
        items = [BenchItem(f"bench://skip/{f.relative_to(skip).as_posix()}", -1, []) for f in files]
        by_reference = {i.reference: f for i, f in zip(items, files, strict=True)}
        return items, lambda reference: by_reference[reference].read_bytes()
    else:
        return [], None
    return other.pool, other.images


def load_bench_set(dataset: str, pool_size: int | None, test_size: int | None, data_root: str | None = None,
                   seed: int = 0) -> BenchSet:
    """The named data set (see :func:`check_dataset`), pool and test subsampled with ``seed``."""
    check_dataset(dataset)
    root = resolve_data_root(data_root)
    if is_detection_dataset(dataset) or (Path(dataset).is_file() and tarfile.is_tarfile(dataset)):
        return load_detection(dataset, pool_size, test_size, seed, root)
    if dataset == "fashion-mnist":
        return load_fashion_mnist(root, pool_size, test_size, seed)
    if dataset == "cifar10":
        return load_cifar10(root, pool_size, test_size, seed)
    return load_folder(Path(dataset).expanduser().resolve(), pool_size, test_size, seed)
