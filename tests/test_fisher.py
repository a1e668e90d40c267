"""Fisher diagonal and embeddings vs. a literal per-(sample, class) autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fm_ray.core import fisher
from fm_ray.core.fisher import (
    fisher_diag_sum,
    fisher_embeddings,
    last_layer_embeddings,
    param_layout,
    param_offsets,
)
from fm_ray.core.mask import final_layer_indices

DT = torch.float64


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=DT) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=DT) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen, dtype=DT))
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=DT) * 0.2)


class ResBlockNet(nn.Module):
    def __init__(self, ch: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, ch, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.fc = nn.Linear(ch, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 5, 2, dilation=2),
        nn.BatchNorm2d(5),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3, bias=False),
    )


CASES = {
    "mlp": (_mlp, (5,)),
    "cnn": (_cnn, (2, 8, 8)),
    "resblock": (ResBlockNet, (2, 6, 6)),
}


def _setup(name: str, n: int = 5) -> tuple[nn.Module, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().to(DT)
    with torch.no_grad():
        _randomize_bn(model, gen)
    model.eval()
    return model, torch.randn(n, *shape, generator=gen, dtype=DT)


def _brute_rows(model: nn.Module, x_N: Tensor) -> Tensor:
    """Literal ``sqrt(p_c) d log p_c / d theta``: one autograd call per (sample, class); (N, C, P)."""
    params = list(model.parameters())
    rows = []
    for x in x_N:
        logp = torch.log_softmax(model(x[None]), dim=-1)[0]
        per_c = []
        for c in range(logp.shape[0]):
            gs = torch.autograd.grad(logp[c], params, retain_graph=True)
            per_c.append(logp[c].exp().detach().sqrt() * torch.cat([g.reshape(-1) for g in gs]))
        rows.append(torch.stack(per_c))
    return torch.stack(rows)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_diag_and_embeddings_match_brute_force(name: str) -> None:
    model, x = _setup(name)
    rows = _brute_rows(model, x)
    diag = fisher_diag_sum(model, x, chunk_size=2)
    assert diag.dtype == torch.float64
    assert diag.shape == (sum(n for _, n, _ in param_layout(model)),)
    assert _rel(diag, rows.square().sum((0, 1))) <= 1e-6
    gen = torch.Generator().manual_seed(1)
    mask = torch.randperm(rows.shape[2], generator=gen)[: rows.shape[2] // 3].sort().values
    emb = fisher_embeddings(model, x, mask, chunk_size=3)
    assert emb.shape == (x.shape[0], rows.shape[1], mask.numel())
    assert _rel(emb, rows[:, :, mask]) <= 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_equals_unchunked(name: str) -> None:
    model, x = _setup(name, n=6)
    mask = torch.arange(0, sum(n for _, n, _ in param_layout(model)), 3)
    torch.testing.assert_close(fisher_diag_sum(model, x, chunk_size=1), fisher_diag_sum(model, x, chunk_size=6))
    torch.testing.assert_close(
        fisher_embeddings(model, x, mask, chunk_size=4), fisher_embeddings(model, x, mask, chunk_size=6)
    )


@pytest.mark.parametrize("gram_factor", [0.0, 1e9])
@pytest.mark.parametrize("name", ["cnn", "resblock"])
def test_diag_explicit_and_gram_forms(monkeypatch: pytest.MonkeyPatch, name: str, gram_factor: float) -> None:
    monkeypatch.setattr(fisher, "_GRAM_FACTOR", gram_factor)
    model, x = _setup(name, n=3)
    assert _rel(fisher_diag_sum(model, x), _brute_rows(model, x).square().sum((0, 1))) <= 1e-6


@pytest.mark.parametrize("block_ratio", [0, 16])
def test_row_paths_gather_and_block(monkeypatch: pytest.MonkeyPatch, block_ratio: int) -> None:
    monkeypatch.setattr(fisher, "_BLOCK_RATIO", block_ratio)
    monkeypatch.setattr(fisher, "_GATHER_ELEMS", 50)  # forces many pieces
    model, x = _setup("resblock")
    n_params = param_offsets(param_layout(model))[-1]
    mask = torch.randperm(n_params, generator=torch.Generator().manual_seed(2))[:40].sort().values
    torch.testing.assert_close(fisher_embeddings(model, x, mask), _brute_rows(model, x)[:, :, mask])


def test_embeddings_only_differentiate_masked_tensors() -> None:
    model, x = _setup("resblock")
    layout = param_layout(model)
    start = param_offsets(layout)[[n for n, _, _ in layout].index("bn2.bias")]
    mask = torch.tensor([start, start + 2])
    emb = fisher_embeddings(model, x, mask)
    torch.testing.assert_close(emb, _brute_rows(model, x)[:, :, mask])


def test_unsupported_module_falls_back_to_torch_func() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    x = torch.randn(4, 4, dtype=DT)
    rows = _brute_rows(model, x)
    assert _rel(fisher_diag_sum(model, x), rows.square().sum((0, 1))) <= 1e-6
    mask = torch.arange(0, rows.shape[2], 2)
    assert _rel(fisher_embeddings(model, x, mask), rows[:, :, mask]) <= 1e-6


def test_last_layer_closed_form_matches() -> None:
    model, x = _setup("resblock")
    fc = model.fc
    fc.bias = None
    feats = {}
    fc.register_forward_hook(lambda m, i, o: feats.__setitem__("h", i[0].detach()))
    probs = torch.softmax(model(x), -1).detach()
    mask = final_layer_indices(model)
    emb = fisher_embeddings(model, x, mask)
    torch.testing.assert_close(last_layer_embeddings(probs, feats["h"]), emb)


def test_rejects_train_mode_and_bad_masks() -> None:
    model = _mlp().train()
    with pytest.raises(ValueError, match="eval"):
        fisher_diag_sum(model, torch.randn(2, 5))
    model.eval()
    for bad in ([3, 1], [2, 2], [-1], [10_000]):
        with pytest.raises(ValueError, match="ascending"):
            fisher_embeddings(model, torch.randn(2, 5), torch.tensor(bad))


def test_resnet18_smoke() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    diag = fisher_diag_sum(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    assert diag.shape == (n_params,) and torch.isfinite(diag).all() and (diag >= 0).all()
    mask = torch.topk(diag, 500).indices.sort().values
    emb = fisher_embeddings(model, x, mask)
    assert emb.shape == (2, 10, 500) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert all(p.requires_grad for p in model.parameters())
