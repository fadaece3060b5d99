"""Pools as people have them: a clean benchmark pool made realistic, one knob at a time.

* ``junk``: a share of the pool is images that are none of the classes (out-of-distribution: taken from
  another data set, or a folder data set's ``_skip`` sub-folder); the simulated annotator skips them, as
  Label Studio records it (a cancelled annotation): the skip costs a label and teaches nothing;
* ``imbalance``: long-tailed class frequencies in the pool, from the most to the least frequent class
  ``RATIO`` to 1 (geometric), the test set left balanced;
* ``duplicates``: a share of near-copies of pool images (a small shift, brightness and noise, re-encoded);
* ``label_noise``: the share of the annotator's answers that are a wrong class.

Every change is drawn with the run's data seed, so every strategy of a run sees the same pool.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from isal_backend.bench.datasets import BenchItem, BenchSet, png_bytes
from isal_backend.labelstudio.convert import prediction_result


@dataclass(frozen=True)
class Scenario:
    junk: float = 0.0
    imbalance: float = 1.0
    duplicates: float = 0.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.junk < 1.0 or not 0.0 <= self.duplicates <= 1.0 or not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"--junk and --label-noise must be in [0, 1), --duplicates in [0, 1]: {self}")
        if self.imbalance < 1.0:
            raise ValueError(f"--imbalance is the ratio of the most to the least frequent class, >= 1: {self}")

    @property
    def clean(self) -> bool:
        return self == Scenario()

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def name(self) -> str:
        parts = [f"{k}={v:g}" for k, v in asdict(self).items() if v != getattr(Scenario(), k)]
        return ",".join(parts) or "clean"


def apply(bench: BenchSet, scenario: Scenario, junk: list[BenchItem] | None = None,
          junk_images: Any = None, seed: int = 0) -> BenchSet:
    """``bench`` with the scenario applied to its pool (its test set is left as it is)."""
    if scenario.clean:
        return bench
    if bench.kind != "classification" and (scenario.imbalance != 1.0 or scenario.label_noise or scenario.duplicates):
        raise ValueError("--imbalance, --duplicates and --label-noise are for classification data sets")
    rng = np.random.default_rng([seed, 7])
    config = bench.config
    pool = list(bench.pool)
    if scenario.imbalance > 1.0:
        classes = len(bench.classes)
        order = rng.permutation(classes)  # which class is frequent is drawn, not the class index
        by_class = {c: [item for item in pool if item.label == c] for c in range(classes)}
        most = min(len(v) for v in by_class.values())
        keep: list[BenchItem] = []
        for rank, c in enumerate(order):
            share = scenario.imbalance ** (-rank / max(1, classes - 1))
            members = by_class[int(c)]
            picked = rng.choice(len(members), max(2, round(most * share)), replace=False)
            keep += [members[int(i)] for i in sorted(picked)]
        pool = sorted(keep, key=lambda item: item.reference)
    extra: dict[str, bytes] = {}
    if scenario.duplicates:
        originals = rng.choice(len(pool), round(scenario.duplicates * len(pool)), replace=False)
        copies = []
        for n, i in enumerate(sorted(originals)):
            item = pool[int(i)]
            reference = f"{item.reference}#copy{n}"
            extra[reference] = near_copy(bench.images(item.reference), rng)
            copies.append(replace(item, reference=reference))
        pool = pool + copies
    if scenario.label_noise:
        noisy = set(rng.choice(len(pool), round(scenario.label_noise * len(pool)), replace=False).tolist())
        for i in sorted(noisy):
            item = pool[i]
            wrong = int(rng.choice([c for c in range(len(bench.classes)) if c != item.label]))
            pool[i] = replace(item, result=prediction_result(config, bench.classes[wrong]))
    if scenario.junk:
        if not junk:
            raise ValueError(f"--junk needs images that are none of {bench.name}'s classes: none are available")
        wanted = round(scenario.junk / (1.0 - scenario.junk) * len(pool))
        if wanted > len(junk):
            raise ValueError(f"--junk {scenario.junk:g} needs {wanted} out-of-distribution images, "
                             f"{len(junk)} are available")
        picked = [junk[int(i)] for i in sorted(rng.choice(len(junk), wanted, replace=False))]
        pool = pool + [BenchItem(f"junk:{item.reference}", -1, [], skip=True) for item in picked]
    base, more = bench.images, extra

    def images(reference: str) -> bytes:
        if reference in more:
            return more[reference]
        if junk_images is not None and reference.startswith("junk:"):
            return junk_images(reference.removeprefix("junk:"))
        return base(reference)

    info = {**bench.info, "scenario": scenario.describe(), "pool_classes": np.bincount(
        [i.label for i in pool if i.label >= 0], minlength=len(bench.classes)).tolist(),
        "junk_items": sum(1 for i in pool if i.skip), "duplicate_items": len(extra)}
    return replace(bench, pool=pool, images=images, info=info,
                   identity=bench.identity)  # features are per image: the cache stays valid


def near_copy(data: bytes, rng: np.random.Generator) -> bytes:
    """The image shifted by up to 2 pixels, brightness scaled by up to 10%, with mild noise: a near-duplicate."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    pixels = np.roll(np.roll(pixels, dx, axis=1), dy, axis=0)
    pixels = pixels * rng.uniform(0.9, 1.1) + rng.normal(0, 3, size=pixels.shape)
    return png_bytes(np.clip(pixels, 0, 255).astype(np.uint8))
