"""Training (Adam, the paper's augmentation, early stop at a training accuracy) and evaluation."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fm_ray._internal.log import EpochProgress
from fm_ray.config import ModelConfig, TrainConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked but CUDA is not available here: use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None


def _batches(n: int, size: int, perm: torch.Tensor) -> list[torch.Tensor]:
    parts = list(perm.split(size))
    if len(parts) > 1 and len(parts[-1]) == 1:  # BatchNorm cannot train on a batch of one
        parts[-2] = torch.cat(parts[-2:])
        parts.pop()
    return parts


def _freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """The head's parameters, to train alone. The backbone gets no gradients (no backward through
    it: the point of fixed features) and runs in eval mode, so its BatchNorm statistics stay too."""
    head, features = getattr(model, "head", None), getattr(model, "features", None)
    if not isinstance(head, nn.Linear) or not isinstance(features, nn.Module):
        raise UserError("--freeze-backbone needs a model with `features` and a Linear `head`: drop the flag")
    features.requires_grad_(False).eval()
    return list(head.parameters())


def train_model(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    norm: Normalizer,
    augment: bool,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    desc: str = "training",
) -> dict[str, float]:
    """Adam until `cfg.epochs` or an epoch's training accuracy reaches `cfg.target_train_acc`.

    Progress (`desc`, per epoch: loss and accuracy) goes to fm_ray's logger / a terminal bar."""
    torch.manual_seed(seed)  # batch order and augmentation
    model.to(device).train()
    trainable = _freeze_backbone(model) if cfg.freeze_backbone else list(model.parameters())
    opt = torch.optim.Adam(trainable, lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    start, acc, epochs_run = time.perf_counter(), 0.0, 0
    bar = EpochProgress(cfg.epochs, desc)
    for epoch in range(1, cfg.epochs + 1):
        epochs_run, correct, loss_sum = epoch, 0, torch.zeros((), device=device)
        for idx in _batches(len(y), cfg.batch_size, torch.randperm(len(y))):
            xb = norm(x_u8[idx], augment).to(device)
            yb = y[idx].to(device)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.detach() * len(idx)  # summed on the device: no sync per batch
        acc = correct / len(y)
        done = acc >= cfg.target_train_acc or epoch == cfg.epochs
        bar.update(epoch, float(loss_sum) / len(y), acc, last=done)
        if acc >= cfg.target_train_acc:
            break
    bar.close()
    model.eval()
    if cfg.freeze_backbone:
        model.requires_grad_(True)  # the Fisher quantities differentiate every weight
    return {
        "epochs": epochs_run,
        "train_accuracy": acc,
        "train_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    x_u8: torch.Tensor,
    norm: Normalizer,
    device: torch.device,
    batch: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (probs_N_C, feats_N_E) on the CPU, model in eval mode."""
    model.to(device).eval()
    probs, feats = [], []
    for chunk in x_u8.split(batch):
        logits, f = model.embed(norm(chunk).to(device))  # type: ignore[operator]
        probs.append(logits.softmax(1).cpu())
        feats.append(f.cpu())
    return torch.cat(probs), torch.cat(feats)


def evaluate(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: np.ndarray,
    norm: Normalizer,
    device: torch.device,
    n_classes: int,
) -> dict[str, object]:
    """Accuracy, balanced accuracy (mean per-class recall) and per-class accuracy on a test split."""
    probs, _ = predict(model, x_u8, norm, device)
    pred = probs.argmax(1).numpy()
    per_class = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(n_classes)]
    present = [a for a in per_class if not np.isnan(a)]
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
    }


def round_seed(seed: int, round: int) -> int:
    """The seed of round `round`'s weight initialization, batch order and augmentation."""
    return seed * 1_000_003 + round


def fit_round(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    round: int,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    norm: Normalizer,
    augment: bool,
    n_classes: int,
    device: torch.device,
    init_weights: dict[str, torch.Tensor] | None = None,
    desc: str = "training",
) -> tuple[nn.Module, dict[str, float]]:
    """One round's model: seeded fresh weights (or `init_weights`, a warm start) trained on the labels.

    `fm-ray run` and labeling projects both train through this, so the same labels, seed and round
    give the same model, and the same picks.
    """
    from fm_ray.model.zoo import build_model

    torch.manual_seed(round_seed(seed, round))
    model = build_model(model_cfg, x_u8.shape[1], x_u8.shape[-1], n_classes)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    fit = train_model(model, x_u8, y, norm, augment, cfg, device, seed=round_seed(seed, round), desc=desc)
    return model, fit
