"""`fm-ray report`: figures and tables from a run or sweep directory (FisherMask arXiv 2411.05752).

Learning curves, mean +- std over seeds (a single seed's titled as one seed, without a band), one
line per method and one panel per (dataset, setting) (the paper's Figs. 4-5); the FisherMask mask
profile across layers (Fig. 2); the class histogram of queried samples, by class name; a table of
final accuracy, area under the learning curve, mean rank and seconds per round per phase; and where
each stopping criterion first held, with the accuracy given up by stopping there. A "method" is the strategy plus any hyper-parameter that varies in the sweep
(e.g. `fishermask sparsity=0.01`). Stds are population stds (ddof=0) over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fm_ray.core.stopping import CRITERIA
from fm_ray.errors import UserError
from fm_ray.run.rundir import PARTITIONS, ROUND_SCHEMA, SWEEP_QUERY_SCHEMA, flat_config

PANEL = ["dataset", "setting"]
PHASES = {"train": "train_seconds", "query": "query_seconds", "mask": "mask_seconds", "embed": "embed_seconds",
          "select": "select_seconds"}  # fmt: skip
# Config fields that never make two runs different methods: the axes a report averages or panels over.
_NOT_METHOD = ("seed", "preset", "data.", "pool.", "train.device", "strategy.name")


# ---------------------------------------------------------------------------------------------
# Loading: a sweep dir (results/{rounds,queries}/dataset=../setting=../*.parquet) or a run dir.


def _partitioned(root: Path, schema: pa.Schema) -> pd.DataFrame:
    part = ds.partitioning(pa.schema([(c, pa.string()) for c in PARTITIONS]), flavor="hive")
    dataset = ds.dataset(root, format="parquet", partitioning=part)
    _one_file_per_run(dataset, root)
    table = dataset.to_table()
    return table.select([n for n in schema.names if n in table.column_names]).to_pandas()


def _one_file_per_run(dataset: ds.Dataset, root: Path) -> None:
    """A sweep writes each run's rows to one file (`<run_id>.parquet`): rows of one run in two files
    (a copy, a stale file moved in) would be mixed into its curves; one UserError names both."""
    seen: dict[str, str] = {}
    for fragment in dataset.get_fragments():
        for rid in set(fragment.to_table(columns=["run_id"]).column("run_id").to_pylist()):
            first = seen.setdefault(rid, fragment.path)
            if first != fragment.path:
                raise UserError(
                    f"{root}: run {rid} has rows in two files, {first} and {fragment.path}: delete the one that is "
                    f"not the sweep's own ({rid}.parquet; a copy or a stale file), then report again"
                )


def _load(path: str | Path, kind: str, schema: pa.Schema) -> pd.DataFrame:
    if "://" in str(path):
        raise UserError(
            f"{path}: fm-ray report reads a local folder; copy the sweep down first "
            "(e.g. `aws s3 sync s3://bucket/sweep ./sweep`, `gcloud storage rsync -r gs://bucket/sweep ./sweep`)"
        )
    path = Path(path)
    try:
        if (path / "results" / kind).is_dir():
            return _partitioned(path / "results" / kind, schema)
        if (path / f"{kind}.parquet").exists():
            df = pq.read_table(path / f"{kind}.parquet").to_pandas()
            if kind == "queries":  # a run dir's queries carry no partition columns; take them from its rows
                rows = pq.read_table(path / "rounds.parquet", columns=["run_id", *PARTITIONS]).to_pandas()
                df = df.merge(rows.drop_duplicates("run_id"), on="run_id", how="left")
            return df
    except pa.ArrowInvalid as e:  # a truncated or foreign file: Arrow's message names it
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(
            f"{path}: a results file is damaged or not Parquet ({first}): restore it, or delete it and "
            "rerun its run with --resume (fm_ray itself writes every file atomically)"
        ) from None
    raise UserError(f"{path} holds neither a sweep (results/{kind}/) nor a run ({kind}.parquet): give one of those")


def load_rounds(path: str | Path) -> pd.DataFrame:
    """All round rows (results.ROUND_SCHEMA columns) of a sweep dir or a run dir."""
    return _load(path, "rounds", ROUND_SCHEMA)


def load_queries(path: str | Path) -> pd.DataFrame:
    """All queried samples (results.QUERY_SCHEMA + dataset, setting) of a sweep dir or a run dir."""
    return _load(path, "queries", SWEEP_QUERY_SCHEMA)


def load_configs(path: str | Path) -> dict[str, dict[str, Any]]:
    """run_id -> config dict (config.to_dict) for a sweep dir or a run dir."""
    path = Path(path)
    files = sorted((path / "results" / "configs").glob("*.json")) or [path / "config.json"]
    stored = [json.loads(f.read_text()) for f in files if f.exists()]
    return {s["run_id"]: s["config"] for s in stored}


# ---------------------------------------------------------------------------------------------
# Tables.


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """`flat_config`, lists as JSON text (one table cell each)."""
    return {k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flat_config(d).items()}


def method_labels(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """run_id -> strategy name plus every other config field that varies across the runs."""
    flat = {rid: _flatten(c) for rid, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if not k.startswith(_NOT_METHOD) and len({repr(f.get(k)) for f in flat.values()}) > 1]
    return {
        rid: " ".join([f["strategy.name"], *(f"{k.split('.')[-1]}={f.get(k)}" for k in varying)])
        for rid, f in flat.items()
    }


def with_methods(rounds: pd.DataFrame, configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    labels = method_labels(configs)
    rounds = rounds.copy()
    rounds["method"] = [labels.get(rid, s) for rid, s in zip(rounds["run_id"], rounds["strategy"], strict=True)]
    return rounds


def aulc(n_labeled: np.ndarray, accuracy: np.ndarray) -> float:
    """Area under one learning curve: trapezoid over n_labeled, divided by the n_labeled span."""
    order = np.argsort(n_labeled, kind="stable")
    x, y = np.asarray(n_labeled, float)[order], np.asarray(accuracy, float)[order]
    span = x[-1] - x[0]
    return float(y[0]) if span == 0 else float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / span)


def summarize(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, setting, method): final accuracy, AULC, mean rank, seconds per phase.

    `rounds` needs a `method` column (see `with_methods`).
    """
    keys = [*PANEL, "method"]
    per_run = (
        rounds.sort_values("round")
        .groupby([*keys, "seed", "run_id"], sort=True)
        .apply(
            lambda g: pd.Series(
                {
                    "final_n_labeled": g["n_labeled"].iloc[-1],
                    "final_accuracy": g["accuracy"].iloc[-1],
                    "aulc": aulc(g["n_labeled"].to_numpy(), g["accuracy"].to_numpy()),
                }
            ),
            include_groups=False,
        )
        .reset_index()
    )
    table = per_run.groupby(keys).agg(
        seeds=("seed", "nunique"),
        final_n_labeled=("final_n_labeled", "mean"),
        final_accuracy=("final_accuracy", "mean"),
        final_accuracy_std=("final_accuracy", lambda s: s.std(ddof=0)),
        aulc=("aulc", "mean"),
        aulc_std=("aulc", lambda s: s.std(ddof=0)),
    )
    ranked = rounds.assign(
        rank=rounds.groupby([*PANEL, "seed", "round"])["accuracy"].rank(ascending=False, method="average")
    )
    table["mean_rank"] = ranked.groupby(keys)["rank"].mean()
    table["rounds"] = rounds.groupby(keys)["round"].nunique()
    table["train_s"] = rounds.groupby(keys)["train_seconds"].mean()
    queried = rounds[rounds["n_queried"] > 0]  # the last round queries nothing
    for phase, col in PHASES.items():
        if phase != "train":
            table[f"{phase}_s"] = queried.groupby(keys)[col].mean()
    return table.reset_index()


def stopping(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, setting, method, criterion): where each stopping criterion first held
    (core.stopping, evaluated after every round whether or not --stop ended the run) and what stopping
    there costs: `given_up` is the run's final accuracy minus its accuracy at that round.

    Means and stds (ddof=0) are over the seeds where it fired (`fired` of `seeds`); a criterion that
    never fired, or runs recorded before the criteria existed, leave NaN.
    """
    keys = [*PANEL, "method"]
    out = []
    for key, g in rounds.sort_values("round").groupby(keys, sort=True):
        for criterion in CRITERIA:
            col = f"stop_{criterion}_holds"
            fired: list[tuple[int, float, float]] = []  # (round, n_labeled, given up) per seed that fired
            runs = list(g.groupby("run_id", sort=True))
            for _, run in runs:
                holds = run[col].fillna(False).astype(bool).to_numpy() if col in run else np.zeros(len(run), bool)
                if holds.any():
                    at = int(np.argmax(holds))
                    acc = run["accuracy"].to_numpy()
                    fired.append((int(run["round"].iloc[at]), float(run["n_labeled"].iloc[at]), acc[-1] - acc[at]))
            f = np.array(fired, float).reshape(-1, 3)
            nan = float("nan")
            out.append(
                dict(zip(keys, key, strict=True))
                | {
                    "criterion": criterion,
                    "seeds": len(runs),
                    "fired": len(fired),
                    "round": f[:, 0].mean() if len(f) else nan,
                    "n_labeled": f[:, 1].mean() if len(f) else nan,
                    "given_up": f[:, 2].mean() if len(f) else nan,
                    "given_up_std": f[:, 2].std() if len(f) else nan,
                }
            )
    return pd.DataFrame(out)


def seeds_note(df: pd.DataFrame) -> str:
    """How a figure aggregates seeds: "one seed (0)" when there is one, so no spread is claimed."""
    seeds = sorted(df["seed"].unique())
    return f"one seed ({seeds[0]})" if len(seeds) == 1 else f"mean ± std over {len(seeds)} seeds"


def class_names(dataset: str) -> list[str] | None:
    """The names of a dataset's class ids: the built-ins', an image folder's (its sorted class
    folders, if the folder is still there); None where only ids are known (a Parquet pool)."""
    from torchvision.datasets import FashionMNIST

    from fm_ray.data.builtin import CIFAR10_CLASSES

    known = {"fashion_mnist": tuple(FashionMNIST.classes), "cifar10": CIFAR10_CLASSES}
    if dataset in known:
        return list(known[dataset])
    kind, _, path = dataset.partition(":")
    train = Path(path).expanduser() / "train"
    if kind == "imagefolder" and train.is_dir():
        return sorted(p.name for p in train.iterdir() if p.is_dir())
    return None


def class_label(dataset: str, cls: int) -> str:
    names = class_names(dataset)
    return names[cls] if names is not None and 0 <= cls < len(names) else str(cls)


def class_histogram(rounds: pd.DataFrame) -> pd.DataFrame:
    """Queried samples per (dataset, setting, method, class), summed over rounds and seeds."""
    recs = [
        {**{k: r[k] for k in [*PANEL, "method"]}, "cls": int(c), "count": int(n)}
        for r in rounds.to_dict("records")
        if r["queried_class_counts"] is not None
        for c, n in zip(r["classes"], r["queried_class_counts"], strict=True)
    ]
    if not recs:
        return pd.DataFrame(columns=[*PANEL, "method", "cls", "count", "seeds"])
    seeds = rounds.groupby([*PANEL, "method"])["seed"].nunique().rename("seeds").reset_index()
    hist = pd.DataFrame(recs).groupby([*PANEL, "method", "cls"], as_index=False)["count"].sum()
    return hist.merge(seeds, on=[*PANEL, "method"])


def mask_profile(rounds: pd.DataFrame) -> pd.DataFrame:
    """Mean kept fraction per (dataset, setting, method, layer) over rounds and seeds; layer order kept."""
    recs = [
        {**{k: r[k] for k in [*PANEL, "method"]}, "layer": p["name"], "order": i, "fraction": p["fraction"]}
        for r in rounds.to_dict("records")
        if r["mask_profile"] is not None
        for i, p in enumerate(r["mask_profile"])
    ]
    if not recs:
        return pd.DataFrame(columns=[*PANEL, "method", "layer", "order", "fraction"])
    return (
        pd.DataFrame(recs)
        .groupby([*PANEL, "method", "layer"], as_index=False)
        .agg(order=("order", "min"), fraction=("fraction", "mean"))
        .sort_values([*PANEL, "method", "order"])
    )


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg).


def _panels(df: pd.DataFrame, title: str) -> tuple[Any, list[tuple[tuple[str, str], Any, pd.DataFrame]]]:
    """One axis per (dataset, setting), with that panel's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(d, s) for d, s in zip(df["dataset"], df["setting"], strict=True)})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    fig.suptitle(title)
    subs = [df[(df["dataset"] == d) & (df["setting"] == s)] for d, s in keys]
    return fig, list(zip(keys, axes[0], subs, strict=True))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_learning_curves(rounds: pd.DataFrame, path: Path) -> Path:
    fig, panels = _panels(rounds, f"Test accuracy vs. labeled samples ({seeds_note(rounds)})")
    styles = method_styles(sorted(rounds["method"].unique()))
    for (d, s), ax, sub in panels:
        for method, g in sub.groupby("method"):
            curve = g.groupby("round").agg(
                n=("n_labeled", "mean"), mean=("accuracy", "mean"), std=("accuracy", lambda x: x.std(ddof=0))
            )
            ax.plot(curve["n"], curve["mean"], ms=3, label=method, **styles[method])
            if g["seed"].nunique() > 1:  # a band only where there is a spread to show
                ax.fill_between(
                    curve["n"],
                    curve["mean"] - curve["std"],
                    curve["mean"] + curve["std"],
                    color=styles[method]["color"],
                    alpha=0.12,
                )
        ax.set(title=f"{d} / {s}", xlabel="labeled samples", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(styles) > 8 else 1)
    return _save(fig, path)


def method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """One look per method, the same in every panel and no two alike: tab10's colors, then tab20's
    other shades, each with its own marker and, past ten methods, a dashed line."""
    import matplotlib

    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    colors = [tab10(i) for i in range(10)] + [tab20(i) for i in range(1, 20, 2)]
    markers = "osD^vP*Xhp<>d"
    return {
        m: {"color": colors[i % len(colors)], "marker": markers[i % len(markers)], "linestyle": "-" if i < 10 else "--"}
        for i, m in enumerate(methods)
    }


def _grouped_bars(
    ax: Any, table: pd.DataFrame, x: str, y: str, order: list[Any], labels: list[str] | None = None
) -> None:
    methods = sorted(table["method"].unique())
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        vals = table[table["method"] == method].set_index(x)[y].reindex(order).fillna(0)
        ax.bar(np.arange(len(order)) + (i - (len(methods) - 1) / 2) * width, vals, width, label=method)
    labels = labels or [str(o) for o in order]
    slanted = x == "layer" or max(map(len, labels)) > 3
    ax.set_xticks(np.arange(len(order)), labels, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.legend(fontsize=8)


def plot_class_histogram(hist: pd.DataFrame, path: Path) -> Path:
    over = "rounds" if "seeds" not in hist or (hist["seeds"] == 1).all() else "rounds and seeds"
    fig, panels = _panels(hist, f"Queried samples per class (summed over {over})")
    for (d, s), ax, sub in panels:
        order = sorted(sub["cls"].unique())
        _grouped_bars(ax, sub, "cls", "count", order, [class_label(d, int(c)) for c in order])
        ax.set(title=f"{d} / {s}", xlabel="class", ylabel="queried samples")
    return _save(fig, path)


def plot_mask_profile(profile: pd.DataFrame, path: Path) -> Path:
    fig, panels = _panels(profile, "FisherMask: fraction of each layer's weights kept in the mask")
    for (d, s), ax, sub in panels:
        layers = sub.drop_duplicates("layer").sort_values("order")["layer"].tolist()
        _grouped_bars(ax, sub, "layer", "fraction", layers)
        ax.set_yscale("symlog", linthresh=1e-4)  # kept fractions span 1e-4..1; zeros must still show
        ax.set(title=f"{d} / {s}", ylabel="fraction kept", ylim=(0, 1.05))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The report.


def _stopping_markdown(stops: pd.DataFrame) -> list[str]:
    """The stopping section: per method, each criterion's round (fired/seeds) and accuracy given up."""
    if stops.empty or not stops["fired"].any():
        return []
    shown = [c for c in CRITERIA if stops.loc[stops["criterion"] == c, "fired"].any()]
    never = [c for c in CRITERIA if c not in shown]
    head = ["dataset", "setting", "method", *shown]
    lines = ["## Stopping criteria", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, g in stops.groupby([*PANEL, "method"], sort=True):
        by = g.set_index("criterion")
        cells = []
        for c in shown:
            r = by.loc[c]
            cells.append(
                "never"
                if r["fired"] == 0
                else f"round {r['round']:.1f} ({r['fired']}/{r['seeds']}), gives up {r['given_up']:+.4f}"
                + ("" if r["fired"] == 1 else f" ± {r['given_up_std']:.4f}")
            )
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return [
        *lines,
        "",
        "Each criterion is evaluated on the stop set after every round (fm_ray.core.stopping). A cell gives "
        "the mean round where it first held over the seeds where it did (fired/seeds), and the accuracy "
        "given up by stopping there: the run's final accuracy minus its accuracy at that round."
        + (f" Never held in any run: {', '.join(never)}." if never else ""),
        "",
    ]


def _markdown(table: pd.DataFrame, figures: list[str], source: str, stops: pd.DataFrame | None = None) -> str:
    one_seed = bool((table["seeds"] == 1).all())

    def pm(m: float, s: float) -> str:
        return f"{m:.4f}" if one_seed else f"{m:.4f} ± {s:.4f}"

    def sec(v: float) -> str:
        return "-" if pd.isna(v) else f"{v:.2f}"

    head = ["dataset", "setting", "method", "seeds", "rounds", "final n_labeled", "final accuracy", "AULC",
            "mean rank", *(f"{p} s/round" for p in PHASES)]  # fmt: skip
    lines = [f"# fm-ray report: {source}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        cells = [r["dataset"], r["setting"], r["method"], str(r["seeds"]), str(r["rounds"]),
                 f"{r['final_n_labeled']:.0f}", pm(r["final_accuracy"], r["final_accuracy_std"]),
                 pm(r["aulc"], r["aulc_std"]), f"{r['mean_rank']:.2f}", *(sec(r[f"{p}_s"]) for p in PHASES)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "AULC: trapezoid of accuracy over labeled samples, divided by the labeled-sample span. Mean rank: "
        "methods ranked by accuracy (1 = best) per dataset, setting, seed and round, then averaged. "
        + ("One seed: no spread over seeds to show. " if one_seed else "± is the std over seeds (ddof=0). ")
        + "Query-phase seconds average the rounds that queried.",
        "",
        *_stopping_markdown(stops if stops is not None else pd.DataFrame()),
        *(f"![{f}]({f})" for f in figures),
        "",
    ]
    return "\n".join(lines)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write PNGs, summary.md, summary.csv and stopping.csv for a run or sweep directory; returns the
    output dir."""
    rounds = load_rounds(path)
    if rounds.empty:
        raise UserError(f"{path} has no finished rounds yet: run or resume it first")
    rounds = with_methods(rounds, load_configs(path))
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(rounds)
    table.to_csv(out / "summary.csv", index=False)
    figures = [plot_learning_curves(rounds, out / "learning_curves.png").name]
    hist = class_histogram(rounds)
    if not hist.empty:
        figures.append(plot_class_histogram(hist, out / "class_histogram.png").name)
    profile = mask_profile(rounds)
    if not profile.empty:
        figures.append(plot_mask_profile(profile, out / "mask_profile.png").name)
    stops = stopping(rounds)
    stops.to_csv(out / "stopping.csv", index=False)
    (out / "summary.md").write_text(_markdown(table, figures, str(path), stops))
    return out
