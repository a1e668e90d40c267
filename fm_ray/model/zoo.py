"""Models: each is `Classifier(features, head)`; `model(x)` gives logits, `model.embed(x)` also the
penultimate features that BAIT, BADGE and k-center use.

Built in: `cnn`, `mlp`, `resnet18`; and `torchvision:<name>`, any torchvision classification model,
whose last `nn.Linear` becomes the head (see `_torchvision`). `--pretrained` loads torchvision's
ImageNet weights from the torch cache, `--checkpoint` a state dict of the whole Classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from fm_ray.config import ModelConfig
from fm_ray.errors import UserError

TORCHVISION = "torchvision:"
LIST_NAMES = "python -c 'import torchvision as tv; print(tv.models.list_models(module=tv.models))'"


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


# ---------------------------------------------------------------------------------------------
# torchvision models: the network up to its last Linear becomes `features`, a new Linear the head.


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _pretrained_net(arch: str) -> nn.Module:
    """The torchvision model with its default ImageNet weights, read from the torch cache."""
    import torchvision

    from fm_ray._internal.files import offline  # the project's one offline switch (FM_RAY_OFFLINE)

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    where = f"{cached.name} is not in the torch cache {cached.parent}"
    fix = "go online once, or copy the file there (TORCH_HOME sets the cache), or drop --pretrained"
    if not cached.is_file() and offline():
        raise UserError(f"no ImageNet weights for {TORCHVISION}{arch}: {where} and FM_RAY_OFFLINE is set: {fix}")
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except Exception as e:  # offline: torch hub cannot fetch them; or a corrupt cached file
        if not cached.is_file():
            where += " and downloading it failed"
        else:
            where = f"the cached {cached} could not be loaded"
        raise UserError(f"no ImageNet weights for {TORCHVISION}{arch}: {where} ({type(e).__name__}): {fix}") from None


def _swap(net: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent), leaf, new)


def _adapt_first_conv(net: nn.Module, arch: str, channels: int, pretrained: bool) -> None:
    """Replace the first 3-channel Conv2d by one taking `channels`. Pretrained: each new filter is the
    RGB filters' sum / channels, so a grey image (1 channel) gets the response of its RGB copy."""
    first = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if first is None or first[1].groups != 1:
        raise UserError(
            f"{TORCHVISION}{arch} has no plain 3-channel first Conv2d to adapt to {channels}-channel images"
        )
    path, old = first
    new = nn.Conv2d(
        channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        old.stride,  # type: ignore[arg-type]
        old.padding,  # type: ignore[arg-type]
        old.dilation,  # type: ignore[arg-type]
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True).expand_as(new.weight) / channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)  # type: ignore[union-attr]
    _swap(net, path, new)


def _torchvision(arch: str, channels: int, side: int, n_classes: int, pretrained: bool) -> Classifier:
    """Any torchvision classifier: its last `nn.Linear` (in module order, the classifier for every
    torchvision classification model that has one) becomes Identity and a new C-way Linear the head,
    so `embed` returns what that Linear saw."""
    import torchvision

    net = _pretrained_net(arch) if pretrained else torchvision.models.get_model(arch)
    if getattr(net, "aux_logits", False):  # googlenet / inception_v3: train-mode forward returns a tuple
        net.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    if channels != 3:
        _adapt_first_conv(net, arch, channels, pretrained)
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{TORCHVISION}{arch} has no nn.Linear classifier to replace: choose another model")
    path, last = linears[-1]
    _swap(net, path, nn.Identity())
    head = nn.Linear(last.in_features, n_classes)
    _check_runs(net, arch, channels, side, last.in_features)
    return Classifier(net, head)


def _check_runs(net: nn.Module, arch: str, channels: int, side: int, n_feats: int) -> None:
    """One eval-mode forward of a zero batch (no RNG, no BatchNorm statistics touched), so a model that
    cannot take these images fails now with a clear message, not mid-round."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, channels, side, side))
    except Exception as e:
        raise UserError(
            f"{TORCHVISION}{arch} cannot run on {channels}x{side}x{side} images ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): choose a model that takes small images, e.g. "
            f"{TORCHVISION}resnet34"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (2, n_feats):
        raise UserError(f"{TORCHVISION}{arch}: its last nn.Linear is not its final layer: choose another model")


MODELS: dict[str, Callable[[ModelConfig, int, int, int], Classifier]] = {
    "cnn": lambda cfg, ch, side, c: _cnn(ch, c),
    "mlp": lambda cfg, ch, side, c: _mlp(ch, c, side),
    "resnet18": lambda cfg, ch, side, c: _torchvision("resnet18", ch, side, c, cfg.pretrained),
}
PRETRAINABLE = ("resnet18", f"{TORCHVISION}<name>")


def _arch(name: str) -> str | None:
    """The torchvision architecture a model name stands for, or None for the small built-ins."""
    if name.startswith(TORCHVISION):
        return name[len(TORCHVISION) :]
    return "resnet18" if name == "resnet18" else None


def check_model(cfg: ModelConfig) -> None:
    """Checks that need no data: the name, --pretrained, and that --checkpoint is a file."""
    arch = _arch(cfg.name)
    if cfg.name.startswith(TORCHVISION):
        if arch not in _torchvision_names():
            raise UserError(f"unknown torchvision model {arch!r}: list the names with {LIST_NAMES}")
    elif cfg.name not in MODELS:
        raise UserError(
            f"unknown model {cfg.name!r}: choose one of {', '.join(MODELS)} or {TORCHVISION}<name> "
            "(any torchvision classification model, e.g. torchvision:resnet34)"
        )
    if cfg.pretrained and arch is None:
        raise UserError(f"--pretrained applies to {' and '.join(PRETRAINABLE)}, not {cfg.name!r}: drop --pretrained")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise UserError(f"--checkpoint {cfg.checkpoint}: no such file: give a state dict saved with torch.save")


def features_model(spec: str, model: ModelConfig) -> ModelConfig:
    """--features as a model config: torchvision:<name> (ImageNet weights where `model` is --pretrained)
    or checkpoint:<path> (`model`'s architecture with that state dict)."""
    if spec.startswith("checkpoint:"):
        return ModelConfig(model.name, checkpoint=spec.split(":", 1)[1])
    return ModelConfig(spec, pretrained=model.pretrained)


def build_model(cfg: ModelConfig, channels: int, side: int, n_classes: int) -> Classifier:
    check_model(cfg)
    if cfg.name.startswith(TORCHVISION):
        model = _torchvision(cfg.name[len(TORCHVISION) :], channels, side, n_classes, cfg.pretrained)
    else:
        model = MODELS[cfg.name](cfg, channels, side, n_classes)
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, f"--model {cfg.name} with {n_classes} classes")
    return model


# ---------------------------------------------------------------------------------------------
# --checkpoint


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_checkpoint(model: nn.Module, path: str, what: str) -> None:
    """Load a state dict (`torch.save(model.state_dict(), path)`, e.g. a run's checkpoint-r<round>.pt) into
    `model`; every way it can fail is one UserError naming the file and what does not fit."""
    fix = "save one with torch.save(model.state_dict(), path) from the same --model and classes"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file: give a state dict saved with torch.save") from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"--checkpoint {path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {msg}): {fix}"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapping
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"--checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors: {fix}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = (
        ([f"missing {_names(missing)}"] if missing else [])
        + ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        + ([f"shape {_names(shapes)}"] if shapes else [])
    )
    if problems:
        raise UserError(f"--checkpoint {path} does not fit {what}: {'; '.join(problems)}: {fix}")
    model.load_state_dict(state)
