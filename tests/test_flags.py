"""One flag mapping (fm_ray/flags.py): every config field has one flag, flags and spec files build
the same config, and precedence is explicit flags > spec file > sweep preset > regime preset."""

import dataclasses

import pytest
import yaml

from fm_ray.cli import build_parser, main
from fm_ray.config import RunConfig, from_dict, to_dict
from fm_ray.config.flags import (
    BY_DEST,
    INTERNAL_FIELDS,
    RUN_FLAGS,
    SECTIONS,
    config_from_args,
    config_from_values,
    flags_of,
    parse_values,
    values_from_config,
)
from fm_ray.errors import UserError
from fm_ray.sweep.grid import GRID_AXES, axis_type, sweep_from_args


def config_fields() -> list[str]:
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        fields += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return fields


def run_config(argv: list[str]) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", "--out", "x", *argv]))


def test_every_config_field_has_exactly_one_flag():
    named = [f.field for f in RUN_FLAGS]
    assert len(named) == len(set(named)), "a field with two flags"
    assert len(BY_DEST) == len(RUN_FLAGS), "two flags with one name"
    assert sorted(named) == sorted(set(config_fields()) - set(INTERNAL_FIELDS))
    assert set(INTERNAL_FIELDS) <= set(config_fields())
    # and the parser has each of them (a --no- form only for toggles), in every run-like command
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("run", "sweep"):
        options = {s for a in sub.choices[command]._actions for s in a.option_strings}
        for f in RUN_FLAGS:
            if command == "run" or not f.run_only:
                assert f.flag in options, (command, f.flag)
                assert (f"--no-{f.flag[2:]}" in options) == (f.kind == "toggle"), f.flag


ROUND_TRIP = [
    RunConfig(),
    from_dict(
        {
            **to_dict(RunConfig()),
            "data": {"dataset": "cifar10", "setting": "custom", "class_counts": [[0, 40], [3, 60]], "data_dir": "/d"}
            | {"skip_bad_images": True},
            "model": {"name": "torchvision:resnet34", "pretrained": True, "checkpoint": "/abs/w.pt"},
            "train": {**to_dict(RunConfig())["train"], "lr": 0.1 / 3, "warm_start": True, "freeze_backbone": True},
            "strategy": {**to_dict(RunConfig())["strategy"], "name": "fishermask", "fisher_samples": None}
            | {"labeled_init": False, "include_last_layer": True, "greedy": "reference", "embed_dtype": "bfloat16"},
            "pool": {"backend": "local", "shards": 3, "cpus_per_shard": 0.5, "gpus_per_shard": 0.25}
            | {"ray_address": "auto", "driver_cpus": 2.0, "driver_gpus": 1.0},
            "init": 7,
            "batch": 9,
            "rounds": 2,
            "budget": 30,
            "seed": 5,
        }
    ),
    from_dict(
        {
            **to_dict(RunConfig()),
            "data": {**to_dict(RunConfig())["data"], "dataset": "parquet:/pools/p", "setting": "setting1"},
            "strategy": {**to_dict(RunConfig())["strategy"], "fisher_dtype": "float64", "backward_steps": 2},
            "preset": "s1-low",
            "init": 115,
            "batch": 115,
            "budget": 575,
        }
    ),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=["default", "everything", "preset"])
def test_flags_of_a_config_rebuild_it(cfg):
    assert run_config(flags_of(cfg)) == cfg
    assert config_from_values(values_from_config(cfg)) == cfg


def test_fisher_samples_all_means_the_whole_pool():
    # it once came back as None, which reads as "not given": the default 1024 ran instead
    assert run_config(["--fisher-samples", "all"]).strategy.fisher_samples is None
    assert run_config([]).strategy.fisher_samples == 1024
    assert values_from_config(run_config(["--fisher-samples", "all"]))["fisher_samples"] == "all"


def test_a_spec_base_means_what_the_same_flags_mean():
    base = yaml.safe_load(
        """
        lr: 1e-3          # a string to YAML 1.1, a float to --lr
        epochs: 3
        fisher_samples: all
        class_counts: {0: 40, 1: 60}
        labeled_init: false
        warm_start: true
        skip_bad_images: false
        embed_dtype: float16
        train_batch_size: 32
        gpus_per_shard: 0
        preset: s2
        rounds: null
        """
    )
    flags = ["--lr", "1e-3", "--epochs", "3", "--fisher-samples", "all", "--class-counts", "0:40,1:60"]
    flags += ["--no-labeled-init", "--warm-start", "--embed-dtype", "float16", "--train-batch-size", "32"]
    flags += ["--gpus-per-shard", "0", "--preset", "s2"]
    cfg = config_from_values(parse_values(base, "spec base"))
    assert cfg == run_config(flags)
    assert cfg.data.setting == "custom" and cfg.init == 500 and cfg.strategy.fisher_samples is None
    assert cfg.train.lr == 1e-3 and cfg.strategy.embed_dtype == "float16" and cfg.pool.gpus_per_shard == 0.0


@pytest.mark.parametrize(
    "base, message",
    [
        ({"epoch": 3}, "unknown run flag 'epoch'"),
        ({"epochs": "two"}, "epochs must be int, got 'two'"),
        ({"fisher_samples": 0}, "--fisher-samples must be positive"),
        ({"warm_start": "yes"}, "warm_start must be true or false"),
        ({"greedy": "slow"}, "greedy must be one of fast, reference"),
        ({"seed": [1, 2]}, "seed takes one value"),
        ({"class_counts": "0:x"}, "--class-counts '0:x' is not valid"),
        ({"preset": "s9"}, "unknown preset 's9'"),
    ],
)
def test_bad_spec_base_values_are_one_line_errors(base, message, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": base}))
    assert main(["sweep", "--out", str(tmp_path / "out"), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_precedence_flags_over_spec_over_sweep_preset(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {epochs: 3, init: 20}\ngrid: {seeds: [4]}\n")
    sweep = ["sweep", "--out", "o", "--preset", "cpu-paper-fmnist-s2", "--spec", str(spec)]
    configs, _ = sweep_from_args(build_parser().parse_args(sweep))
    # spec over the sweep preset (epochs 15, init 100, seeds 0-2); the sweep preset over its regime's init
    assert {(c.train.epochs, c.init, c.seed, c.batch, c.preset) for c in configs} == {(3, 20, 4, 100, "s2")}
    configs, _ = sweep_from_args(build_parser().parse_args([*sweep, "--epochs", "2", "--seeds", "1"]))
    assert {(c.train.epochs, c.init, c.seed) for c in configs} == {(2, 20, 1)}
    # a regime: the settings axis and explicit flags win over its setting/init
    argv = ["sweep", "--out", "o", "--preset", "s1-low", "--settings", "balanced", "--init", "10"]
    configs, _ = sweep_from_args(build_parser().parse_args(argv))
    assert [(c.data.setting, c.init, c.batch, c.budget) for c in configs] == [("balanced", 10, 115, 575)]
    assert run_config(["--preset", "s1-low", "--setting", "balanced", "--init", "10"]) == configs[0]


def test_grid_axes_name_run_flags_and_parse_like_them():
    assert set(GRID_AXES.values()) <= set(BY_DEST)
    assert {a: axis_type(a) for a in ("seeds", "sparsities", "models")} == {"seeds": int, "sparsities": float} | {
        "models": str
    }
    with pytest.raises(UserError, match="--seeds"):
        sweep_from_args(build_parser().parse_args(["sweep", "--out", "o", "--seeds", "1.5"]))
