"""Full fine-tuning of a backbone on the labeled images (``ISAL_TRAIN_MODE=finetune``).

The default round keeps the backbone frozen, so features are cached and a round costs seconds. Fine-tuning
adapts the features to the project's images at the price of re-extracting every image's features each
round: an option for projects whose images are far from the backbone's pre-training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from isal_backend.models.backbones import Classifier, build_backbone


def finetune_backbone(
    backbone: str,
    weights: dict[str, torch.Tensor] | None,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train backbone and a fresh head on ``images`` (uint8, N x S x S x 3); return the backbone's weights.

    Starts from ``weights`` (the previous round's fine-tuned backbone) when given. Batch-norm statistics
    stay frozen: labeled sets are small and batches of a few images would wreck them. Returns the mean
    loss of each epoch too, so the round's report shows the training went somewhere.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"fine-tuning needs labeled images, got {len(images)} images and {len(labels)} labels")
    torch.manual_seed(seed)
    net, preprocess = build_backbone(backbone)
    if weights is not None:
        net.load_state_dict(weights)
    model = Classifier(net, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = preprocess(torch.from_numpy(images))
    y_all = torch.as_tensor(labels, dtype=torch.long)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        order = rng.permutation(len(y_all))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = torch.as_tensor(order[start : start + batch_size])
            loss = F.cross_entropy(model(x_all[idx].to(device)), y_all[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y_all))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, losses
