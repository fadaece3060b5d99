"""Benchmark data: Fashion-MNIST, CIFAR-10 and a user's folder of class sub-folders, as cached features.

The loop retrains only a linear head, so the frozen backbone runs ONCE per (data set, backbone,
subset): its features are cached on disk (``$ISAL_CACHE_DIR`` or ``~/.cache/isal_backend/features``)
under a hash of every setting that changes them, and every later run of any strategy or seed
reads them back in milliseconds.

Nothing is downloaded: Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``,
CIFAR-10 from ``cifar10-jpg.tar.gz`` in the data root (read from the tar, never unpacked).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

#: Bumped whenever the way features are computed changes, so old cache entries are not reused.
CACHE_VERSION = 1
BUILTIN = ("fashion-mnist", "cifar10")
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
CIFAR10_ARCHIVE = "cifar10-jpg.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Share of each class a folder data set keeps for testing.
FOLDER_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataSpec:
    """Which images and which features: everything that goes into the cache key."""

    dataset: str
    backbone: str
    image_size: int
    pool_size: int | None  # None: the whole pool
    test_size: int | None  # None: the whole test split
    subset_seed: int = 0


@dataclass
class FeatureSet:
    """Cached features of the pool and of the test set, with their labels."""

    pool_features: torch.Tensor
    pool_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    info: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class RawImages:
    """uint8 images, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, and integer labels."""

    images: np.ndarray
    labels: np.ndarray


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """``--data-root``, else ``$ISAL_DATA_ROOT``, else ``<repo>/../shared/data`` (where CI keeps it)."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get("ISAL_DATA_ROOT"):
        return Path(os.environ["ISAL_DATA_ROOT"]).expanduser()
    return repo_root().parent / "shared" / "data"


def cache_dir() -> Path:
    return Path(os.environ.get("ISAL_CACHE_DIR") or Path.home() / ".cache" / "isal_backend" / "features")


def check_dataset(dataset: str) -> None:
    """A clear error for a name that is neither a built-in data set nor an existing folder."""
    if dataset in BUILTIN:
        return
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ValueError(
            f"unknown data set {dataset!r}: choose {', '.join(BUILTIN)} or bccd (detection), or give a folder with one "
            "sub-folder of images per class"
        )
    if not path.is_dir():
        raise ValueError(f"data set {dataset!r} is a file: give a folder with one sub-folder of images per class")


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


def load_fashion_mnist(split: str, data_root: Path) -> RawImages:
    folder = fashion_mnist_dir(data_root)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    return RawImages(np.ascontiguousarray(images), labels.astype(np.int64))


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


def load_cifar10(data_root: Path, sizes: dict[str, int | None], seed: int) -> tuple[dict[str, RawImages], list[str]]:
    """Seeded random subsets of the train and test splits, decoded straight from the tar."""
    from PIL import Image

    path = cifar10_archive(data_root)
    listing = _tar_images(path)
    if "train" not in listing or "test" not in listing:
        raise ValueError(f"{path} must hold train/<class>/*.jpg and test/<class>/*.jpg")
    classes = sorted({c for _, c in listing["train"]})
    wanted: dict[str, tuple[str, int]] = {}
    for split, size in sizes.items():
        members = listing[split]
        order = np.random.default_rng(seed).permutation(len(members))[: size or len(members)]
        for i in sorted(order):
            name, cls = members[i]
            wanted[name] = (split, classes.index(cls))
    decoded: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in sizes}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.name in wanted:
                split, label = wanted[member.name]
                handle = tar.extractfile(member)
                assert handle is not None
                image = Image.open(io.BytesIO(handle.read())).convert("RGB")
                decoded[split][0].append(np.asarray(image))
                decoded[split][1].append(label)
    return {s: RawImages(np.stack(x), np.asarray(y, dtype=np.int64)) for s, (x, y) in decoded.items()}, classes


# --------------------------------------------------------------------------- a folder of class folders


def folder_listing(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(image path, class index)]`` sorted, and the class names (the sub-folder names, sorted)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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


def load_image_files(paths: list[Path], size: int) -> np.ndarray:
    """RGB uint8 ``(N, size, size, 3)``: images of any size are resized once, here, so they stack."""
    from PIL import Image

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as image:
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return out


# --------------------------------------------------------------------------- features and their cache


def _subset(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _source_identity(spec: DataSpec, data_root: Path) -> object:
    """What identifies the raw data: file sizes for the built-ins, every file's size and mtime for a folder."""
    if spec.dataset == "fashion-mnist":
        folder = fashion_mnist_dir(data_root)
        return sorted((p.name, p.stat().st_size) for p in folder.glob("*-ubyte.gz"))
    if spec.dataset == "cifar10":
        path = cifar10_archive(data_root)
        return [path.name, path.stat().st_size]
    root = Path(spec.dataset).expanduser().resolve()
    files, _ = folder_listing(root)
    return [str(root)] + [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f, _ in files]


def cache_key(spec: DataSpec, data_root: Path) -> str:
    settings = {"version": CACHE_VERSION, "spec": spec.__dict__, "source": _source_identity(spec, data_root)}
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def raw_splits(spec: DataSpec, data_root: Path) -> tuple[RawImages, RawImages, list[str]]:
    """The pool and test images of ``spec`` (subsets drawn with ``spec.subset_seed``)."""
    if spec.dataset == "fashion-mnist":
        train, test = load_fashion_mnist("train", data_root), load_fashion_mnist("test", data_root)
        pi = _subset(len(train.labels), spec.pool_size, spec.subset_seed)
        ti = _subset(len(test.labels), spec.test_size, spec.subset_seed + 1)
        pool = RawImages(train.images[pi], train.labels[pi])
        return pool, RawImages(test.images[ti], test.labels[ti]), list(FASHION_MNIST_CLASSES)
    if spec.dataset == "cifar10":
        splits, classes = load_cifar10(data_root, {"train": spec.pool_size, "test": spec.test_size}, spec.subset_seed)
        return splits["train"], splits["test"], classes
    files, classes = folder_listing(Path(spec.dataset).expanduser().resolve())
    labels = np.asarray([y for _, y in files], dtype=np.int64)
    pool_idx, test_idx = split_folder(labels, spec.subset_seed)
    pool_idx = pool_idx[_subset(pool_idx.size, spec.pool_size, spec.subset_seed)]
    test_idx = test_idx[_subset(test_idx.size, spec.test_size, spec.subset_seed + 1)]
    images = load_image_files([files[i][0] for i in np.concatenate([pool_idx, test_idx])], spec.image_size)
    pool = RawImages(images[: pool_idx.size], labels[pool_idx])
    return pool, RawImages(images[pool_idx.size :], labels[test_idx]), classes


def compute_features(images: np.ndarray, spec: DataSpec, device: str, progress: bool) -> torch.Tensor:
    """Backbone features of uint8 images; ``pixels`` is the identity (flattened, scaled to [0, 1])."""
    if spec.backbone == "pixels":
        return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    from isal_backend.models.backbones import build_backbone, extract_features

    torch.manual_seed(0)  # random-init backbones (small-cnn, resnet18-cifar) are then reproducible
    backbone, preprocess = build_backbone(spec.backbone, image_size=spec.image_size)
    x = torch.from_numpy(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return extract_features(backbone, preprocess, x, batch_size=128, device=device, progress=progress)


def load_features(
    spec: DataSpec, data_root: str | os.PathLike[str] | None = None, device: str = "cpu", progress: bool = True
) -> FeatureSet:
    """Features of ``spec``, from the cache when there, computed once and stored otherwise."""
    check_dataset(spec.dataset)
    root = resolve_data_root(data_root)
    if spec.dataset not in BUILTIN:
        spec = replace(spec, dataset=str(Path(spec.dataset).expanduser().resolve()))
    path = cache_dir() / f"{Path(spec.dataset).name}-{spec.backbone}-{cache_key(spec, root)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info = {"cache": str(path), "cached": True, "extract_seconds": blob["extract_seconds"]}
        return FeatureSet(
            blob["pool_features"], blob["pool_labels"], blob["test_features"], blob["test_labels"],
            list(blob["class_names"]), info,
        )
    start = time.perf_counter()
    pool, test, classes = raw_splits(spec, root)
    both = np.concatenate([pool.images, test.images])
    features = compute_features(both, spec, device, progress)
    seconds = time.perf_counter() - start
    blob = {
        "pool_features": features[: len(pool.labels)].contiguous(),
        "pool_labels": torch.from_numpy(pool.labels),
        "test_features": features[len(pool.labels) :].contiguous(),
        "test_labels": torch.from_numpy(test.labels),
        "class_names": classes,
        "extract_seconds": seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    tmp.replace(path)
    info = {"cache": str(path), "cached": False, "extract_seconds": seconds}
    return FeatureSet(
        blob["pool_features"], blob["pool_labels"], blob["test_features"], blob["test_labels"], classes, info
    )
