import math

import torch

from fm_ray.core.scores import entropy, least_confidence, margin, top_k

P = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.4, 0.4, 0.2]], dtype=torch.float64)


def test_entropy_by_hand():
    expected = [
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)),
        0.0,
        -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)),
    ]
    assert torch.allclose(entropy(P), torch.tensor(expected, dtype=torch.float64))


def test_margin_and_least_confidence_by_hand():
    assert torch.allclose(margin(P), torch.tensor([-0.25, -1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(least_confidence(P), torch.tensor([0.5, 0.0, 0.6], dtype=torch.float64))


def test_top_k_ties_to_lowest_index_and_shardwise_equals_whole():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    index = torch.randperm(40, generator=g)
    whole = top_k(scores, index, 7)
    parts = [top_k(scores[s], index[s], 7) for s in (slice(0, 13), slice(13, 29), slice(29, 40))]
    merged = top_k(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), 7)
    assert whole[1].tolist() == merged[1].tolist()
    order = sorted(range(40), key=lambda i: (-scores[i].item(), index[i].item()))[:7]
    assert whole[1].tolist() == [index[i].item() for i in order]
