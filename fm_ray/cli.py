"""`fm-ray` command line: flags -> one RunConfig -> the same recipe a Tune trial runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fm_ray.config import (
    PRESETS,
    DataConfig,
    ModelConfig,
    PoolConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    parse_class_counts,
)
from fm_ray.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _fisher_samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fisher-samples must be a count or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--fisher-samples must be positive, got {value}")
    return value


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Every option of one active-learning run (shared by `run` and `sweep`). Defaults live in config.py."""
    d, m, t, s, pl, top = DataConfig(), ModelConfig(), TrainConfig(), StrategyConfig(), PoolConfig(), RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"fashion_mnist | cifar10 | imagefolder:<path> (default {d.dataset})")
    g.add_argument("--setting", help=f"setting1 | setting2 | balanced (default {d.setting}; paper section 5)")
    g.add_argument("--class-counts", help="per-class pool sizes, e.g. 0:250,1:5000 (overrides --setting)")
    g.add_argument("--data-dir", help="dataset root (else $FM_RAY_DATA, else ~/.cache/fm_ray/data)")
    g.add_argument("--preset", help=f"paper regime: {', '.join(PRESETS)} (sets setting, init, batch, budget)")
    g = p.add_argument_group("active learning")
    g.add_argument("--strategy", help=f"query strategy (default {s.name}); see `fm-ray strategies`")
    g.add_argument("--init", type=int, help=f"initial labeled samples, seeded random (default {top.init})")
    g.add_argument("--batch", type=int, help=f"samples queried per round (default {top.batch})")
    g.add_argument("--rounds", type=int, help="query rounds (default: until --budget or the pool is used up)")
    g.add_argument("--budget", type=int, help="most labeled samples in all (default: no cap)")
    g.add_argument("--seed", type=int, help="seeds everything: pool, initial set, weights, training (default 0)")
    g = p.add_argument_group("model and training")
    g.add_argument("--model", help=f"cnn | mlp | resnet18 (default {m.name})")
    g.add_argument(
        "--pretrained", action="store_true", default=None, help="resnet18 with torchvision's ImageNet weights"
    )
    g.add_argument("--epochs", type=int, help=f"most epochs per round (default {t.epochs})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {t.lr})")
    g.add_argument("--train-batch-size", type=int, help=f"training mini-batch (default {t.batch_size})")
    g.add_argument(
        "--target-train-acc",
        type=float,
        help=f"stop an epoch loop at this training accuracy (default {t.target_train_acc})",
    )
    g.add_argument(
        "--warm-start", action="store_true", default=None, help="keep weights across rounds (default: reset)"
    )
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g = p.add_argument_group("FisherMask / BAIT")
    g.add_argument("--sparsity", type=float, help=f"fraction of weights in the Fisher mask (default {s.sparsity})")
    g.add_argument(
        "--fisher-samples", type=_fisher_samples, help="pool samples for the Fisher diagonal, or 'all' (default 1024)"
    )
    g.add_argument("--lam", type=float, help=f"lambda in M_0 = lambda I + ... (default {s.lam})")
    g.add_argument("--backward-steps", type=int, help=f"BAIT backward pruning steps b (default {s.backward_steps})")
    g.add_argument(
        "--labeled-init",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start M from the labeled Fisher (default on)",
    )
    g.add_argument(
        "--include-last-layer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="always keep the final layer in the mask, as the reference code does (default off)",
    )
    g.add_argument("--greedy", choices=("fast", "reference"), help="greedy implementation (default fast)")
    g.add_argument(
        "--fisher-dtype",
        choices=("float32", "float64"),
        help="compute dtype of the Fisher diagonal and embeddings; sums are float64 either way (default float32)",
    )
    g.add_argument(
        "--embed-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the shards store the Fisher embeddings in; bfloat16/float16 halve their memory, the "
        "selection still computes in float32/float64 (default float32: as computed)",
    )
    g = p.add_argument_group("pool backend")
    g.add_argument("--backend", help=f"ray | local (default {pl.backend}; local runs the shards in-process)")
    g.add_argument("--shards", type=int, help=f"pool shards (default {pl.shards})")
    g.add_argument("--cpus-per-shard", type=float, help=f"Ray CPUs per shard actor (default {pl.cpus_per_shard})")
    g.add_argument(
        "--gpus-per-shard",
        type=float,
        help="Ray GPUs per shard actor, fractions allowed (default: the cluster's GPUs shared evenly, at most "
        "1 each, 0 without GPUs; in a sweep, 0 unless given)",
    )
    g.add_argument(
        "--ray-address", help="Ray cluster to join: auto | ray://host:10001 (else $RAY_ADDRESS, else a local instance)"
    )


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Flags -> RunConfig. A preset fills what the flags leave unset."""
    preset: dict[str, Any] = {}
    if a.preset is not None:
        if a.preset not in PRESETS:
            raise UserError(f"unknown preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
        preset = PRESETS[a.preset]

    data = _replace(
        DataConfig(),
        {
            "dataset": a.dataset,
            "setting": a.setting if a.setting is not None else preset.get("setting"),
            "class_counts": parse_class_counts(a.class_counts) if a.class_counts else None,
            "data_dir": a.data_dir,
        },
    )
    if a.class_counts and a.setting is None:
        data = _replace(data, {"setting": "custom"})
    return RunConfig(
        data=data,
        model=_replace(ModelConfig(), {"name": a.model, "pretrained": a.pretrained}),
        train=_replace(
            TrainConfig(),
            {
                "epochs": a.epochs,
                "lr": a.lr,
                "batch_size": a.train_batch_size,
                "target_train_acc": a.target_train_acc,
                "warm_start": a.warm_start,
                "device": a.device,
            },
        ),
        strategy=_replace(
            StrategyConfig(),
            {
                "name": a.strategy,
                "sparsity": a.sparsity,
                "fisher_samples": a.fisher_samples,
                "lam": a.lam,
                "backward_steps": a.backward_steps,
                "labeled_init": a.labeled_init,
                "include_last_layer": a.include_last_layer,
                "greedy": a.greedy,
                "fisher_dtype": a.fisher_dtype,
                "embed_dtype": a.embed_dtype,
            },
        ),
        pool=_replace(
            PoolConfig(),
            {
                "backend": a.backend,
                "shards": a.shards,
                "cpus_per_shard": a.cpus_per_shard,
                "gpus_per_shard": a.gpus_per_shard,
                "ray_address": a.ray_address,
            },
        ),
        **{
            k: v
            for k, v in {
                "init": a.init if a.init is not None else preset.get("init"),
                "batch": a.batch if a.batch is not None else preset.get("batch"),
                "rounds": a.rounds,
                "budget": a.budget if a.budget is not None else preset.get("budget"),
                "seed": a.seed,
                "preset": a.preset,
            }.items()
            if v is not None
        },
    )


def _replace(obj: Any, values: dict[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **{k: v for k, v in values.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fm-ray", description="Scale-out FisherMask active learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="one active-learning experiment",
        description="Run one active-learning experiment; results go to --out as Parquet, per round.",
    )
    add_run_flags(run)
    g = run.add_argument_group("output")
    g.add_argument("--out", required=True, help="run directory (rounds.parquet, queries.parquet, config.json)")
    g.add_argument("--resume", action="store_true", help="continue a run in --out after its last finished round")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    sub.add_parser("strategies", help="list the query strategies")
    sweep = sub.add_parser(
        "sweep",
        help="a grid of runs as Ray Tune trials",
        description="Run a grid of active-learning runs as Ray Tune trials; resumable; one Parquet dataset in --out. "
        "--preset also takes a sweep preset (see fm_ray.grid.SWEEP_PRESETS, e.g. cpu-paper-fmnist-s2).",
    )
    add_run_flags(sweep)
    from fm_ray.grid import add_sweep_flags

    add_sweep_flags(sweep)
    report = sub.add_parser("report", help="figures and tables from a run or sweep directory")
    report.add_argument("path", help="a run directory (rounds.parquet) or a sweep directory (results/)")
    report.add_argument("--out", help="where to write the PNGs and summary.md/.csv (default <path>/report)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "strategies":
            from fm_ray.strategies import STRATEGIES

            for name, s in STRATEGIES.items():
                print(f"{name:18s} {s.doc}")
            return 0
        if args.command == "run":
            from fm_ray.loop import run_experiment

            if args.resume and args.overwrite:
                raise UserError("--resume and --overwrite exclude each other: pass one")
            run_experiment(config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
        if args.command == "sweep":
            from fm_ray.grid import sweep_from_args
            from fm_ray.sweep import run_sweep

            configs, opts = sweep_from_args(args)
            results = run_sweep(configs, opts, ray_address=args.ray_address)
            return 1 if any(r.error is not None for r in results) else 0
        if args.command == "report":
            from fm_ray.report import write_report

            print(write_report(args.path, args.out))
        return 0
    except UserError as e:
        print(f"fm-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fm-ray: interrupted; finished rounds are saved, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
