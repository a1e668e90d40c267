"""`fm_ray.select` from Python: a plain nn.Sequential on a TensorDataset, any strategy, any shard count."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fm_ray
from fm_ray.api import Embedded
from fm_ray.errors import UserError


@pytest.fixture(scope="module")
def real_pool(fmnist):
    """300 real FashionMNIST images as a float TensorDataset (already 'transformed' by the user)."""
    x = fmnist.train_x[:300].float().div(255)
    return TensorDataset(x, fmnist.train_y[:300])


def sequential(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("strategy", ["fishermask", "bait", "entropy", "badge", "kcenter", "random"])
def test_select_returns_k_new_ids(real_pool, strategy):
    labeled = {i: int(real_pool[i][1]) for i in range(0, 300, 30)}
    opts = {"sparsity": 0.01} if strategy == "fishermask" else {}
    sel = fm_ray.select(sequential(), real_pool, 12, labeled=labeled, strategy=strategy, device="cpu", **opts)
    assert len(sel.ids) == 12 and len(set(sel.ids)) == 12
    assert not set(sel.ids) & set(labeled)
    assert all(isinstance(i, int) and 0 <= i < 300 for i in sel.ids)
    assert sel.ids == sel.indices  # a Dataset's ids are its integer indices


def test_entropy_picks_the_most_uncertain(real_pool):
    """Independent check: the k highest-entropy unlabeled samples, computed by hand."""
    model = sequential(1)
    sel = fm_ray.select(model, real_pool, 7, labeled={0: 0, 1: 0}, strategy="entropy", device="cpu")
    with torch.no_grad():
        p = model(real_pool.tensors[0]).softmax(1)
    ent = -(p * p.log()).sum(1)
    ent[[0, 1]] = -1
    assert sorted(sel.ids) == sorted(torch.topk(ent, 7).indices.tolist())


def test_shards_and_backends_pick_the_same(real_pool):
    model = sequential(2)
    labeled = {i: 0 for i in range(5)}
    one = fm_ray.select(model, real_pool, 10, labeled=labeled, strategy="bait", device="cpu")
    three = fm_ray.select(model, real_pool, 10, labeled=labeled, strategy="bait", device="cpu", shards=3)
    assert one.ids == three.ids


def test_the_callers_model_is_left_as_it_was(real_pool):
    model = sequential(3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fm_ray.select(model, real_pool, 5, strategy="fishermask", device="cpu", sparsity=0.01)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_embedded_features_are_the_last_linear_input():
    net = sequential(4)
    x = torch.randn(6, 1, 28, 28)
    logits, feats = Embedded(net).embed(x)
    with torch.no_grad():
        expect = net[2](net[1](net[0](x)))
    assert torch.equal(logits, net(x)) and torch.allclose(feats, expect)
    custom = Embedded(net, embed=lambda t: t.flatten(1)[:, :3])
    assert custom.embed(x)[1].shape == (6, 3)


def test_bad_calls_are_user_errors(real_pool):
    model = sequential()
    with pytest.raises(UserError, match="unknown strategy"):
        fm_ray.select(model, real_pool, 3, strategy="nope")
    with pytest.raises(UserError, match="k = 400"):
        fm_ray.select(model, real_pool, 400, strategy="entropy", device="cpu")
    with pytest.raises(UserError, match="not in the pool"):
        fm_ray.select(model, real_pool, 3, labeled={999: 1}, strategy="entropy", device="cpu")
    with pytest.raises(UserError, match="unknown strategy option"):
        fm_ray.select(model, real_pool, 3, strategy="fishermask", sparsty=0.1)
    with pytest.raises(UserError, match="no nn.Linear"):
        fm_ray.select(nn.Sequential(nn.Flatten()), real_pool, 3, strategy="entropy")


def test_uint8_tensor_pool_is_scaled(fmnist):
    x = fmnist.train_x[:100]
    model = sequential(5)
    sel_u8 = fm_ray.select(model, x, 4, strategy="margin", device="cpu")
    sel_f = fm_ray.select(model, x.float() / 255, 4, strategy="margin", device="cpu")
    assert sel_u8.ids == sel_f.ids
    assert np.unique(sel_u8.ids).size == 4


@pytest.mark.slow
def test_named_pools_folder_and_packed(fmnist, tmp_path):
    """`folder:` ids are relative paths; a packed copy of the folder (`parquet:`) has the same ids."""
    from PIL import Image

    from fm_ray.data.pack import pack

    root = tmp_path / "imgs"
    for i in range(60):
        (root / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist.train_x[i, 0].numpy()).save(root / f"s{i % 2}" / f"{i:02d}.png")
    model = sequential(6)
    sel = fm_ray.select(model, f"folder:{root}", 5, labeled={"s0/00.png": 1}, strategy="entropy", device="cpu")
    files = {p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    assert len(set(sel.ids)) == 5 and set(sel.ids) <= files - {"s0/00.png"}
    pack(f"folder:{root}", str(tmp_path / "pool"), channels=1)
    packed = fm_ray.select(model, f"parquet:{tmp_path / 'pool'}", 5, strategy="bait", device="cpu")
    assert len(set(packed.ids)) == 5 and set(packed.ids) <= files
    with pytest.raises(UserError, match="unknown dataset .*choose one of .*parquet:"):
        fm_ray.select(model, "s3-bucket-typo", 5)
