"""A newcomer's defaults (issue 17): FisherMask, a few rounds, the in-process pool unless Ray is what
is asked for, and --help examples that are right (each one parsed and validated here)."""

from __future__ import annotations

import shlex

import pytest

from fm_ray.cli import build_parser, main
from fm_ray.config import DEFAULT_ROUNDS, PoolConfig, resolve_backend
from fm_ray.config.flags import RUN_EXAMPLES, config_from_args, config_from_values
from fm_ray.errors import UserError
from fm_ray.run.validate import check, planned_rounds
from fm_ray.sweep.grid import AXIS_EXAMPLES, GRID_AXES, SWEEP_EXAMPLES, _grid_values, sweep_from_args


def parse(argv: str):
    return build_parser().parse_args(shlex.split(argv))


def test_run_defaults_to_fishermask_and_a_few_rounds():
    cfg = config_from_args(parse("run --out x"))
    assert cfg.strategy.name == "fishermask" and cfg.rounds == DEFAULT_ROUNDS == 5
    assert planned_rounds(cfg, 60_000) == 5  # not "until the pool is used up"
    assert config_from_args(parse("run --out x --rounds all")).rounds is None


def test_a_budget_or_a_preset_without_rounds_runs_to_the_budget():
    assert config_from_values({"budget": 600}).rounds is None
    s2 = config_from_values({"preset": "s2"})
    assert s2.rounds is None and planned_rounds(s2, 60_000) == 12  # (6500 - 500) / 500
    assert config_from_values({"preset": "s2", "rounds": 3}).rounds == 3  # an explicit --rounds wins


@pytest.mark.parametrize("bad", ["x", "2.5"])
def test_bad_rounds_is_one_line(bad, capsys):
    assert main(["run", "--out", "x", "--rounds", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds must be a count or 'all'" in err[0], err


@pytest.mark.parametrize(
    "pool, env, backend",
    [
        (PoolConfig(), None, "local"),
        (PoolConfig(shards=2), None, "ray"),
        (PoolConfig(gpus_per_shard=0.5), None, "ray"),
        (PoolConfig(gpus_per_shard=0.0), None, "local"),
        (PoolConfig(ray_address="auto"), None, "ray"),
        (PoolConfig(), "ray://head:10001", "ray"),
        (PoolConfig(backend="local", shards=4), "auto", "local"),  # an explicit backend stays
        (PoolConfig(backend="ray"), None, "ray"),
    ],
)
def test_auto_backend_is_ray_only_when_ray_is_asked_for(pool, env, backend, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert resolve_backend(pool) == backend


def test_backend_auto_is_the_default_and_a_typo_is_one_line(capsys):
    assert config_from_args(parse("run --out x")).pool.backend == "auto"
    assert main(["run", "--out", "x", "--backend", "rey"]) == 2
    assert "invalid choice: 'rey'" in capsys.readouterr().err


@pytest.mark.parametrize("what, argv", RUN_EXAMPLES, ids=[a for _, a in RUN_EXAMPLES])
def test_every_run_help_example_parses_and_validates(what, argv):
    cfg = config_from_args(parse(argv))
    check(cfg)  # strategy, model and every numeric check: a wrong example fails here


@pytest.mark.parametrize("what, argv", SWEEP_EXAMPLES, ids=[a for _, a in SWEEP_EXAMPLES])
def test_every_sweep_help_example_parses_and_validates(what, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' relative --out
    args = parse(argv)
    if args.command == "sweep":
        configs, _ = sweep_from_args(args)  # expands the grid through check(), as `fm-ray sweep` does
        assert configs or args.resume


def test_help_shows_the_examples(capsys):
    for command, examples in (("run", RUN_EXAMPLES), ("sweep", SWEEP_EXAMPLES)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(f"fm-ray {argv}\n" in text for _, argv in examples), text


@pytest.mark.parametrize("axis", list(GRID_AXES))
def test_every_grid_axis_example_is_a_valid_value_of_its_flag(axis):
    assert set(AXIS_EXAMPLES) == set(GRID_AXES)
    values = _grid_values(axis, AXIS_EXAMPLES[axis])
    for value in values:
        check(config_from_values({GRID_AXES[axis]: value}))


def test_a_bad_grid_list_names_its_own_axis_example():
    with pytest.raises(UserError, match=r"--lams 'x' .* e\.g\. --lams 0\.1,1,10"):
        _grid_values("lams", "x")
