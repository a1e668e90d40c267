"""Top-k Fisher mask: size, forced entries, tie-break, per-tensor profile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fm_ray.core.fisher import param_layout, param_offsets
from fm_ray.core.mask import final_layer_indices, fisher_mask, mask_profile, mask_size


def test_mask_size() -> None:
    assert mask_size(1000, 0.002) == 2
    assert mask_size(11_000_000, 0.002) == 22_000
    assert mask_size(10, 0.001) == 1
    assert mask_size(10, 1.0) == 10
    with pytest.raises(ValueError):
        mask_size(10, 0.0)


def test_top_k_sorted_ascending() -> None:
    diag = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 9.0], dtype=torch.float64)
    mask = fisher_mask(diag, 3)
    assert mask.tolist() == [1, 3, 5] and mask.dtype == torch.long


def test_ties_go_to_lower_index() -> None:
    diag = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 2.0])
    assert fisher_mask(diag, 2).tolist() == [1, 2]
    assert fisher_mask(diag, 5).tolist() == [0, 1, 2, 4, 5]
    assert fisher_mask(torch.zeros(7), 3).tolist() == [0, 1, 2]


def test_always_include_then_fill_by_value() -> None:
    diag = torch.tensor([9.0, 8.0, 7.0, 0.0, 0.0, 6.0, float("inf")])
    assert fisher_mask(diag, 4, always_include=torch.tensor([3, 4])).tolist() == [0, 3, 4, 6]
    assert fisher_mask(diag, 2, always_include=torch.tensor([4, 3, 2])).tolist() == [2, 3, 4]
    assert fisher_mask(diag, 3, always_include=torch.tensor([6])).tolist() == [0, 1, 6]


def test_final_layer_indices_and_profile() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = param_layout(model)
    idx = final_layer_indices(model)
    start = param_offsets(layout)[2]
    assert idx.tolist() == list(range(start, start + 8))
    n_params = param_offsets(layout)[-1]
    diag = torch.rand(n_params, generator=torch.Generator().manual_seed(0))
    mask = fisher_mask(diag, mask_size(n_params, 0.5), always_include=idx)
    profile = mask_profile(mask, layout)
    assert [p["name"] for p in profile] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sum(p["kept"] for p in profile) == mask.numel() == 13
    assert profile[2]["kept"] == 8 and profile[2]["fraction"] == 1.0
    assert all(0 <= p["fraction"] <= 1 for p in profile)
