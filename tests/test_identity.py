"""A run's identity (run_id) is what it computes: not how it was named (--preset), where the data
lies (--data-dir) or where it runs (backend, shards, driver placement). Resumes keep the id the
run directory was created with, old-style ids included."""

import dataclasses
import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm_ray.cli import build_parser
from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig, from_dict, to_dict
from fm_ray.config.flags import config_from_args
from fm_ray.errors import UserError
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import EXACT, IDENTITY_FREE, TIMING_COLUMNS, RunDir, identity, run_id
from fm_ray.strategies import STRATEGIES

BASE = ["run", "--out", "o", "--dataset", "fashion_mnist", "--strategy", "fishermask", "--seed", "3"]


def cfg_of(*flags: str) -> RunConfig:
    return config_from_args(build_parser().parse_args([*BASE, *flags]))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def with_field(cfg: RunConfig, key: str, value) -> RunConfig:
    d = to_dict(cfg)
    *sections, name = key.split(".")
    target = d
    for s in sections:
        target = target[s]
    target[name] = value
    return from_dict(d)


# A different value for each field (None-valued defaults need one chosen by hand).
NOT_NONE = {"data.class_counts": [[0, 10], [1, 20]], "data.data_dir": "/elsewhere", "model.checkpoint": "/w.pt",
            "rounds": 3, "budget": 900, "preset": "s2", "pool.gpus_per_shard": 0.5, "pool.ray_address": "ray://h:1",
            "pool.driver_cpus": 2.0, "pool.driver_gpus": 1.0, "strategy.candidates": 500, "strategy.top_classes": 3,
            "strategy.project": 64, "strategy.fisher_pool": 2000, "strategy.stochastic": "softmax",
            "init_strategy": "typiclust", "stop": "kappa_average", "strategy.features": "torchvision:resnet18"}  # fmt: skip


def other(key: str, value):
    if value is None:
        return NOT_NONE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    return f"{value}x"


def test_the_rule_names_real_fields_and_why():
    fields = flat(to_dict(RunConfig()))
    assert set(IDENTITY_FREE) <= set(fields), set(IDENTITY_FREE) - set(fields)
    assert all(len(why) > 20 for why in IDENTITY_FREE.values())
    # the approximations at their exact defaults are left out too (the ids runs had before them)
    assert set(EXACT) <= set(fields)
    assert set(identity(RunConfig())) == set(fields) - set(IDENTITY_FREE) - set(EXACT)


@pytest.mark.parametrize("key", sorted(flat(to_dict(RunConfig()))))
def test_every_field_is_digested_unless_the_rule_leaves_it_out(key):
    cfg = RunConfig()
    changed = with_field(cfg, key, other(key, flat(to_dict(cfg))[key]))
    assert changed != cfg
    owners = [n for n, s in STRATEGIES.items() if key.removeprefix("strategy.") in s.own_options]
    if key in IDENTITY_FREE:
        assert run_id(changed) == run_id(cfg), key
    elif owners and cfg.strategy.name not in owners:  # another strategy's own option: digested for it only
        assert run_id(changed) == run_id(cfg), key
        for owner in owners:
            theirs = with_field(cfg, "strategy.name", owner)
            assert run_id(with_field(theirs, key, other(key, flat(to_dict(cfg))[key]))) != run_id(theirs), (key, owner)
    else:
        assert run_id(changed) != run_id(cfg), key


def test_a_strategys_own_option_counts_for_it_as_the_run_or_the_init_strategy():
    """--batchbald-samples renames a batchbald run only; --probcover-delta a probcover run, or any run
    whose --init-strategy is probcover."""
    for strategy, flag, value in (
        ("batchbald", "--batchbald-samples", "500"),
        ("probcover", "--probcover-delta", "0.5"),
    ):
        for name in ("margin", "fishermask", strategy):
            base = ["--strategy", name]
            assert (run_id(cfg_of(*base, flag, value)) != run_id(cfg_of(*base))) == (name == strategy), (flag, name)
    cold = ["--strategy", "margin", "--init-strategy", "probcover"]
    assert run_id(cfg_of(*cold, "--probcover-delta", "0.5")) != run_id(cfg_of(*cold))


def test_a_preset_and_the_same_explicit_flags_are_one_run():
    preset = cfg_of("--preset", "s2")
    explicit = cfg_of("--setting", "setting2", "--init", "500", "--batch", "500", "--budget", "6500")
    assert preset.preset == "s2" and explicit.preset is None
    assert run_id(preset) == run_id(explicit)
    assert run_id(cfg_of("--preset", "s1-low")) != run_id(preset)


@pytest.mark.parametrize(
    "flags",
    [
        ["--data-dir", "/another/folder"],
        ["--backend", "local"],
        ["--shards", "4"],
        ["--cpus-per-shard", "2"],
        ["--gpus-per-shard", "0.5"],
        ["--ray-address", "ray://head:10001"],
        ["--driver-cpus", "2", "--driver-gpus", "1"],
        ["--device", "cpu"],
    ],
)
def test_where_the_data_lies_or_the_run_runs_is_not_identity(flags):
    assert cfg_of(*flags) != cfg_of() and run_id(cfg_of(*flags)) == run_id(cfg_of())


def test_a_sweep_grid_dedupes_by_identity():
    from fm_ray.sweep.grid import sweep_from_args

    # explicit flags win over both regimes: one computation, named twice
    argv = ["sweep", "--out", "o", "--presets", "s2,s1-low", "--setting", "setting2", "--init", "500"]
    configs, _ = sweep_from_args(build_parser().parse_args([*argv, "--batch", "500", "--budget", "6500"]))
    assert len(configs) == 1
    configs, _ = sweep_from_args(build_parser().parse_args(["sweep", "--out", "o", "--presets", "s2,s1-low"]))
    assert len(configs) == 2


# ---------------------------------------------------------------------------------------------
# Resume: the stored id, and no refusal for a change the rule leaves out.

SMALL = DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((3, 40), (7, 120), (9, 40)))


def small(data: DataConfig = SMALL, shards: int = 1) -> RunConfig:
    return RunConfig(data=data, train=TrainConfig(epochs=1, device="cpu"), strategy=StrategyConfig(name="margin"),
                     pool=PoolConfig(backend="local", shards=shards), init=20, batch=10, rounds=2, seed=2)  # fmt: skip


class Crash(Exception):
    pass


def crash_after_round_0(row):
    if row["round"] == 0:
        raise Crash


def results(out) -> tuple[list[dict], list[dict]]:
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in (*TIMING_COLUMNS, "shards", "run_id")} for r in rows]

    return tuple(strip(pq.read_table(out / f"{n}.parquet").to_pylist()) for n in ("rounds", "queries"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return results(run_experiment(small(), tmp_path_factory.mktemp("identity") / "full"))


def test_resume_with_the_data_elsewhere_and_other_shards_continues_the_run(reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_experiment(small(), out, on_round=crash_after_round_0)
    moved = tmp_path / "data"
    shutil.copytree(os.path.join(os.environ["FM_RAY_DATA"], "FashionMNIST"), moved / "FashionMNIST")
    elsewhere = small(dataclasses.replace(SMALL, data_dir=str(moved)), shards=2)
    assert elsewhere != small() and run_id(elsewhere) == run_id(small())
    run_experiment(elsewhere, out, resume=True)
    assert results(out) == reference
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["shards"] for r in rows] == [1, 2, 2] and {r["run_id"] for r in rows} == {run_id(small())}


def old_run_id(cfg: RunConfig) -> str:
    """run_id as fm_ray computed it before the identity rule: every field but pool and device."""
    d = to_dict(cfg)
    d.pop("pool")
    d["train"].pop("device")
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset.split(':')[0]}-{cfg.data.setting}-{cfg.strategy.name}-s{cfg.seed}-{digest}"


def test_a_run_directory_from_before_keeps_its_id(reference, tmp_path):
    from fm_ray.sweep.tune import publish

    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_experiment(small(), out, on_round=crash_after_round_0)
    # the directory as the old fm_ray wrote it: its id in config.json and in every row
    old = old_run_id(small())
    assert old != run_id(small())
    (out / "config.json").write_text(json.dumps({"run_id": old, "config": to_dict(small())}, indent=2))
    for name in ("rounds", "queries"):
        table = pq.read_table(out / f"{name}.parquet")
        table = table.set_column(0, "run_id", pa.array([old] * len(table)))
        pq.write_table(table, out / f"{name}.parquet")
    stored = (out / "config.json").read_bytes()
    run_experiment(small(shards=2), out, resume=True)  # an identity-free change on the way
    assert results(out) == reference
    for name in ("rounds", "queries"):
        assert set(pq.read_table(out / f"{name}.parquet").column("run_id").to_pylist()) == {old}
    assert (out / "config.json").read_bytes() == stored
    # a sweep publishes a run under the id it holds
    publish(str(tmp_path / "sweep"), out, small())
    published = sorted(p.name for p in (tmp_path / "sweep" / "results").rglob("*.*"))
    assert published == [f"{old}.json", f"{old}.parquet", f"{old}.parquet"]


def test_resume_of_another_computation_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "run"
    RunDir(out).open(small(), resume=False, overwrite=False)
    other_seed = dataclasses.replace(small(), seed=5)
    with pytest.raises(UserError, match=r"holds a different run \(.*; seed differ\)"):
        RunDir(out).open(other_seed, resume=True, overwrite=False)
    assert RunDir(out).open(small(shards=3), resume=True, overwrite=False) == ([], [])
