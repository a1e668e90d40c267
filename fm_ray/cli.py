"""`fm-ray` command line: flags -> one RunConfig -> the same recipe a Tune trial runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
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
    to_dict,
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
    g.add_argument(
        "--dataset",
        help=f"fashion_mnist | cifar10 | imagefolder:<path> | parquet:<path or URI> (a pool from `fm-ray pack`; "
        f"default {d.dataset})",
    )
    g.add_argument("--setting", help=f"setting1 | setting2 | balanced (default {d.setting}; paper section 5)")
    g.add_argument("--class-counts", help="per-class pool sizes, e.g. 0:250,1:5000 (overrides --setting)")
    g.add_argument("--data-dir", help="dataset root (else $FM_RAY_DATA, else ~/.cache/fm_ray/data)")
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="drop images that cannot be decoded and list them in <out>/skipped_images.csv (default: fail)",
    )
    g.add_argument("--preset", help=f"paper regime: {', '.join(PRESETS)} (sets setting, init, batch, budget)")
    g = p.add_argument_group("active learning")
    g.add_argument("--strategy", help=f"query strategy (default {s.name}); see `fm-ray strategies`")
    g.add_argument("--init", type=int, help=f"initial labeled samples, seeded random (default {top.init})")
    g.add_argument("--batch", type=int, help=f"samples queried per round (default {top.batch})")
    g.add_argument("--rounds", type=int, help="query rounds (default: until --budget or the pool is used up)")
    g.add_argument("--budget", type=int, help="most labeled samples in all (default: no cap)")
    g.add_argument("--seed", type=int, help="seeds everything: pool, initial set, weights, training (default 0)")
    g = p.add_argument_group("model and training")
    g.add_argument(
        "--model", help=f"cnn | mlp | resnet18 | torchvision:<name>, e.g. torchvision:resnet34 (default {m.name})"
    )
    g.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resnet18 / torchvision:<name> with torchvision's ImageNet weights (read from the torch cache)",
    )
    g.add_argument("--checkpoint", help="state dict (torch.save) to load into the model before training each round")
    g.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train only the final layer (Fisher and selection still use every weight)",
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
            "dataset": _absolute_pool(a.dataset),
            "setting": a.setting if a.setting is not None else preset.get("setting"),
            "class_counts": parse_class_counts(a.class_counts) if a.class_counts else None,
            "data_dir": a.data_dir,
            "skip_bad_images": a.skip_bad_images,
        },
    )
    if a.class_counts and a.setting is None:
        data = _replace(data, {"setting": "custom"})
    return RunConfig(
        data=data,
        model=_replace(
            ModelConfig(),
            {
                "name": a.model,
                "pretrained": a.pretrained,
                # absolute: a Tune trial runs in its own working directory
                "checkpoint": str(Path(a.checkpoint).expanduser().absolute()) if a.checkpoint else None,
            },
        ),
        train=_replace(
            TrainConfig(),
            {
                "epochs": a.epochs,
                "lr": a.lr,
                "batch_size": a.train_batch_size,
                "target_train_acc": a.target_train_acc,
                "warm_start": a.warm_start,
                "device": a.device,
                "freeze_backbone": a.freeze_backbone,
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
                "driver_cpus": getattr(a, "driver_cpus", None),  # `run` only
                "driver_gpus": getattr(a, "driver_gpus", None),
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


def _absolute_pool(dataset: str | None) -> str | None:
    """parquet:<relative path> -> an absolute path, so Tune trials (run in other folders) find it."""
    if dataset is None or not dataset.startswith("parquet:") or "://" in dataset:
        return dataset
    import os

    return "parquet:" + os.path.abspath(os.path.expanduser(dataset.split(":", 1)[1]))


def _replace(obj: Any, values: dict[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **{k: v for k, v in values.items() if v is not None})


def add_mlflow_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument(
        "--mlflow",
        metavar="URI",
        help="also log config, per-round metrics and the report PNGs to MLflow: a folder (file store), "
        "file:///..., http://server:5000, ... (needs fm_ray[mlflow])",
    )
    g.add_argument("--mlflow-experiment", default="fm_ray", help="MLflow experiment name (default fm_ray)")


def add_project_parser(sub: Any) -> None:
    project = sub.add_parser(
        "project",
        help="a labeling project: fm_ray picks, people label (CSV or Label Studio), repeat",
        description="Active learning with labels from people. One directory holds the project.",
    )
    psub = project.add_subparsers(dest="project_command", required=True, parser_class=_Parser)
    init = psub.add_parser("init", help="create a project on a pool of images")
    init.add_argument("dir", help="the project directory (created)")
    init.add_argument(
        "--pool",
        required=True,
        help="folder:<path> (unlabeled images, recursive), parquet:<pool>, fashion_mnist, cifar10, imagefolder:<path>",
    )
    init.add_argument("--classes", required=True, help="class names in model-output order, e.g. cat,dog,bird")
    init.add_argument(
        "--holdout", type=float, default=0.0, help="fraction of labels kept out of training to measure accuracy"
    )
    add_run_flags(init)
    nxt = psub.add_parser("next", help="train on every label so far, pick the next batch to label")
    nxt.add_argument("dir")
    nxt.add_argument("--k", type=int, required=True, help="samples in the batch")
    nxt.add_argument(
        "--image-url",
        help="tasks.json image URL = this prefix + id (default: Label Studio's /data/local-files/?d=<path>)",
    )
    imp = psub.add_parser("import", help="add labels: a CSV with id,label or a Label Studio JSON export")
    imp.add_argument("dir")
    imp.add_argument("file")
    status = psub.add_parser("status", help="labels in all and per class, batches, hold-out accuracy")
    status.add_argument("dir")
    add_mlflow_flags(nxt)


def project_main(args: argparse.Namespace) -> int:
    from fm_ray.project import Project

    project = Project(args.dir)
    if args.project_command == "init":
        if args.dataset is not None:
            raise UserError("fm-ray project init takes the pool as --pool, not --dataset: drop --dataset")
        args.dataset = args.pool
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        project.init(config_from_args(args), classes, args.holdout)
    elif args.project_command == "next":
        batch = project.next(args.k, args.image_url)
        if args.mlflow:
            from fm_ray.tracking import log_project_batch

            log_project_batch(args.mlflow, project, batch, args.mlflow_experiment)
    elif args.project_command == "import":
        n = project.import_labels(args.file)
        print(f"{n} new label(s) from {args.file}; {len(project.labels())} in all")
    else:
        st = project.status()
        print(f"labels: {st['labels']} ({st['pending']} sent out and not labeled yet); batches: {st['batches']}")
        print("per class: " + ", ".join(f"{c} {n}" for c, n in st["per_class"].items()))
        if st["holdout_accuracy"] is not None:
            print(f"hold-out accuracy: {st['holdout_accuracy']:.4f} on {st['holdout_labels']} held-out labels")
    return 0


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
    add_mlflow_flags(run)
    g = run.add_argument_group("driver placement (results do not change)")
    g.add_argument(
        "--driver-gpus",
        type=float,
        help="run the recipe (training, evaluation, the d x d reduce) in a Ray actor holding this many GPUs, "
        "e.g. under `ray job submit` on a head node without GPUs; progress and --out stay here",
    )
    g.add_argument("--driver-cpus", type=float, help="CPUs (torch threads) of that actor (default 1)")
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
    add_mlflow_flags(sweep)
    add_project_parser(sub)
    pack = sub.add_parser(
        "pack",
        help="convert a dataset into a Parquet pool for --dataset parquet:OUT",
        description="Convert a dataset into a packed Parquet pool (resumable: re-run the same command after an "
        "interruption; the same source gives the same bytes). Then run with --dataset parquet:OUT.",
    )
    pack.add_argument(
        "source", help="fashion_mnist | cifar10 | imagefolder:<path> | folder:<path> (unlabeled) | csv:<file>"
    )
    pack.add_argument("out", help="pool folder or URI (s3://..., gs://..., file://...)")
    pack.add_argument("--resize", help="N or HxW: resize every image (needed when the images differ in size)")
    pack.add_argument(
        "--skip-bad-images", action="store_true", help="drop undecodable images, listed in OUT/skipped_images.csv"
    )
    pack.add_argument("--channels", type=int, default=3, help="1 (grey) or 3 (RGB) for image files (default 3)")
    pack.add_argument("--data-dir", help="root of the built-in datasets (else $FM_RAY_DATA, else the cache)")
    pack.add_argument("--rows-per-file", type=int, default=8192, help="rows per Parquet file (default 8192)")
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
            cfg = config_from_args(args)
            tracker = None
            if args.mlflow:
                from fm_ray.results import run_id
                from fm_ray.tracking import RunTracker

                tracker = RunTracker(
                    args.mlflow, args.out, run_id(cfg), to_dict(cfg), args.mlflow_experiment, fresh=args.overwrite
                )
            on_round = tracker.on_round if tracker is not None else None
            if cfg.pool.driver_cpus is not None or cfg.pool.driver_gpus is not None:
                from fm_ray.remote import run_remote

                run_remote(cfg, args.out, resume=args.resume, overwrite=args.overwrite, on_round=on_round)
            else:
                run_experiment(cfg, args.out, resume=args.resume, overwrite=args.overwrite, on_round=on_round)
            if tracker is not None:
                tracker.finish()
        if args.command == "sweep":
            from fm_ray.grid import sweep_from_args
            from fm_ray.sweep import run_sweep

            configs, opts = sweep_from_args(args)
            callbacks = []
            if args.mlflow:
                from fm_ray.tracking import tune_callback

                callbacks.append(tune_callback(args.mlflow, args.mlflow_experiment))
            results = run_sweep(configs, opts, callbacks=callbacks, ray_address=args.ray_address)
            if args.mlflow and "://" not in str(opts.out):  # the report reads local folders
                from fm_ray.tracking import log_sweep_report

                log_sweep_report(args.mlflow, str(opts.out), args.mlflow_experiment)
            return 1 if any(r.error is not None for r in results) else 0
        if args.command == "project":
            return project_main(args)
        if args.command == "pack":
            from fm_ray.pack import pack, parse_resize

            pack(
                args.source,
                args.out,
                resize=parse_resize(args.resize),
                skip_bad=args.skip_bad_images,
                channels=args.channels,
                data_dir=args.data_dir,
                rows_per_file=args.rows_per_file,
            )
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
