"""Ray Tune sweeps on real FashionMNIST slices: rows per trial, report, resume == uninterrupted, trial == run."""

import json
import logging
import math
import os
import re
import signal

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from fm_ray.cli import build_parser, main
from fm_ray.config import from_dict
from fm_ray.errors import UserError
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS, run_id
from fm_ray.strategies import STRATEGIES
from fm_ray.sweep.grid import SWEEP_PRESETS, SweepOptions, sweep_from_args
from fm_ray.sweep.report import load_queries, load_rounds
from fm_ray.sweep.tune import run_sweep, trial_resources

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GRID = ["--strategies", "random,entropy", "--seeds", "0,1"]
SMALL = ["--class-counts", "0:60,1:300,2:60", "--init", "20", "--batch", "10", "--rounds", "2", "--epochs", "1"]
SMALL += ["--model", "cnn", "--device", "cpu", "--backend", "local"]
KEY = ["run_id", "round"]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main(["sweep", "--out", str(out), *GRID, *SMALL]) == 0
    return out


def strip(df):
    df = df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns])
    return df.sort_values([c for c in ("run_id", "round", "pool_index") if c in df.columns]).reset_index(drop=True)


def as_records(df) -> list[dict]:
    # list-valued cells come back as numpy arrays and missing floats as NaN; compare lists and None
    def plain(v):
        v = v.tolist() if hasattr(v, "tolist") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    return [{k: plain(v) for k, v in r.items()} for r in df.to_dict("records")]


def test_sweep_writes_one_partitioned_dataset(sweep_dir):
    rounds, queries = load_rounds(sweep_dir), load_queries(sweep_dir)
    assert len(rounds) == 4 * 3 and len(queries) == 4 * 20  # 4 trials x (round 0 + 2 query rounds)
    assert set(rounds["strategy"]) == {"random", "entropy"} and set(rounds["seed"]) == {0, 1}
    assert set(rounds["dataset"]) == {"fashion_mnist"} and set(rounds["setting"]) == {"custom"}
    assert sorted(rounds.groupby("run_id")["round"].apply(list).tolist()) == [[0, 1, 2]] * 4
    files = sorted((sweep_dir / "results" / "rounds" / "dataset=fashion_mnist" / "setting=custom").glob("*.parquet"))
    assert [f.stem for f in files] == sorted(rounds["run_id"].unique())  # one file per trial, named by its id
    assert ds.dataset(sweep_dir / "results" / "rounds", partitioning="hive").count_rows() == 12
    # each trial's stored config is the one whose id names it; sweep.json holds the same four
    configs = {f.stem: json.loads(f.read_text()) for f in (sweep_dir / "results" / "configs").glob("*.json")}
    assert sorted(configs) == [f.stem for f in files]
    assert all(c["run_id"] == rid == run_id(from_dict(c["config"])) for rid, c in configs.items())
    stored = json.loads((sweep_dir / "sweep.json").read_text())
    assert sorted(run_id(from_dict(c)) for c in stored["configs"]) == sorted(configs)
    assert {(c["strategy"]["name"], c["seed"]) for c in stored["configs"]} == {
        (s, n) for s in ("random", "entropy") for n in (0, 1)
    }
    assert (sweep_dir / "tune").is_dir()


def test_trial_rows_equal_a_direct_run(sweep_dir, tmp_path):
    rid = sorted(load_rounds(sweep_dir)["run_id"].unique())[0]
    cfg = from_dict(json.loads((sweep_dir / "results" / "configs" / f"{rid}.json").read_text())["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a trial has 1 CPU, so Ray gives it one thread; CPU float sums depend on it
    try:
        out = run_experiment(cfg, tmp_path / "direct")
    finally:
        torch.set_num_threads(threads)
    for load in (load_rounds, load_queries):
        trial = load(sweep_dir)
        assert as_records(strip(load(out))) == as_records(strip(trial[trial["run_id"] == rid]))


def test_report_from_sweep(sweep_dir, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "rep")]) == 0
    for name in ("learning_curves.png", "class_histogram.png"):
        with Image.open(tmp_path / "rep" / name) as im:
            im.load()  # decodes the whole file
            assert (im.format, im.size) == ("PNG", (660, 480)), name  # one 5.5 x 4 in panel at 120 dpi
    table = pd.read_csv(tmp_path / "rep" / "summary.csv").set_index("method")
    # by hand from the trials' own rounds files: per method, mean and population std over the seeds
    files = (sweep_dir / "results" / "rounds").rglob("*.parquet")
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert sorted(table.index) == ["entropy", "random"] and (table["seeds"] == 2).all()
    md = (tmp_path / "rep" / "summary.md").read_text()
    for method in ("entropy", "random"):
        finals, areas = [], []
        for seed in (0, 1):
            run = sorted((r for r in rows if r["strategy"] == method and r["seed"] == seed), key=lambda r: r["round"])
            n, acc = [r["n_labeled"] for r in run], [r["accuracy"] for r in run]
            finals.append(acc[-1])
            areas.append(sum((n[i + 1] - n[i]) * (acc[i + 1] + acc[i]) / 2 for i in range(len(n) - 1)) / (n[-1] - n[0]))
        expected = {"final_accuracy": np.mean(finals), "final_accuracy_std": np.std(finals),
                    "aulc": np.mean(areas), "aulc_std": np.std(areas), "rounds": 3, "final_n_labeled": 40}  # fmt: skip
        assert table.loc[method, list(expected)].to_dict() == pytest.approx(expected), method
        cells = f"{np.mean(finals):.4f} ± {np.std(finals):.4f} | {np.mean(areas):.4f} ± {np.std(areas):.4f}"
        assert f"| fashion_mnist | custom | {method} | 2 | 3 | 40 | {cells} |" in md
    assert table["mean_rank"].sum() == pytest.approx(3.0)  # two methods: ranks 1 and 2 (ties 1.5 each)


def interrupt_after(n: int, marker):
    """A Tune callback that presses Ctrl+C (SIGINT to this process) after `n` trial results, once.

    Tune pickles callbacks with the experiment and restores them on resume: the marker file keeps
    the restored copy from interrupting again.
    """
    from ray import tune

    class _Cb(tune.Callback):
        seen = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.seen += 1
            if self.seen >= n and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    return _Cb()


def test_interrupted_sweep_resumes_to_the_same_rows(sweep_dir, tmp_path):
    out = tmp_path / "cut"
    configs, opts = sweep_from_args(build_parser().parse_args(["sweep", "--out", str(out), *GRID, *SMALL]))
    run_sweep(configs, opts, callbacks=[interrupt_after(4, tmp_path / "interrupted")])
    before = load_rounds(out)
    assert 0 < len(before) < 12  # stopped mid-way
    assert main(["sweep", "--out", str(out), "--resume"]) == 0
    after, full = load_rounds(out), load_rounds(sweep_dir)
    assert as_records(strip(after)) == as_records(strip(full))
    assert as_records(strip(load_queries(out))) == as_records(strip(load_queries(sweep_dir)))
    # finished rounds were not redone: their (non-deterministic) timings survived the resume
    kept = before.merge(after, on=KEY, suffixes=("_before", "_after"))
    assert len(kept) == len(before) and (kept["train_seconds_before"] == kept["train_seconds_after"]).all()
    with pytest.raises(UserError, match="already holds a sweep"):
        run_sweep(configs, SweepOptions(out=str(out)))


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("grid: [1, 2\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("base: {setting: café}\n".encode("latin-1"))
    typed = tmp_path / "typed.yaml"
    typed.write_text("sweep: {max_concurrent: two}\n")
    floaty = tmp_path / "floaty.yaml"
    floaty.write_text("sweep: {max_concurrent: 1.5, cpus_per_trial: 1}\n")
    cpus = tmp_path / "cpus.yaml"
    cpus.write_text("sweep: {cpus_per_trial: [1]}\n")
    (tmp_path / "file").write_text("not a folder")
    cases = [
        (["--preset", "paper-nope"], "unknown preset"),
        (["--spec", str(latin1)], "not UTF-8 text"),
        (["--spec", str(typed)], "sweep option max_concurrent must be an integer, got 'two'"),
        (["--spec", str(floaty)], "sweep option max_concurrent must be an integer, got 1.5"),
        (["--spec", str(cpus)], "sweep option cpus_per_trial must be a number, got [1]"),
        (["--cpus-per-trial", "nan"], "must be finite"),
        (["--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["--seeds", "0,x"], "--seeds"),
        (["--strategies", "random,nope"], "unknown strategy"),
        (["--spec", str(tmp_path / "missing.yaml")], "cannot read"),
        (["--spec", str(spec)], "cannot read"),
        (["--resume"], "no sweep to continue"),
    ]
    for flags, message in cases:
        assert main(["sweep", "--out", str(tmp_path / "x"), *SMALL, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)


def test_spec_file_and_flags_build_the_grid(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {epochs: 2, model: mlp, labeled_init: false}\ngrid: {seeds: [0, 1], sparsities: [0.01]}\n")
    args = build_parser().parse_args(["sweep", "--out", "o", "--spec", str(spec), "--strategies", "fishermask,bait"])
    configs, _ = sweep_from_args(args)
    assert len(configs) == 4 and {c.strategy.name for c in configs} == {"fishermask", "bait"}
    assert all(c.train.epochs == 2 and c.model.name == "mlp" and c.strategy.sparsity == 0.01 for c in configs)
    assert all(not c.strategy.labeled_init for c in configs)
    # a regime axis: explicit flags win over the regime's values, as with `fm-ray run`
    args = build_parser().parse_args(["sweep", "--out", "o", "--presets", "s1-low,s2", "--batch", "7"])
    configs, _ = sweep_from_args(args)
    assert [(c.data.setting, c.init, c.batch) for c in configs] == [("setting1", 115, 7), ("setting2", 500, 7)]


def test_presets_expand():
    for name in SWEEP_PRESETS:
        configs, opts = sweep_from_args(build_parser().parse_args(["sweep", "--out", "o", "--preset", name]))
        assert configs and opts.out == "o"
    configs, _ = sweep_from_args(build_parser().parse_args(["sweep", "--out", "o", "--preset", "paper-cifar10-s2"]))
    assert len(configs) == 7 * 3 and {c.model.name for c in configs} == {"resnet18"}
    assert {(c.data.dataset, c.data.setting, c.init, c.batch, c.budget) for c in configs} == {
        ("cifar10", "setting2", 500, 500, 6500)
    }
    # the baselines grid: every registered strategy, both settings, three seeds
    configs, _ = sweep_from_args(build_parser().parse_args(["sweep", "--out", "o", "--preset", "cpu-baselines-fmnist"]))
    assert {c.strategy.name for c in configs} == set(STRATEGIES)
    assert len(configs) == len(STRATEGIES) * 2 * 3 and len({run_id(c) for c in configs}) == len(configs)
    assert {c.strategy.batchbald_samples for c in configs} == {500}
    assert {(c.data.dataset, c.data.setting, c.model.name) for c in configs} == {
        ("fashion_mnist", "setting1", "cnn"),
        ("fashion_mnist", "setting2", "cnn"),
    }


def test_ray_pool_trials_reserve_their_shards():
    configs, _ = sweep_from_args(
        build_parser().parse_args(
            ["sweep", "--out", "o", "--backend", "ray", "--shards", "3", "--gpus-per-shard", "0.5"]
        )
    )
    from fm_ray.config import to_dict

    pgf = trial_resources({"cfg": to_dict(configs[0])}, 1.0, 0.0)
    assert pgf.bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.5}] * 3


def test_sweep_to_a_storage_uri(tmp_path, sweep_dir):
    """A URI --out (here file://, the same pyarrow path as s3:// or gs://): run dirs live in node-local
    temp folders and results are written through the pyarrow filesystem."""
    out = tmp_path / "uri"
    assert main(["sweep", "--out", f"file://{out}", "--strategies", "random", "--seeds", "0", *SMALL]) == 0
    assert not (out / "runs").exists()  # no local run dirs under a URI root
    rows = load_rounds(out)
    assert len(rows) == 3 and set(rows["strategy"]) == {"random"}
    # the same trial in the local sweep computed the same rows
    local = load_rounds(sweep_dir)
    local = local[(local["strategy"] == "random") & (local["seed"] == 0)]
    assert strip(rows)["accuracy"].tolist() == strip(local)["accuracy"].tolist()
    assert main(["report", f"file://{out}"]) == 2


def test_trial_larger_than_a_fixed_cluster_is_an_error(caplog):
    from fm_ray.sweep.tune import check_fits

    args = build_parser().parse_args(["sweep", "--out", "o", "--strategies", "fishermask", *SMALL[:-2]])
    args.backend, args.shards = "ray", 2  # driver + 2 shards = 3 CPUs > the module's 2
    configs, opts = sweep_from_args(args)
    with pytest.raises(UserError, match=r"needs \{'CPU': 3.0\} \(driver \+ 2 shard actors\)"):
        check_fits(configs, opts, fixed=True)
    with caplog.at_level(logging.WARNING, logger="fm_ray"):
        check_fits(configs, opts, fixed=False)  # a cluster that may scale up: a warning only
    assert "waits until the cluster scales up" in caplog.text


def test_trial_with_ray_shards_runs_in_its_placement_group(tmp_path, sweep_dir):
    """--backend ray: the trial's bundle list holds its shard actor, which Tune places in the trial's
    placement group (2 CPUs: driver + shard); the rows equal the local-pool trial's."""
    out = tmp_path / "sharded"
    assert SMALL[-2:] == ["--backend", "local"]
    flags = [*SMALL[:-1], "ray"]
    assert main(["sweep", "--out", str(out), "--strategies", "entropy", "--seeds", "0", *flags, "--shards", "1"]) == 0
    rows = load_rounds(out)
    assert set(rows["backend"]) == {"ray"}
    local = load_rounds(sweep_dir)
    local = local[(local["strategy"] == "entropy") & (local["seed"] == 0)]
    assert strip(rows)["accuracy"].tolist() == strip(local)["accuracy"].tolist()
    assert (
        strip(load_queries(out))["pool_index"].tolist()
        == strip(load_queries(sweep_dir).query("run_id in @local.run_id"))["pool_index"].tolist()
    )


def test_sweep_console_shows_fm_ray_progress_lines_only(tmp_path, capfd):
    """Tune's banner, tables and trial output give way to one fm_ray line per trial result."""
    small = [*SMALL[: SMALL.index("--rounds")], "--rounds", "1", *SMALL[SMALL.index("--rounds") + 2 :]]
    assert main(["sweep", "--out", str(tmp_path / "s"), "--strategies", "random", *small]) == 0
    out = capfd.readouterr().out.splitlines()
    assert out and all(line.startswith("[fm-ray ") for line in out), out
    assert sum("round 1: acc" in line for line in out) == 1 and any("1/1 done" in line for line in out), out


def test_a_degenerate_trial_errors_with_its_line_while_the_others_finish(tmp_path, capsys):
    """--lr 1e6 makes the model diverge (NaN or saturated): the entropy trial stops at its first query with the one-line
    DegenerateModelError; the random trial (no model in its query) finishes all its rounds."""
    import pandas as pd

    out = tmp_path / "s"
    args = ["sweep", "--out", str(out), "--strategies", "random,entropy", "--seeds", "0", *SMALL, "--lr", "1e6"]
    assert main(args) == 1
    rounds = pd.read_parquet(out / "results" / "rounds")
    assert set(rounds["strategy"]) == {"random"} and sorted(rounds["round"]) == [0, 1, 2]
    errors = [p.read_text() for p in out.rglob("error.txt")]
    line = re.compile(
        r"DegenerateModelError: round 0: (the model's outputs on the pool are not finite|every candidate)"
    )
    assert errors and all(line.search(e) for e in errors), errors
    # on the console: fm_ray's one line with the cause and the error file, not Tune's traceback
    printed = capsys.readouterr()
    failed = [x for x in (printed.out + printed.err).splitlines() if "failed: " in x]
    assert len(failed) == 1 and line.search(failed[0]) and "details in " in failed[0], failed
    assert failed[0].endswith("(resume with --resume)") and "fm_ray.errors." not in failed[0]
    assert "Traceback" not in printed.out + printed.err
