"""The untrained small-cnn backbone is one network everywhere: /predict (web process) and the workers agree."""

from __future__ import annotations

import torch

from isal_backend.models.backbones import build_backbone


def test_small_cnn_is_the_same_network_in_every_build() -> None:
    first, _ = build_backbone("small-cnn")
    torch.rand(10)  # whatever the process's random state did in between
    second, _ = build_backbone("small-cnn")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
