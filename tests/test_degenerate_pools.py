"""Degenerate pools are refused the same way by every strategy (issue 21, family 4): on candidates
that are all identical no score can rank them, whatever the strategy's settings or the shard count."""

import pytest
import torch
from torch import nn

import fm_ray
from fm_ray.strategies import STRATEGIES


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


SCORED = [s for s in STRATEGIES if s != "random"]  # random has no scores to compare


@pytest.mark.parametrize(
    "strategy, options",
    [(s, {}) for s in SCORED]
    + [
        ("fishermask", {"sparsity": 1.0}),  # the case: 4 picks (float32 roundoff read as a ranking)
        ("fishermask", {"backward_steps": 2, "sparsity": 0.5}),
        ("bait", {"lam": 10.0}),
    ],
)
@pytest.mark.parametrize("shards", [1, 2])
def test_identical_candidates_are_refused_by_every_strategy(strategy, options, shards):
    x = torch.rand(1, 1, 4, 4).repeat(600, 1, 1, 1)
    with pytest.raises(fm_ray.DegenerateModelError, match=f"every candidate scores the same under {strategy}"):
        fm_ray.select(net(), x, k=4, labeled={0: 1}, strategy=strategy, device="cpu", shards=shards, **options)


def test_a_pool_with_two_distinct_images_is_ranked():
    x = torch.rand(1, 1, 4, 4).repeat(600, 1, 1, 1)
    x[300:] = torch.rand(1, 1, 4, 4)
    for strategy in SCORED:
        assert len(fm_ray.select(net(), x, k=4, labeled={0: 1}, strategy=strategy, device="cpu").ids) == 4


def test_a_folder_project_of_identical_images_writes_no_batch_after_the_first(tmp_path, labels_csv, capsys):
    """The issue's `folder:` project: batch 0 is a seeded random sample (no model yet); batch 1's
    query must be refused, not written."""
    import csv

    import numpy as np
    from PIL import Image

    from fm_ray.cli import main

    same = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        Image.fromarray(same).save(tmp_path / "imgs" / f"{i:02d}.png")
    proj = tmp_path / "proj"
    init = ["project", "init", str(proj), "--pool", f"folder:{tmp_path / 'imgs'}", "--classes", "a,b"]
    assert main([*init, "--epochs", "1", "--device", "cpu"]) == 0
    assert main(["project", "next", str(proj), "--k", "4"]) == 0
    with open(proj / "batches" / "0" / "batch.csv") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    answers = labels_csv("l.csv", [(i, "ab"[n % 2]) for n, i in enumerate(ids)])
    assert main(["project", "import", str(proj), str(answers)]) == 0
    capsys.readouterr()
    assert main(["project", "next", str(proj), "--k", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "every candidate scores the same under fishermask" in err and len(err.splitlines()) == 1
    assert not (proj / "batches" / "1").exists()
