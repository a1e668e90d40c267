"""Models of one's own: `torchvision:<name>`, `--pretrained` from the torch cache, `--checkpoint`,
`--freeze-backbone`; each checked against an independent computation or a bit-exact comparison."""

import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from torch import nn

from fm_ray.cli import main
from fm_ray.config import ModelConfig, TrainConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.errors import UserError
from fm_ray.model.train import train_model
from fm_ray.model.zoo import build_model
from fm_ray.pool.shard import PoolShard, ShardSpec

SMALL = "mobilenet_v3_small"  # 1.5M weights, takes 28x28 inputs
NORM = Normalizer((0.2860,), (0.3530,))


def _penultimate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the network's own last Linear sees, read with a hook (independent of fm_ray's surgery)."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    handle = last.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    net.eval()(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", [SMALL, "resnet18"])
def test_embed_returns_what_the_original_last_linear_sees(arch):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(arch)
    torch.manual_seed(0)  # the same construction order: identical backbone weights
    model = build_model(ModelConfig(f"torchvision:{arch}"), 3, 32, 4)
    x = torch.randn(5, 3, 32, 32)
    logits, feats = model.eval().embed(x)
    expected = _penultimate(reference, x)
    assert logits.shape == (5, 4) and feats.shape == expected.shape
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.head(expected))
    torch.testing.assert_close(model(x), logits)


def test_grey_images_get_a_one_channel_first_conv():
    model = build_model(ModelConfig(f"torchvision:{SMALL}"), 1, 28, 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    logits, feats = model.eval().embed(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and feats.shape == (3, model.head.in_features)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model.head


def test_resnet18_is_torchvision_resnet18():
    torch.manual_seed(3)
    a = build_model(ModelConfig("resnet18"), 1, 28, 10).state_dict()
    torch.manual_seed(3)
    b = build_model(ModelConfig("torchvision:resnet18"), 1, 28, 10).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name, message",
    [
        ("torchvision:resnet_typo", "unknown torchvision model 'resnet_typo': list the names with python -c"),
        ("torchvision:squeezenet1_1", "has no nn.Linear classifier to replace"),
        ("torchvision:alexnet", "torchvision:alexnet cannot run on 1x28x28 images"),
        ("vgg", "unknown model 'vgg': choose one of cnn, mlp, resnet18 or torchvision:<name>"),
    ],
)
def test_unusable_model_names_are_one_line_errors(name, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        build_model(ModelConfig(name), 1, 28, 10)
    assert "\n" not in str(e.value)


def test_pretrained_offline_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch cache
    cfg = ModelConfig(f"torchvision:{SMALL}", pretrained=True)
    with pytest.raises(UserError) as e:  # FM_RAY_OFFLINE=1 (conftest): no download is tried
        build_model(cfg, 1, 28, 10)
    msg = str(e.value)
    assert f"is not in the torch cache {tmp_path / 'hub' / 'checkpoints'}" in msg and "FM_RAY_OFFLINE" in msg
    assert "drop --pretrained" in msg and "\n" not in msg

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("FM_RAY_OFFLINE", "0")  # online mode, but the download fails
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError, match=r"and downloading it failed \(URLError\): go online once"):
        build_model(cfg, 1, 28, 10)
    with pytest.raises(UserError, match="--pretrained applies to resnet18 and torchvision:<name>, not 'cnn'"):
        build_model(ModelConfig("cnn", pretrained=True), 1, 28, 10)


def test_pretrained_loads_cached_weights_and_sums_rgb_filters(tmp_path, monkeypatch):
    weights = torchvision.models.get_model_weights(SMALL).DEFAULT
    torch.manual_seed(7)
    imagenet = torchvision.models.get_model(SMALL).state_dict()  # stands in for the real file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet, cache / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = build_model(ModelConfig(f"torchvision:{SMALL}", pretrained=True), 1, 28, 10)
    feats = {f"features.{k}": v for k, v in imagenet.items()}
    state = model.state_dict()
    first = "features.features.0.0.weight"
    torch.testing.assert_close(state[first], feats[first].sum(1, keepdim=True), rtol=0, atol=0)
    last = "features.classifier.3"  # mobilenet_v3's final Linear: replaced by the new head
    kept = [k for k in feats if k != first and not k.startswith(last)]
    assert len(kept) == len(state) - 3  # all but the first conv and the head's weight and bias
    assert all(torch.equal(state[k], feats[k]) for k in kept)


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    saved = build_model(ModelConfig("cnn"), 1, 28, 10).state_dict()
    path = tmp_path / "w.pt"
    torch.save(saved, path)
    torch.manual_seed(2)  # other initial weights, replaced by the file's
    loaded = build_model(ModelConfig("cnn", checkpoint=str(path)), 1, 28, 10).state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    torch.manual_seed(2)
    assert not torch.equal(build_model(ModelConfig("cnn"), 1, 28, 10).state_dict()["head.weight"], saved["head.weight"])

    def error(file, n_classes=10, name="cnn") -> str:
        with pytest.raises(UserError) as e:
            build_model(ModelConfig(name, checkpoint=str(file)), 1, 28, n_classes)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no such file" in error(tmp_path / "missing.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    assert "holds a list, not a state dict of tensors" in error(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert "cannot be read with torch.load(weights_only=True)" in error(tmp_path / "text.pt")
    msg = error(path, n_classes=4)
    assert "shape head.weight (10, 128) in the file vs (4, 128)" in msg and "head.bias" in msg
    msg = error(path, name="mlp")
    assert "missing features.3.weight, features.3.bias; unexpected features.0.weight" in msg
    assert "and 11 more" in msg and "shape features.1.weight (16,) in the file vs (256, 784)" in msg


def test_shards_never_read_checkpoint_or_imagenet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached ImageNet weights either
    cfg = ModelConfig(f"torchvision:{SMALL}", pretrained=True, checkpoint=str(tmp_path / "gone.pt"))
    spec = ShardSpec(cfg, 1, 28, 10, NORM, "cpu")
    shard = PoolShard(spec, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), np.arange(4))
    assert isinstance(shard.model.head, nn.Linear)


def _train(model, fmnist, freeze: bool) -> None:
    x, y = fmnist.train_x[:64], fmnist.train_y[:64]
    cfg = TrainConfig(epochs=1, batch_size=16, freeze_backbone=freeze)
    train_model(model, x, y, NORM, False, cfg, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_backbone_trains_the_head_only(fmnist, freeze):
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn"), 1, 28, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, fmnist, freeze)
    after = model.state_dict()
    backbone = [k for k in before if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are checked too
    assert all(torch.equal(before[k], after[k]) for k in backbone) == freeze
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(p.requires_grad for p in model.parameters())  # the Fisher sees every weight again


def _tiny_cifar(root: Path) -> Path:
    """Two CIFAR-10 classes, 30 train + 5 test images each, as an ImageFolder (a cheap test split)."""
    src = Path(os.environ["FM_RAY_DATA"]) / "CIFAR10-jpg"
    for split, n in (("train", 30), ("test", 5)):
        for cls in ("airplane", "cat"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def test_cli_runs_a_torchvision_model_then_freezes_it_from_its_checkpoint(tmp_path):
    data = _tiny_cifar(tmp_path / "data")
    base = ["run", "--dataset", f"imagefolder:{data}", "--setting", "balanced", "--init", "20", "--batch", "10"]
    base += ["--rounds", "1", "--epochs", "1", "--strategy", "random", "--backend", "local", "--device", "cpu"]
    base += ["--model", f"torchvision:{SMALL}"]
    first = tmp_path / "first"
    assert main([*base, "--out", str(first)]) == 0
    rounds = pq.read_table(first / "rounds.parquet").to_pylist()
    assert [r["model"] for r in rounds] == [f"torchvision:{SMALL}"] * 2 and rounds[1]["n_labeled"] == 30
    picks = pq.read_table(first / "queries.parquet").column("pool_index").to_pylist()
    assert len(set(picks)) == 10

    second = tmp_path / "second"
    assert (
        main([*base, "--checkpoint", str(first / "checkpoint-r1.pt"), "--freeze-backbone", "--out", str(second)]) == 0
    )
    start, end = torch.load(first / "checkpoint-r1.pt"), torch.load(second / "checkpoint-r1.pt")
    backbone = [k for k in start if not k.startswith("head.")]
    assert all(torch.equal(start[k], end[k]) for k in backbone)  # trained twice more, backbone untouched
    assert not torch.equal(start["head.weight"], end["head.weight"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "torchvision:nope"], "unknown torchvision model 'nope'"),
        (["--model", "cnn", "--pretrained"], "--pretrained applies to resnet18 and torchvision:<name>"),
        (["--checkpoint", "missing.pt"], "missing.pt: no such file"),
    ],
)
def test_cli_model_errors_exit_2_before_loading_data(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FM_RAY_DATA", str(tmp_path / "no-data"))  # reaching the data would fail differently
    assert main(["run", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_sweep_spec_keys_reach_the_config(tmp_path):
    from fm_ray.config.flags import config_from_values, parse_values

    base = {"model": "torchvision:resnet34", "pretrained": False, "freeze_backbone": True, "checkpoint": "w.pt"}
    cfg = config_from_values(parse_values(base, "spec base"))
    assert cfg.model.name == "torchvision:resnet34" and cfg.model.pretrained is False
    assert cfg.train.freeze_backbone is True
    assert cfg.model.checkpoint == str(Path("w.pt").absolute())  # a Tune trial runs in another directory
