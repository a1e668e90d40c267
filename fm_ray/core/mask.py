"""The FisherMask parameter mask: top-k of the Fisher diagonal (Gul et al., arXiv 2411.05752, sec. III)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fm_ray.core.fisher import Layout, param_layout, param_offsets


def mask_size(n_params: int, sparsity: float) -> int:
    """``k = round(sparsity * n_params)``, at least 1 and at most ``n_params``."""
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    return min(n_params, max(1, round(sparsity * n_params)))


def fisher_mask(fisher_diag_P: Tensor, k: int, *, always_include: Tensor | None = None) -> Tensor:
    """Flat indices of the ``k`` largest Fisher diagonal entries, sorted ascending.

    Ties go to the lower flat index. ``always_include`` (e.g. the final layer's weight, as the
    reference code does) enters first and the rest is filled by value up to ``k`` in all; if it
    alone has ``k`` or more entries, the mask is exactly ``always_include``.

    Args:
        fisher_diag_P: ``(P,)`` Fisher diagonal (or its sum over samples).
        k: mask size (see :func:`mask_size`).
        always_include: optional flat indices kept unconditionally.

    Returns:
        ``(D,)`` int64 indices, sorted ascending.
    """
    P = fisher_diag_P.shape[0]
    values = torch.nan_to_num(fisher_diag_P.detach().to(torch.float64).cpu(), nan=-float("inf"))
    forced = torch.zeros(P, dtype=torch.bool)
    if always_include is not None:
        forced[always_include.to(torch.long).cpu()] = True
    rest = (~forced).nonzero().squeeze(1)
    n_fill = max(0, min(k, P) - int(forced.sum()))
    # Stable descending sort over ascending indices: equal values keep the lower index first.
    fill = rest[torch.sort(values[rest], descending=True, stable=True).indices[:n_fill]]
    return torch.cat([forced.nonzero().squeeze(1), fill]).sort().values


def final_layer_indices(model: nn.Module) -> Tensor:
    """Flat indices of the weight of the model's last ``nn.Linear`` (in ``model.modules()`` order)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear layer")
    weight = linears[-1].weight
    layout = param_layout(model)
    offsets = param_offsets(layout)
    for j, (_, p) in enumerate(model.named_parameters()):
        if p is weight:
            return torch.arange(offsets[j], offsets[j + 1])
    raise ValueError("final Linear weight is not a registered parameter")


def mask_profile(mask_idx_D: Tensor, layout: Layout) -> list[dict[str, object]]:
    """Per parameter tensor: how many mask entries fall in it (paper Fig. 2)."""
    offsets = torch.tensor(param_offsets(layout))
    counts = torch.bucketize(mask_idx_D.to(torch.long).cpu(), offsets[1:], right=True)
    kept = torch.bincount(counts, minlength=len(layout)).tolist()
    return [
        {"name": name, "numel": numel, "kept": kept[j], "fraction": kept[j] / numel}
        for j, (name, numel, _) in enumerate(layout)
    ]
