"""GALAXY (fm_ray.core.galaxy) against a literal loop over each class's chain, on tiny seeded pools."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fm_ray.core.galaxy import UNLABELED, galaxy_select


def literal_run(st: list[int | None]) -> tuple[int, int] | None:
    """The shortest run of unlabeled samples between labeled ones that disagree (leftmost among equals)."""
    run, prev = None, None
    for j in range(len(st)):
        if st[j] is None:
            continue
        if prev is not None and j - prev > 1 and st[prev] != st[j] and (run is None or j - prev < run[1] - run[0]):
            run = (prev, j)
        prev = j
    return run


def literal_nearest(st: list[int | None]) -> int | None:
    """The unlabeled sample nearest an inverted labeled pair (0 just before 1): before the 0, the later
    pair winning ties; then after the 1, only strictly nearer."""
    n = len(st)
    q, dist = None, n + 1
    for j in range(n - 1):
        if st[j] == 0 and st[j + 1] == 1:
            left = [u for u in range(j) if st[u] is None]
            if left and j - left[-1] <= dist:
                q, dist = left[-1], j - left[-1]
    for j in range(n - 1, 0, -1):
        if st[j] == 1 and st[j - 1] == 0:
            right = [u for u in range(j + 1, n) if st[u] is None]
            if right and right[0] - j < dist:
                q, dist = right[0], right[0] - j
    return q


def literal_galaxy(probs: list[list[float]], labels: list[int], classes: list[int], tiebreak: list[float]):
    """The rule in loops: sort by margin, bisect the shortest disagreeing unlabeled run, else the unlabeled
    sample nearest an inverted labeled pair, else the highest tiebreak; a pick takes its predicted class.
    Returns the picks and which branch made each."""
    n = len(probs)
    lab, picks, branches = list(labels), [], []
    for c in classes:
        margin = [p[c] - max(p) + 1e-8 * max(p) for p in probs]
        chain = sorted(range(n), key=lambda i: (-margin[i], i))
        st = [None if lab[i] < 0 else int(lab[i] == c) for i in chain]
        run, near = literal_run(st), literal_nearest(st)
        if run is not None:
            q, branch = (run[0] + 1 + run[1] - 1) // 2, "bisect"
        elif near is not None:
            q, branch = near, "inverted"
        else:
            free = [u for u in range(n) if st[u] is None]
            q, branch = max(free, key=lambda u: (tiebreak[chain[u]], -u)), "tiebreak"
        pos = chain[q]
        picks.append(pos)
        branches.append(branch)
        lab[pos] = int(np.argmax(probs[pos]))
    return picks, branches


def test_galaxy_equals_the_literal_rule_on_every_branch() -> None:
    seen: set[str] = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        n, c = 30, 3 + seed % 2
        probs = torch.softmax(2 * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
        rng = np.random.default_rng(seed)
        labels = np.full(n, UNLABELED)
        labeled = rng.choice(n, size=2 + seed % 5, replace=False)
        # labels from the model (so the chains agree: no cut, the other branches) or at random
        labels[labeled] = probs[labeled].argmax(1).numpy() if seed % 3 == 0 else rng.integers(0, c, len(labeled))
        classes = rng.integers(0, c, size=6)
        tiebreak = torch.rand(n, generator=g, dtype=torch.float64)
        got = galaxy_select(probs, labels, 6, classes, tiebreak)
        want, branches = literal_galaxy(probs.tolist(), labels.tolist(), classes.tolist(), tiebreak.tolist())
        assert got == want, seed
        assert len(set(got)) == 6 and not set(got) & set(labeled.tolist())
        seen |= set(branches)
    assert seen == {"bisect", "inverted", "tiebreak"}  # the cases reach every rule


def test_galaxy_bisects_towards_the_boundary() -> None:
    # one class-0 score line: p_0 from 1 down to 0 over 21 samples, the ends labeled 0 and 1
    p0 = torch.linspace(1, 0, 21, dtype=torch.float64)
    probs = torch.stack([p0, 1 - p0], 1)
    labels = np.full(21, UNLABELED)
    labels[0], labels[20] = 0, 1
    picks = galaxy_select(probs, labels, 3, np.zeros(3, dtype=np.int64), torch.zeros(21, dtype=torch.float64))
    # the middle, then into the half whose ends still disagree (the picks take their predicted class)
    assert picks[0] == 10
    assert picks[1] in (5, 15) and picks[2] in (2, 3, 7, 8, 12, 13, 17, 18)


@pytest.mark.parametrize("bad", [10, -2])
def test_galaxy_refuses_labels_that_are_not_model_outputs(trained, bad: int) -> None:
    from fm_ray.errors import UserError
    from fm_ray.pool.local import LocalPool
    from fm_ray.pool.shard import set_round
    from fm_ray.strategies import STRATEGIES

    pool = LocalPool(trained["spec"], trained["x_pool"], 1)
    pool.map(set_round, trained["weights"], trained["labeled"])
    ctx = trained["context"]("galaxy")
    labels = ctx.labels.copy()
    labels[0] = bad
    with pytest.raises(UserError, match="model outputs"):
        STRATEGIES["galaxy"].select(pool, dataclasses.replace(ctx, labels=labels))


def test_select_passes_the_labeled_classes_to_galaxy() -> None:
    import fm_ray
    from fm_ray.errors import UserError

    torch.manual_seed(0)
    x = torch.rand(300, 1, 8, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    labeled = {0: 0, 1: 1, 2: 2, 3: 0}
    one = fm_ray.select(model, x, k=6, labeled=labeled, strategy="galaxy", seed=1)
    assert len(set(one.ids)) == 6 and not set(one.ids) & set(labeled)
    assert fm_ray.select(model, x, k=6, labeled=labeled, strategy="galaxy", seed=1, shards=3).ids == one.ids
    with pytest.raises(UserError, match="galaxy needs the classes"):
        fm_ray.select(model, x, k=6, labeled={0: "cat"}, strategy="galaxy")
