"""Models: each is `Classifier(features, head)`; `model(x)` gives logits, `model.embed(x)` also the
penultimate features that BAIT, BADGE and k-center use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fm_ray.config import ModelConfig
from fm_ray.errors import UserError


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head  # the final layer: BAIT's mask and FisherMask's always-included layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_N_C, feats_N_E)."""
        feats = self.features(x)
        return self.head(feats), feats


def _cnn(channels: int, n_classes: int) -> Classifier:
    features = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),  # 28x28 and 32x32 inputs alike
        nn.Flatten(),
        nn.Linear(32 * 16, 128),
        nn.ReLU(),
    )
    return Classifier(features, nn.Linear(128, n_classes))


def _mlp(channels: int, n_classes: int, side: int) -> Classifier:
    features = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * side * side, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
    )
    return Classifier(features, nn.Linear(128, n_classes))


def _resnet18(channels: int, n_classes: int, pretrained: bool) -> Classifier:
    import torchvision

    weights = None
    if pretrained:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        net = torchvision.models.resnet18(weights=weights)
    except Exception as e:  # offline: torch hub cannot fetch the weights
        raise UserError(
            f"could not load torchvision's ImageNet ResNet-18 weights ({type(e).__name__}): "
            "go online once (they are cached in ~/.cache/torch) or drop --pretrained"
        ) from None
    if channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # grey inputs: the sum of the RGB filters sees the same image
            with torch.no_grad():
                net.conv1.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    in_features = net.fc.in_features
    net.fc = nn.Identity()  # type: ignore[assignment]
    return Classifier(net, nn.Linear(in_features, n_classes))


MODELS: dict[str, Callable[[ModelConfig, int, int, int], Classifier]] = {
    "cnn": lambda cfg, ch, side, c: _cnn(ch, c),
    "mlp": lambda cfg, ch, side, c: _mlp(ch, c, side),
    "resnet18": lambda cfg, ch, side, c: _resnet18(ch, c, cfg.pretrained),
}


def check_model(cfg: ModelConfig) -> None:
    if cfg.name not in MODELS:
        raise UserError(f"unknown model {cfg.name!r}: choose one of {', '.join(MODELS)}")
    if cfg.pretrained and cfg.name != "resnet18":
        raise UserError(f"--pretrained applies to resnet18 only, not {cfg.name!r}: drop --pretrained")


def build_model(cfg: ModelConfig, channels: int, side: int, n_classes: int) -> Classifier:
    check_model(cfg)
    return MODELS[cfg.name](cfg, channels, side, n_classes)
