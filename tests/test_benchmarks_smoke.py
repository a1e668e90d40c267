"""The benchmarks run end to end at tiny sizes through main(argv) and print the promised JSON keys."""

import json

import pytest

from benchmarks import fisher, selection


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_selection_benchmark(capsys):
    out = selection.main(["--S", "60", "--C", "3", "--d", "16", "--K", "5", "--n-labeled", "4"])
    assert last_json(capsys) == out
    assert out["bench"] == "selection" and out["same_picks"] is True
    assert {"S", "C", "d", "K", "reference_s", "fast_s", "speedup"} <= out.keys()


def test_fisher_benchmark(capsys):
    argv = ["--samples", "4", "--loop-samples", "1", "--batch", "4", "--classes", "3", "--sparsity", "0.0005"]
    out = fisher.main(argv)
    assert last_json(capsys) == out
    assert out["bench"] == "fisher" and out["max_rel_err"] < 1e-3
    assert {"loop_s_per_sample", "batched_s_per_sample", "speedup"} <= out.keys()


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
    assert all(r["bench"] == "scaling" and r["same_picks"] is True for r in rows)
    assert rows[0]["speedup"] == 1.0 and all(r["step_overhead_ms"] > 0 for r in rows)


def test_paper_scale_benchmark_smoke(capsys):
    from benchmarks import paper_scale

    out = paper_scale.main(["--scale", "0.01", "--epochs", "1"])
    assert last_json(capsys) == out
    assert out["bench"] == "paper_scale" and out["picks"] == out["K"] == 2 and out["S"] == 58
    assert out["d"] == round(0.002 * 0.01 * 11_181_642)  # ResNet-18 with a 10-way head
    assert {"mask_s", "embed_s", "reduce_s", "select_s", "total_s", "peak_gpu_mb"} <= out.keys()
