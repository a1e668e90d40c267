import numpy as np
import pytest
import torch

from fm_ray.config import DataConfig
from fm_ray.data.registry import open_source
from fm_ray.data.settings import SETTINGS, sample_pool
from fm_ray.errors import UserError


def test_fashion_mnist_is_real(fmnist):
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.train_x.dtype == torch.uint8
    assert fmnist.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(fmnist.train_y.numpy()).tolist() == [6000] * 10
    assert fmnist.train_y[:5].tolist() == [9, 0, 0, 3, 0]  # the first labels of the real train file


@pytest.mark.parametrize("setting", ["setting1", "setting2"])
def test_settings_have_exact_counts_and_are_seeded(fmnist, setting):
    cfg = DataConfig(setting=setting)
    pool = sample_pool(cfg, fmnist, seed=3)
    expected = SETTINGS[setting]
    assert expected is not None
    counts = np.bincount(fmnist.train_y[torch.from_numpy(pool.train_index)].numpy(), minlength=10)
    assert {c: int(counts[c]) for c in expected} == expected
    assert counts.sum() == sum(expected.values())
    assert len(np.unique(pool.train_index)) == len(pool.train_index)
    # test split restricted to the same classes, labels remapped consistently
    assert set(np.unique(fmnist.test_y[torch.from_numpy(pool.test_index)].numpy())) == set(expected)
    assert np.array_equal(
        np.array(pool.classes)[pool.labels], fmnist.train_y[torch.from_numpy(pool.train_index)].numpy()
    )
    again = sample_pool(cfg, fmnist, seed=3)
    other = sample_pool(cfg, fmnist, seed=4)
    assert np.array_equal(pool.train_index, again.train_index)
    assert not np.array_equal(pool.train_index, other.train_index)


def test_custom_class_counts_and_limits(fmnist):
    pool = sample_pool(DataConfig(class_counts=((2, 30), (7, 5))), fmnist, seed=0)
    assert pool.classes == (2, 7)
    assert np.bincount(pool.labels).tolist() == [30, 5]
    with pytest.raises(UserError, match="class 7 .* 6000 train samples, 6001 asked"):
        sample_pool(DataConfig(class_counts=((7, 6001),)), fmnist, seed=0)


def test_balanced_is_whole_train_split(fmnist):
    assert len(sample_pool(DataConfig(setting="balanced"), fmnist, seed=0).train_index) == 60000


def test_cifar10_jpg_loads_in_standard_class_order():
    data = open_source(DataConfig(dataset="cifar10"))
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(data.train_y.numpy()).tolist() == [5000] * 10
    # ImageFolder order airplane=0 ... truck=9; file N of class c is at c * 5000 + N
    assert data.train_y[0] == 0 and data.train_y[5000 * 9] == 9
    mean = data.train_x.float().div(255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=1e-3)  # the README's measured means


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="FashionMNIST|fashion_mnist.*train-images-idx3-ubyte.gz"):
        open_source(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="cifar10"):
        open_source(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="needs a train/ folder"):
        open_source(DataConfig(dataset=f"imagefolder:{tmp_path}"))
