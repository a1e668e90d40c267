"""The benchmarks run end to end at tiny sizes through main(argv) and print the promised JSON keys."""

import json

import pytest

from benchmarks import fisher, selection


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def within_rounding(base_s: float, row_s: float, ratio: float, places: int = 3) -> bool:
    """Whether `ratio` (printed to 2 decimals) is base/row for seconds printed to `places` decimals."""
    half = 0.5 * 10**-places
    lo = (base_s - half) / (row_s + half)
    hi = (base_s + half) / (row_s - half) if row_s > half else float("inf")
    return lo - 5e-3 <= ratio <= hi + 5e-3


def test_selection_benchmark(capsys):
    out = selection.main(["--S", "60", "--C", "3", "--d", "16", "--K", "5", "--n-labeled", "4"])
    assert last_json(capsys) == out
    assert out["bench"] == "selection" and out["same_picks"] is True
    assert {"S", "C", "d", "K", "reference_s", "fast_s", "speedup"} <= out.keys()
    assert within_rounding(out["reference_s"], out["fast_s"], out["speedup"])


def test_fisher_benchmark(capsys):
    argv = ["--samples", "4", "--loop-samples", "1", "--batch", "4", "--classes", "3", "--sparsity", "0.0005"]
    out = fisher.main(argv)
    assert last_json(capsys) == out
    assert out["bench"] == "fisher" and out["max_rel_err"] < 1e-3
    assert {"loop_s_per_sample", "batched_s_per_sample", "speedup"} <= out.keys()
    assert within_rounding(out["loop_s_per_sample"], out["batched_s_per_sample"], out["speedup"], places=5)


@pytest.mark.ray
def test_scaling_benchmark(capsys):
    ray = pytest.importorskip("ray")
    from benchmarks import scaling

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 1 + 2 shards, both pools up
    try:
        argv = ["--shards", "1", "2", "--S", "512", "--K", "4", "--n-labeled", "16", "--repeats", "1"]
        rows = scaling.main([*argv, "--data", "random"])
    finally:
        ray.shutdown()
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == rows and [r["shards"] for r in rows] == [1, 2]
    keys = {"S", "d", "K", "cpus_per_shard", "embed_s", "select_s", "speedup", "select_speedup"}
    assert keys | {"step_overhead_ms", "same_picks", "method"} <= rows[0].keys()
    assert all(r["bench"] == "scaling" and r["same_picks"] is True and r["baseline_shards"] == 1 for r in rows)
    assert all(r["step_overhead_ms"] > 0 for r in rows)
    # each speedup is the baseline's seconds over the row's, as far as the printed roundings allow
    for r in rows:
        assert within_rounding(rows[0]["embed_s"], r["embed_s"], r["speedup"])
        assert within_rounding(rows[0]["select_s"], r["select_s"], r["select_speedup"])


def test_paper_scale_benchmark_smoke(capsys):
    import torchvision

    from benchmarks import paper_scale
    from fm_ray.config import PRESETS
    from fm_ray.data.settings import SETTINGS

    out = paper_scale.main(["--scale", "0.01", "--epochs", "1"])
    assert last_json(capsys) == out
    # the paper's setting 1 at 1%: its pool, and the high regime's batch and initial set
    setting1 = SETTINGS["setting1"]
    assert setting1 is not None
    S, K, labeled = (
        max(2, round(0.01 * n)) for n in (sum(setting1.values()), *(PRESETS["s1-high"][k] for k in ("batch", "init")))
    )
    assert (out["S"], out["K"], out["labeled"]) == (S, K, labeled)
    assert out["bench"] == "paper_scale" and out["picks"] == K
    # the mask keeps sparsity x 1% of ResNet-18's weights with a 10-way head, counted by torchvision
    weights = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert out["d"] == round(0.002 * 0.01 * weights)
    assert {"mask_s", "embed_s", "reduce_s", "select_s", "total_s", "peak_gpu_mb"} <= out.keys()


def test_million_variants_are_seeded_distinct_and_keep_the_image():
    import numpy as np

    from benchmarks.million import variants

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 1, 12, 12), dtype=np.uint8).repeat(200, 0)
    a, b = variants(x, 3, 0), variants(x, 3, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, variants(x, 3, 200))  # keyed by (seed, first row)
    assert len({v.tobytes() for v in a}) == 200  # one image repeated: every row distinct
    # shifted by at most 2 pixels and flipped: the centre of some unflipped row lies within +-4 of the source
    centre = x[0, 0, 4:8, 4:8].astype(int)
    assert any(np.abs(v[0, 4:8, 4:8].astype(int) - centre).max() <= 4 for v in a)


def test_million_repeated_rows_take_the_least_time_and_the_largest_peak():
    from benchmarks.million import repeated

    runs = [
        {"round_s": 9.0, "forward_s": 5.0, "shard_peak_rss_mb": 900.0, "plan_mb": None, "driver_read_bytes": 7},
        {"round_s": 8.0, "forward_s": 6.0, "shard_peak_rss_mb": 950.0, "plan_mb": None, "driver_read_bytes": 7},
    ]
    row = repeated(runs)
    assert row == {"round_s": 8.0, "forward_s": 5.0, "shard_peak_rss_mb": 950.0, "plan_mb": None,
                   "driver_read_bytes": 7, "round_s_runs": [9.0, 8.0]}  # fmt: skip
    assert repeated(runs[:1]) == runs[0]


@pytest.mark.slow
@pytest.mark.ray
def test_million_benchmark_smoke(capsys, tmp_path):
    """Two tiny pools, one strategy: the rows' keys, the pool's pixel bytes, and the driver's reads
    equal to what the files hold of labels, test pixels and footers (computed here from the files)."""
    import math

    import numpy as np
    import pyarrow.parquet as pq

    from benchmarks import million

    argv = ["--n", "1000", "2000", "--strategies", "margin", "--K", "4", "--init", "20", "--pools", str(tmp_path)]
    rows = million.main(argv)
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == rows and [r["bench"] for r in rows] == ["million", "million", "million_scaling"]
    for row in rows[:2]:
        assert row["pool_pixel_bytes"] == row["n"] * 784 and row["size"] == 28
        assert row["round_s"] > 0 and row["forward_s"] > 0 and row["shard_peak_rss_mb"] > 0
        pool = tmp_path / f"fashion_mnist-native-n{row['n']}-seed0" / "pool"
        expected = 0
        for f in sorted(pool.glob("*/part-*.parquet")):
            meta = pq.ParquetFile(f).metadata
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
            expected += meta.serialized_size + sum(g.column(2).total_compressed_size for g in groups)
            if f.parent.name == "test":  # the balanced pool evaluates on the whole test split
                expected += sum(g.column(1).total_compressed_size for g in groups)
        assert row["driver_read_bytes"] == expected
    summary = rows[2]["margin"]
    for measure in million.MEASURES:
        y = [rows[0][measure], rows[1][measure]]
        want = math.log(y[1] / y[0]) / math.log(2) if min(y) > 0 else None
        got = summary[measure]["slope"]
        assert (got is None and want is None) or abs(got - want) < 1e-3, measure
    assert np.isclose(
        summary["driver_read_bytes"]["ratio"], rows[1]["driver_read_bytes"] / rows[0]["driver_read_bytes"], atol=1e-3
    )


@pytest.mark.slow
def test_approx_benchmark_fisher_pool_rows_are_exact_when_the_sample_is_the_pool(capsys):
    """--fisher-pool as large as the unlabeled pool (and as many candidates) is no approximation:
    the rows pick what exact picks and reach its accuracy."""
    from benchmarks import approx

    argv = ["--n", "600", "--init", "40", "--K", "10", "--epochs", "1", "--test", "200", "--sparsity", "0.002",
            "--fisher-pool", "560", "--only", "fisher_pool,fisher_pool_candidates"]  # fmt: skip
    rows = approx.main(argv)
    assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == rows
    assert [r["approx"] for r in rows] == ["exact", "fisher_pool", "fisher_pool_candidates"]
    assert all(r["pick_overlap"] == 1.0 and r["acc_after_round"] == rows[0]["acc_after_round"] for r in rows)
