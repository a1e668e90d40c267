"""`fm-ray` command line: flags -> one RunConfig -> the same recipe a Tune trial runs."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fm_ray._internal import boundary, watch
from fm_ray._internal.log import cli_level, configure_cli_logging
from fm_ray.config import to_dict
from fm_ray.config.flags import RUN_EXAMPLES, HelpFormatter, add_run_flags, config_from_args, epilog
from fm_ray.errors import UserError
from fm_ray.sweep.grid import SWEEP_EXAMPLES, add_sweep_flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_output_flags(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v / -q, before or after the command: fm_ray's lines at DEBUG / warnings only (default INFO)."""
    default = 0 if top else argparse.SUPPRESS  # a command's own default would reset `fm-ray -q run`
    p.add_argument("-v", "--verbose", action="count", default=default, help="more progress lines (debug)")
    p.add_argument("-q", "--quiet", action="count", default=default, help="warnings and errors only (-qq: errors only)")


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
    init.set_defaults(func=_project_init)
    nxt = psub.add_parser("next", help="train on every label so far, pick the next batch to label")
    nxt.add_argument("dir")
    nxt.add_argument("--k", type=int, required=True, help="samples in the batch")
    nxt.add_argument(
        "--image-url",
        help="tasks.json image URL = this prefix + id (default: Label Studio's /data/local-files/?d=<path>)",
    )
    nxt.set_defaults(func=_project_next)
    imp = psub.add_parser("import", help="add labels: a CSV with id,label or a Label Studio JSON export")
    imp.add_argument("dir")
    imp.add_argument("file")
    imp.set_defaults(func=_project_import)
    status = psub.add_parser("status", help="labels in all and per class, batches, hold-out accuracy")
    status.add_argument("dir")
    status.set_defaults(func=_project_status)
    add_mlflow_flags(nxt)
    for p in (init, nxt, imp, status):
        add_output_flags(p)


def _project_init(args: argparse.Namespace) -> int:
    from fm_ray.data.labels import clean_text
    from fm_ray.project.project import Project

    if args.dataset is not None:
        raise UserError("fm-ray project init takes the pool as --pool, not --dataset: drop --dataset")
    args.dataset = args.pool
    classes = [clean_text(c.strip(), "--classes", "class name") for c in args.classes.split(",") if c.strip()]
    Project(args.dir).init(config_from_args(args), classes, args.holdout)
    return 0


def _project_next(args: argparse.Namespace) -> int:
    from fm_ray.project.project import Project

    project = Project(args.dir)
    batch = project.next(args.k, args.image_url)
    if args.mlflow:
        from fm_ray.sweep.tracking import log_project_batch

        log_project_batch(args.mlflow, project, batch, args.mlflow_experiment)
    return 0


def _project_import(args: argparse.Namespace) -> int:
    from fm_ray.project.project import Project

    project = Project(args.dir)
    n = project.import_labels(args.file)
    print(f"{n} new label(s) from {args.file}; {len(project.labels())} in all")
    return 0


def _project_status(args: argparse.Namespace) -> int:
    from fm_ray.project.project import Project

    st = Project(args.dir).status()
    print(f"labels: {st['labels']} ({st['pending']} sent out and not labeled yet); batches: {st['batches']}")
    print("per class: " + ", ".join(f"{c} {n}" for c, n in st["per_class"].items()))
    if st["holdout_accuracy"] is not None:
        print(f"hold-out accuracy: {st['holdout_accuracy']:.4f} on {st['holdout_labels']} held-out labels")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fm-ray", description="Scale-out FisherMask active learning on Ray.")
    add_output_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="one active-learning experiment",
        description="Run one active-learning experiment; results go to --out as Parquet, per round.",
        epilog=epilog(RUN_EXAMPLES),
        formatter_class=HelpFormatter,
    )
    add_run_flags(run)
    g = run.add_argument_group("output")
    g.add_argument("--out", required=True, help="run directory (rounds.parquet, queries.parquet, config.json)")
    g.add_argument("--resume", action="store_true", help="continue a run in --out after its last finished round")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_mlflow_flags(run)
    add_run_flags(run, run_only=True)  # driver placement
    add_output_flags(run)
    run.set_defaults(func=_run)
    sub.add_parser("strategies", help="list the query strategies").set_defaults(func=_strategies)
    sweep = sub.add_parser(
        "sweep",
        help="a grid of runs as Ray Tune trials",
        description="Run a grid of active-learning runs as Ray Tune trials; resumable; one Parquet dataset in --out. "
        "--preset also takes a sweep preset (see fm_ray.sweep.grid.SWEEP_PRESETS, e.g. cpu-paper-fmnist-s2).",
        epilog=epilog(SWEEP_EXAMPLES),
        formatter_class=HelpFormatter,
    )
    add_run_flags(sweep)
    add_sweep_flags(sweep)
    add_mlflow_flags(sweep)
    sweep.set_defaults(func=_sweep)
    add_output_flags(sweep)
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
    pack.add_argument(
        "--channels",
        type=int,
        help="1 (grey) or 3 (RGB) for image files (default: grey when every image is grey, else RGB, as fm-ray run)",
    )
    pack.add_argument("--data-dir", help="root of the built-in datasets (else $FM_RAY_DATA, else the cache)")
    pack.add_argument("--rows-per-file", type=int, default=8192, help="rows per Parquet file (default 8192)")
    pack.set_defaults(func=_pack)
    add_output_flags(pack)
    report = sub.add_parser("report", help="figures and tables from a run or sweep directory")
    report.add_argument("path", help="a run directory (rounds.parquet) or a sweep directory (results/)")
    report.add_argument("--out", help="where to write the PNGs and summary.md/.csv (default <path>/report)")
    report.set_defaults(func=_report)
    add_output_flags(report)
    return parser


# ---------------------------------------------------------------------------------------------
# The commands: one function each, `args` -> exit status (errors are UserErrors, handled in main).


def _strategies(args: argparse.Namespace) -> int:
    from fm_ray.strategies import STRATEGIES

    for name, s in STRATEGIES.items():
        print(f"{name:18s} {s.doc}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fm_ray.run.recipe import run_experiment

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other: pass one")
    cfg = config_from_args(args)
    if cfg.dry_run:
        from fm_ray.run.plan import dry_run

        print(dry_run(cfg))
        return 0
    tracker = None
    if args.mlflow:
        from fm_ray.run.rundir import RunDir, run_id
        from fm_ray.sweep.tracking import RunTracker

        rid = (RunDir(args.out).stored_run_id() if args.resume else None) or run_id(cfg)  # a resume keeps its id
        tracker = RunTracker(args.mlflow, args.out, rid, to_dict(cfg), args.mlflow_experiment, fresh=args.overwrite)
    on_round = tracker.on_round if tracker is not None else None
    if cfg.pool.driver_cpus is not None or cfg.pool.driver_gpus is not None:
        from fm_ray.run.remote import run_remote

        run_remote(cfg, args.out, resume=args.resume, overwrite=args.overwrite, on_round=on_round)
    else:
        run_experiment(cfg, args.out, resume=args.resume, overwrite=args.overwrite, on_round=on_round)
    if tracker is not None:
        tracker.finish()
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fm_ray.sweep.grid import sweep_from_args
    from fm_ray.sweep.tune import run_sweep

    configs, opts = sweep_from_args(args)
    # Ctrl+C is the command's: Tune's own handler would end fit() "gracefully" (exit 0, trials unfinished)
    # with its Tuner.restore hint; as a KeyboardInterrupt it reaches the boundary: exit 130 and the
    # `fm-ray sweep --resume` line (every finished round is in --out already, see the killed-sweep test).
    # Only for the command: a Python caller of run_sweep keeps Tune's graceful stop and can resume in-process.
    callbacks = []
    if args.mlflow:
        from fm_ray.sweep.tracking import tune_callback

        callbacks.append(tune_callback(args.mlflow, args.mlflow_experiment))
    before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        results = run_sweep(configs, opts, callbacks=callbacks, ray_address=args.ray_address)
    finally:
        if before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
    if args.mlflow and "://" not in str(opts.out):  # the report reads local folders
        from fm_ray.sweep.tracking import log_sweep_report

        log_sweep_report(args.mlflow, str(opts.out), args.mlflow_experiment)
    return 1 if any(r.error is not None for r in results) else 0


def _pack(args: argparse.Namespace) -> int:
    from fm_ray._internal.files import check_folder_target
    from fm_ray.data.pack import pack, parse_resize

    if "://" not in args.out:  # a URI's store answers for itself
        check_folder_target(Path(args.out), "OUT")
    pack(
        args.source,
        args.out,
        resize=parse_resize(args.resize),
        skip_bad=args.skip_bad_images,
        channels=args.channels,
        data_dir=args.data_dir,
        rows_per_file=args.rows_per_file,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from fm_ray.sweep.report import write_report

    print(write_report(args.path, args.out))
    return 0


def _how_to_go_on(args: argparse.Namespace | None) -> str:
    """After an interruption or an abrupt end: what is kept and how to go on, per command."""
    command = getattr(args, "command", None)
    if command == "run":
        return "finished rounds are saved, continue with --resume"
    if command == "sweep":
        return f"finished trials and rounds are saved, continue with `fm-ray sweep --out {args.out} --resume`"  # type: ignore[union-attr]
    if command == "pack":
        return "run the same command again to continue the pack"
    return "nothing half-written is kept: run the command again"


def _interrupted(args: argparse.Namespace | None) -> str:
    """The line after Ctrl+C or SIGTERM."""
    return f"interrupted; {_how_to_go_on(args)}"


def _log_dir(args: argparse.Namespace | None) -> Path | None:
    """The folder of the run, sweep or project at hand (if it exists here): an internal error's log goes there."""
    if getattr(args, "command", None) == "pack":
        return None  # its OUT may be half-packed: the log goes to the cache
    folder = getattr(args, "dir", None) or getattr(args, "out", None)
    if not folder or "://" in str(folder) or not Path(folder).is_dir():
        return None
    return Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """`fm-ray ...` -> an exit status; every failure ends in the one boundary (`_internal.boundary`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    with boundary.sigterm_raises():
        try:
            args = build_parser().parse_args(argv)
            watch.say("next", _how_to_go_on(args))  # for the watcher's line, should this process die abruptly
            configure_cli_logging(cli_level(getattr(args, "verbose", 0), getattr(args, "quiet", 0)))
            return int(args.func(args))
        except (Exception, KeyboardInterrupt, SystemExit) as e:
            if boundary.debug() or (isinstance(e, SystemExit) and not boundary.terminated(e)):
                raise  # --help's exit 0
            if boundary.stdout_gone(e):
                return boundary.EXIT_PIPE  # the reader has what it wanted: nothing to say
            out = boundary.outcome(e, argv, _log_dir(args), _interrupted(args))
            if out.log is not None and getattr(args, "verbose", None):
                traceback.print_exception(e, file=sys.stderr)
            print(f"fm-ray: {out.line}", file=sys.stderr)
            return out.code


if __name__ == "__main__":
    watch.child(main)
