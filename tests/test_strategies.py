"""Strategies on real embeddings from a trained small CNN: the picks do not depend on the number
or order of shards, and the fast greedy picks what the literal reference picks."""

import pytest
import torch

from fm_ray.pool.local import LocalPool
from fm_ray.pool.shard import set_round
from fm_ray.strategies import STRATEGIES
from fm_ray.strategies.fisher import build_greedy_state, fisher_diag_partial

SHARDED = [
    "entropy",
    "margin",
    "least_confidence",
    "fishermask",
    "bait",
    "kcenter",
    "badge",
    "typiclust",
    "probcover",
    "galaxy",
]


def pick(trained, shards: int, strategy: str, reverse: bool = False, **kw) -> list[int]:
    pool = LocalPool(trained["spec"], trained["x_pool"], shards)
    if reverse:
        pool.shards.reverse()
    pool.map(set_round, trained["weights"], trained["labeled"])
    return STRATEGIES[strategy].select(pool, trained["context"](strategy, **kw)).indices


@pytest.mark.parametrize("strategy", SHARDED)
def test_picks_do_not_depend_on_shards(trained, strategy):
    one = pick(trained, 1, strategy)
    assert len(one) == 8 and len(set(one)) == 8
    assert not set(one) & set(trained["labeled"].tolist())
    assert pick(trained, 2, strategy) == one
    assert pick(trained, 3, strategy, reverse=True) == one


GREEDY_CASES = [
    ("fishermask", {}),
    ("fishermask", {"labeled_init": False}),
    ("fishermask", {"backward_steps": 1}),
    ("fishermask", {"backward_steps": 1, "labeled_init": False, "lam": 0.1}),
    ("bait", {}),  # d = 1280: the literal reference is slow, so fewer cases
    ("bait", {"backward_steps": 1}),
]


@pytest.mark.parametrize("strategy, kw", GREEDY_CASES)
def test_fast_equals_reference_on_real_embeddings(trained, strategy, kw):
    fast = pick(trained, 2, strategy, greedy="fast", **kw)
    assert fast == pick(trained, 2, strategy, greedy="reference", **kw)


def test_fishermask_mask_profile_and_size(trained):
    pool = LocalPool(trained["spec"], trained["x_pool"], 1)
    pool.map(set_round, trained["weights"], trained["labeled"])
    sel = STRATEGIES["fishermask"].select(pool, trained["context"]("fishermask", sparsity=0.01))
    n_params = sum(v.numel() for k, v in trained["weights"].items() if "running" not in k and "num_batches" not in k)
    assert sel.info["mask_size"] == round(0.01 * n_params)
    assert sum(p["kept"] for p in sel.info["mask_profile"]) == sel.info["mask_size"]
    assert set(sel.timings) >= {"mask_seconds", "embed_seconds", "select_seconds"}


def _reduced_sums(trained, shards: int, dtype: str = "float32"):
    import torch

    from fm_ray.core.mask import fisher_mask

    pool = LocalPool(trained["spec"], trained["x_pool"], shards)
    pool.map(set_round, trained["weights"], trained["labeled"])
    parts = pool.map(fisher_diag_partial, 560, 64, dtype)
    diag = sum(p for p, _ in parts)
    mask = fisher_mask(diag, 200)
    sums = pool.map(build_greedy_state, mask, "fast", 64, dtype, "float32")
    pool_sum = sum(p for p, _, _ in sums)
    labeled_sum = sum(s for _, s, _ in sums)
    return diag, torch.as_tensor(pool_sum), torch.as_tensor(labeled_sum), pool.shards[0].state.emb_N_C_D.dtype


def test_reduced_fisher_sums_do_not_depend_on_shards(trained):
    """Equal up to the order of float64 additions (the per-sample terms themselves are identical)."""
    import torch

    one = _reduced_sums(trained, 1)
    for shards in (2, 3):
        other = _reduced_sums(trained, shards)
        assert all(torch.allclose(a, b, rtol=1e-13, atol=0) for a, b in zip(one[:3], other[:3], strict=True))


def test_fisher_dtype_float64_on_request(trained):
    import torch

    f32, f64 = _reduced_sums(trained, 1), _reduced_sums(trained, 1, "float64")
    assert f32[3] == torch.float32 and f64[3] == torch.float64  # the embeddings the greedy state holds
    assert torch.allclose(f32[0], f64[0], rtol=1e-3, atol=1e-9)
    assert torch.allclose(f32[1], f64[1], rtol=1e-3, atol=1e-9)


def test_bfloat16_embeddings_give_valid_picks_in_half_the_memory(trained):
    from fm_ray.pool.shard import state_bytes

    def run(embed_dtype: str):
        pool = LocalPool(trained["spec"], trained["x_pool"], 2)
        pool.map(set_round, trained["weights"], trained["labeled"])
        ctx = trained["context"]("fishermask", k=20, sparsity=0.01, embed_dtype=embed_dtype)
        picks = STRATEGIES["fishermask"].select(pool, ctx).indices
        emb = [s.state.emb_N_C_D for s in pool.shards]
        return picks, emb, sum(pool.map(state_bytes))

    f32, emb32, bytes32 = run("float32")
    b16, emb16, bytes16 = run("bfloat16")
    assert {e.dtype for e in emb16} == {torch.bfloat16} and {e.dtype for e in emb32} == {torch.float32}
    assert all(torch.equal(a.float(), b.bfloat16().float()) for a, b in zip(emb16, emb32, strict=True))
    assert len(b16) == 20 and len(set(b16)) == 20 and not set(b16) & set(trained["labeled"].tolist())
    assert len(set(b16) & set(f32)) >= 10  # rounding may reorder near-ties, not the bulk
    emb_bytes = sum(e.numel() for e in emb32) * 2  # what bfloat16 saves
    assert bytes16 == bytes32 - emb_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_stays_on_the_shards_gpu(trained):
    import dataclasses

    spec = dataclasses.replace(trained["spec"], device="cuda")
    for strategy in ("fishermask", "bait", "kcenter", "badge"):
        pool = LocalPool(spec, trained["x_pool"], 2)
        pool.map(set_round, trained["weights"], trained["labeled"])
        picks = STRATEGIES[strategy].select(pool, trained["context"](strategy)).indices
        assert len(set(picks)) == 8 and not set(picks) & set(trained["labeled"].tolist())
        for shard in pool.shards:
            tensors = {k: v for k, v in vars(shard.state).items() if torch.is_tensor(v)}
            assert {v.device.type for v in tensors.values()} == {"cuda"}, (strategy, tensors.keys())


def test_unknown_embed_dtype_is_a_user_error():
    from fm_ray.config import RunConfig, StrategyConfig, validate
    from fm_ray.errors import UserError

    with pytest.raises(UserError, match="--embed-dtype must be float32, bfloat16 or float16, got 'int8'"):
        validate(RunConfig(strategy=StrategyConfig(name="fishermask", embed_dtype="int8")))
