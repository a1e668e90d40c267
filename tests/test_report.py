"""`fm-ray report` and the results loaders: hand-checked numbers on tiny tables, figures from real runs."""

import numpy as np
import pandas as pd
import pytest

from fm_ray.cli import main
from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig
from fm_ray.core.stopping import CRITERIA
from fm_ray.run.recipe import run_experiment
from fm_ray.sweep.report import (
    _markdown,
    aulc,
    class_histogram,
    class_label,
    load_queries,
    load_rounds,
    method_labels,
    method_styles,
    plot_class_histogram,
    seeds_note,
    stopping,
    summarize,
)
from fm_ray.sweep.tune import publish

SMALL = DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((0, 60), (1, 300), (2, 60)))


def test_aulc_is_the_normalised_trapezoid():
    assert aulc([20, 30, 40], [0.5, 0.7, 0.9]) == pytest.approx((10 * 0.6 + 10 * 0.8) / 20)
    assert aulc([40, 20, 30], [0.9, 0.5, 0.7]) == pytest.approx(0.7)  # order of rows does not matter
    assert aulc([20], [0.4]) == pytest.approx(0.4)


def synthetic_rounds() -> pd.DataFrame:
    # two methods x two seeds x rounds 0..1; a beats b except in (seed 1, round 0), where they tie
    acc = {("a", 0): [0.5, 0.8], ("a", 1): [0.4, 0.9], ("b", 0): [0.3, 0.6], ("b", 1): [0.4, 0.7]}
    rows = []
    for (m, seed), accs in acc.items():
        for r, a in enumerate(accs):
            rows.append({"run_id": f"{m}{seed}", "dataset": "d", "setting": "s", "strategy": m, "method": m,
                         "seed": seed, "round": r, "n_labeled": 10 + 10 * r, "accuracy": a, "n_queried": 10 - 10 * r,
                         "train_seconds": 1.0 + r, "query_seconds": 2.0, "mask_seconds": None, "embed_seconds": None,
                         "select_seconds": None, "classes": [0, 1], "queried_class_counts": [3, 7] if r == 0 else None})  # fmt: skip
    return pd.DataFrame(rows)


def test_summary_numbers_by_hand():
    table = summarize(synthetic_rounds()).set_index("method")
    assert table.loc["a", "final_accuracy"] == pytest.approx(0.85)
    assert table.loc["a", "final_accuracy_std"] == pytest.approx(0.05)
    assert table.loc["b", "aulc"] == pytest.approx(((0.3 + 0.6) / 2 + (0.4 + 0.7) / 2) / 2)
    assert table.loc["a", "mean_rank"] == pytest.approx((1 + 1 + 1.5 + 1) / 4)
    assert table.loc["b", "mean_rank"] == pytest.approx((2 + 2 + 1.5 + 2) / 4)
    assert table.loc["a", "train_s"] == pytest.approx(1.5) and table.loc["a", "query_s"] == pytest.approx(2.0)
    assert pd.isna(table.loc["a", "mask_s"]) and (table["seeds"] == 2).all() and (table["rounds"] == 2).all()
    hist = class_histogram(synthetic_rounds()).set_index(["method", "cls"])["count"]
    assert hist.to_dict() == {("a", 0): 6, ("a", 1): 14, ("b", 0): 6, ("b", 1): 14}


def test_stopping_gives_each_criterions_first_round_and_the_accuracy_given_up():
    acc = {0: [0.5, 0.7, 0.8], 1: [0.4, 0.6, 0.9]}
    kappa = {0: [False, True, True], 1: [False, False, True]}
    change = {0: [None, False, True], 1: [None, None, None]}  # null: not yet computable, never held
    rows = [
        {"run_id": f"a{seed}", "dataset": "d", "setting": "s", "method": "a", "seed": seed, "round": r,
         "n_labeled": 10 * (r + 1), "accuracy": acc[seed][r], "stop_kappa_average_holds": kappa[seed][r],
         "stop_classification_change_holds": change[seed][r], "stop_overall_uncertainty_holds": False}
        for seed in (0, 1) for r in range(3)
    ]  # fmt: skip
    stops = stopping(pd.DataFrame(rows[::-1])).set_index("criterion")  # row order does not matter
    k = stops.loc["kappa_average"]
    assert (k["seeds"], k["fired"]) == (2, 2) and k["round"] == 1.5 and k["n_labeled"] == 25
    assert k["given_up"] == pytest.approx((0.1 + 0.0) / 2) and k["given_up_std"] == pytest.approx(0.05)
    c = stops.loc["classification_change"]
    assert (c["fired"], c["round"], c["given_up"], c["given_up_std"]) == (1, 2, 0.0, 0.0)
    for never in ("overall_uncertainty", "budget"):  # budget's column is absent: older runs
        assert stops.loc[never, "fired"] == 0 and pd.isna(stops.loc[never, "round"])
    md = _markdown(summarize(synthetic_rounds()), [], "x", stopping(pd.DataFrame(rows)))
    assert "| d | s | a | round 1.5 (2/2), gives up +0.0500 ± 0.0500 | round 2.0 (1/2), gives up +0.0000 |" in md
    assert "overall_uncertainty" not in md.split("## Stopping criteria")[1].splitlines()[2]  # never fired: no column
    assert "Never held in any run: overall_uncertainty, budget." in md


def test_every_method_of_a_large_grid_looks_different():
    """The baselines grid has 13 methods: no two may share a color (tab10 repeats after ten)."""
    styles = method_styles([f"m{i}" for i in range(20)])
    assert len({s["color"] for s in styles.values()}) == 20
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}) == 20


def test_method_labels_name_what_varies():
    base = {"strategy": {"name": "fishermask", "sparsity": 0.01, "lam": 1.0}, "seed": 0, "data": {"setting": "x"}}
    other = {"strategy": {"name": "fishermask", "sparsity": 0.1, "lam": 1.0}, "seed": 1, "data": {"setting": "y"}}
    assert method_labels({"r1": base, "r2": other}) == {
        "r1": "fishermask sparsity=0.01",
        "r2": "fishermask sparsity=0.1",
    }
    assert method_labels({"r1": base}) == {"r1": "fishermask"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs (random, fishermask) as run dirs, published into a sweep-style results dataset."""
    root = tmp_path_factory.mktemp("report")
    for name in ("random", "fishermask"):
        cfg = RunConfig(data=SMALL, train=TrainConfig(epochs=1, device="cpu"), strategy=StrategyConfig(name=name), pool=PoolConfig(backend="local"),
                        init=20, batch=10, rounds=1, seed=0)  # fmt: skip
        publish(str(root / "sweep"), run_experiment(cfg, root / name), cfg)
    return root


def test_loaders_read_a_sweep_and_a_run_dir(runs):
    sweep, run = load_rounds(runs / "sweep"), load_rounds(runs / "fishermask")
    assert len(sweep) == 4 and len(run) == 2 and set(sweep["strategy"]) == {"random", "fishermask"}
    assert list(sweep.columns) == list(run.columns)
    assert len(load_queries(runs / "sweep")) == 20 and set(load_queries(runs / "random")["setting"]) == {"custom"}
    assert len(pd.read_parquet(runs / "sweep" / "results" / "rounds")) == 4  # plain pandas reads it too


def png_size(path) -> tuple[int, int]:
    """The pixel size of a PNG, after decoding all of it (a truncated file fails here)."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


# Each figure has one 5.5 x 4 inch panel per (dataset, setting), saved at 120 dpi.
ONE_PANEL = (round(5.5 * 120), 4 * 120)


def by_hand(rounds: list[dict], strategy: str) -> dict:
    """One method's summary numbers straight from its round rows (one seed, so the stds are 0)."""
    rows = sorted((r for r in rounds if r["strategy"] == strategy), key=lambda r: r["round"])
    n = np.array([r["n_labeled"] for r in rows], float)
    acc = np.array([r["accuracy"] for r in rows])
    area = sum((n[i + 1] - n[i]) * (acc[i + 1] + acc[i]) / 2 for i in range(len(n) - 1))
    queried = [r for r in rows if r["n_queried"] > 0]
    return {
        "seeds": 1,
        "rounds": len(rows),
        "final_n_labeled": n[-1],
        "final_accuracy": acc[-1],
        "final_accuracy_std": 0.0,
        "aulc": area / (n[-1] - n[0]),
        "aulc_std": 0.0,
        "train_s": np.mean([r["train_seconds"] for r in rows]),
        "query_s": np.mean([r["query_seconds"] for r in queried]),
    }


def test_report_writes_figures_and_tables(runs, tmp_path):
    import pyarrow.parquet as pq

    assert main(["report", str(runs / "sweep"), "--out", str(tmp_path)]) == 0
    for name in ("learning_curves.png", "class_histogram.png", "mask_profile.png"):
        assert png_size(tmp_path / name) == ONE_PANEL, name
    table = pd.read_csv(tmp_path / "summary.csv").set_index("method")
    rounds = [r for name in ("random", "fishermask") for r in pq.read_table(runs / name / "rounds.parquet").to_pylist()]
    stops = pd.read_csv(tmp_path / "stopping.csv").set_index(["method", "criterion"])
    for method in ("random", "fishermask"):  # every criterion's first round, from the runs' own verdicts
        for c in CRITERIA:
            held = [r["round"] for r in rounds if r["strategy"] == method and r[f"stop_{c}_holds"]]
            assert stops.loc[(method, c), "fired"] == bool(held), (method, c)
            assert (stops.loc[(method, c), "round"] == held[0]) if held else pd.isna(stops.loc[(method, c), "round"])
    assert sorted(table.index) == ["fishermask", "random"]
    md = (tmp_path / "summary.md").read_text()
    for method in ("random", "fishermask"):
        expected = by_hand(rounds, method)
        assert table.loc[method, list(expected)].to_dict() == pytest.approx(expected), method
        e = expected
        cells = [
            f"{e['final_accuracy']:.4f}",
            f"{e['aulc']:.4f}",
            f"{e['train_s']:.2f}",
        ]  # one seed: no ± (nothing to spread)
        row = f"| fashion_mnist | custom | {method} | 1 | 2 | {e['final_n_labeled']:.0f} | {cells[0]} | {cells[1]} |"
        assert row in md and cells[2] in md, method
    # two methods, one seed: per round the better one ranks 1, the other 2 (a tie 1.5 each)
    acc = {(r["strategy"], r["round"]): r["accuracy"] for r in rounds}
    ranks = {
        m: np.mean([1 + (acc[(o, k)] > acc[(m, k)]) + 0.5 * (acc[(o, k)] == acc[(m, k)]) for k in (0, 1)])
        for m, o in (("random", "fishermask"), ("fishermask", "random"))
    }
    assert table["mean_rank"].to_dict() == pytest.approx(ranks)
    fisher = [r for r in rounds if r["strategy"] == "fishermask" and r["n_queried"] > 0]
    assert table.loc["fishermask", "mask_s"] == pytest.approx(np.mean([r["mask_seconds"] for r in fisher]))
    assert pd.isna(table.loc["random", "mask_s"])
    # a single run dir reports too: its own numbers
    assert main(["report", str(runs / "random")]) == 0
    single = pd.read_csv(runs / "random" / "report" / "summary.csv").set_index("method")
    assert list(single.index) == ["random"]
    assert single.loc["random", list(by_hand(rounds, "random"))].to_dict() == pytest.approx(by_hand(rounds, "random"))
    assert png_size(runs / "random" / "report" / "learning_curves.png") == ONE_PANEL
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_one_seed_is_titled_as_one_seed_not_a_spread():
    rounds = synthetic_rounds()
    assert seeds_note(rounds) == "mean ± std over 2 seeds"
    one = rounds[rounds["seed"] == 1]
    assert seeds_note(one) == "one seed (1)"
    md = _markdown(summarize(one), [], "x")
    assert "±" not in md and "One seed" in md
    assert (class_histogram(one)["seeds"] == 1).all() and (class_histogram(rounds)["seeds"] == 2).all()


def test_the_class_histogram_names_the_classes(tmp_path):
    assert class_label("fashion_mnist", 0) == "T-shirt/top" and class_label("fashion_mnist", 9) == "Ankle boot"
    assert class_label("cifar10", 3) == "cat"
    for name in ("dog", "cat"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert class_label(f"imagefolder:{tmp_path}", 1) == "dog"  # sorted folders: cat, dog
    assert class_label("parquet:/gone", 4) == "4"  # only ids known: the id


def test_the_class_histogram_figure_has_class_names_on_its_x_axis(tmp_path, monkeypatch):
    import matplotlib.figure

    seen: list[list[str]] = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        seen.append([t.get_text() for ax in fig.axes for t in ax.get_xticklabels()])
        seen.append([fig.get_suptitle()])
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    rounds = synthetic_rounds().assign(dataset="fashion_mnist")
    plot_class_histogram(class_histogram(rounds[rounds["seed"] == 0]), tmp_path / "h.png")
    assert seen == [["T-shirt/top", "Trouser"], ["Queried samples per class (summed over rounds)"]]
