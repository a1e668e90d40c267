"""The sweep grid: paper presets, spec files and list flags -> one `RunConfig` per trial.

`fm-ray sweep` accepts every `fm-ray run` flag plus list-valued axes (`--strategies a,b --seeds 0,1`),
a YAML/JSON spec (`base`, `grid`, `sweep` sections) and sweep presets. Spec values, flags and axis
values all name run flags of `fm_ray.flags.RUN_FLAGS`, and each grid point goes through
`flags.config_from_values`, so a trial means exactly what the same `fm-ray run` flags mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm_ray.config import PRESETS, RunConfig
from fm_ray.config.flags import BY_DEST, config_from_values, parse_values, values_from_args
from fm_ray.errors import UserError
from fm_ray.run.rundir import run_id

# Grid axes: list flag -> the run flag (fm_ray.flags.RUN_FLAGS) it sweeps; values parse as that flag's.
GRID_AXES: dict[str, str] = {
    "strategies": "strategy",
    "seeds": "seed",
    "datasets": "dataset",
    "settings": "setting",
    "presets": "preset",
    "sparsities": "sparsity",
    "lams": "lam",
    "batches": "batch",
    "models": "model",
}
SWEEP_KEYS = ("max_concurrent", "cpus_per_trial", "gpus_per_trial")
# One right example per axis, for --help and error messages (tests/test_cli.py parses each one).
AXIS_EXAMPLES: dict[str, str] = {
    "strategies": "random,entropy,fishermask",
    "seeds": "0,1,2",
    "datasets": "fashion_mnist,cifar10",
    "settings": "setting1,setting2",
    "presets": "s1-low,s2",
    "sparsities": "0.002,0.01",
    "lams": "0.1,1,10",
    "batches": "50,100",
    "models": "cnn,resnet18",
}
# `fm-ray sweep --help` examples: (what it does, argv after `fm-ray`); tests/test_cli.py parses each.
SWEEP_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "three strategies x three seeds in the paper's setting-2 regime, 5 epochs a round",
        "sweep --out sweeps/a --strategies random,entropy,fishermask --seeds 0,1,2 --preset s2 --epochs 5",
    ),
    ("the CPU-sized paper grid (about 20 minutes on 2 cores)", "sweep --out sweeps/c --preset cpu-paper-fmnist-s2"),
    (
        "FisherMask's lambda and mask sparsity, 3 rounds each",
        "sweep --out sweeps/l --lams 0.1,1,10 --sparsities 0.002,0.01 --rounds 3",
    ),
    ("continue after Ctrl+C, a crash or failed trials", "sweep --out sweeps/a --resume"),
    ("figures and tables of the sweep", "report sweeps/a"),
)


# ---------------------------------------------------------------------------------------------
# Presets: the paper's grid (FisherMask arXiv 2411.05752, section 5) and CPU-sized variants.

PAPER_STRATEGIES = ["random", "entropy", "margin", "bait", "kcenter", "badge", "fishermask"]
# What a `cpu-` variant changes: the small CNN and short rounds of 100, all seven strategies and
# three seeds. Sized for a 2-core machine in about 20 minutes (measured: see the README). Tune here.
CPU_BASE = {
    "model": "cnn",
    "epochs": 15,
    "init": 100,
    "batch": 100,
    "rounds": 6,
    "fisher_samples": 512,
    "device": "cpu",
    "backend": "local",  # trials run side by side; each one's pool stays in-process
}
CPU_GRID = {"strategies": PAPER_STRATEGIES, "seeds": [0, 1, 2]}


def _paper(dataset: str, regime: str) -> dict[str, Any]:
    return {
        "base": {"dataset": dataset, "model": "resnet18", "preset": regime},
        "grid": {"strategies": PAPER_STRATEGIES, "seeds": [0, 1, 2]},
    }


def _cpu(spec: dict[str, Any]) -> dict[str, Any]:
    # budget None: the CPU variant stops after CPU_BASE's rounds, the regime only names the setting
    return {"base": {**spec["base"], **CPU_BASE}, "grid": {**spec["grid"], **CPU_GRID}}


# The baselines users compare against (Baal, small-text, scikit-activeml, dal-toolbox, LabelBench):
# the paper's seven plus the Bayesian, cold-start and imbalance-aware strategies.
BASELINE_STRATEGIES = [*PAPER_STRATEGIES, "least_confidence", "bald", "batchbald", "typiclust", "probcover", "galaxy"]

SWEEP_PRESETS: dict[str, dict[str, Any]] = {}
for _ds, _short in (("cifar10", "cifar10"), ("fashion_mnist", "fmnist")):
    for _regime in PRESETS:
        SWEEP_PRESETS[f"paper-{_short}-{_regime}"] = _paper(_ds, _regime)
        SWEEP_PRESETS[f"cpu-paper-{_short}-{_regime}"] = _cpu(_paper(_ds, _regime))
    # every strategy in both imbalanced settings, CPU-sized: the README's baselines grid
    SWEEP_PRESETS[f"cpu-baselines-{_short}"] = {
        # BatchBALD's joint from 500 sampled labelings once exact enumeration exceeds them (Baal's
        # default num_draw): 10,000 made one of its rounds take tens of minutes on 2 cores; the
        # option is BatchBALD's own, so the other trials keep their ids
        "base": {"dataset": _ds, **CPU_BASE, "batchbald_samples": 500},
        "grid": {"strategies": BASELINE_STRATEGIES, "seeds": [0, 1, 2], "settings": ["setting1", "setting2"]},
    }


# ---------------------------------------------------------------------------------------------
# Building the grid: spec file / preset / flags -> list of RunConfig.


def parse_list(text: str, typ: type, flag: str) -> list[Any]:
    """'0,1,2' -> [0, 1, 2]; a bad or empty list is a UserError naming the flag (a grid axis)."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        values = [typ(s) for s in items]
    except ValueError:
        raise UserError(
            f"--{flag} {text!r} is not a comma-separated list of {typ.__name__}s: e.g. --{flag} {_example(flag)}"
        ) from None
    if not values:
        raise UserError(f"--{flag} is empty: give a comma-separated list, e.g. --{flag} {_example(flag)}")
    return values


def _example(axis: str) -> str:
    return AXIS_EXAMPLES.get(axis, "0,1,2")


def load_spec(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON sweep spec: {base: {<run flag>: value}, grid: {<axis>: [values]}, sweep: {...}}."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    except UnicodeDecodeError:
        raise UserError(f"--spec {path}: cannot read it (not UTF-8 text): save it as UTF-8 YAML or JSON") from None
    except (OSError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--spec {path}: cannot read it ({first}): give a readable YAML or JSON file") from None
    if not isinstance(spec, dict) or not set(spec) <= {"base", "grid", "sweep"}:
        raise UserError(f"--spec {path}: expected a mapping with keys base, grid and/or sweep")
    for key in spec:
        if not isinstance(spec[key] or {}, dict):
            raise UserError(f"--spec {path}: `{key}` must be a mapping, e.g. {key}: {{...}}")
    return {k: dict(v or {}) for k, v in spec.items()}


def axis_type(axis: str) -> type:
    """str, int or float: the parser of the run flag the axis sweeps."""
    parse = BY_DEST[GRID_AXES[axis]].parse
    assert isinstance(parse, type), f"grid axis {axis} sweeps a flag without a plain type"
    return parse


def _grid_values(axis: str, values: Any) -> list[Any]:
    if axis not in GRID_AXES:
        raise UserError(f"unknown grid axis {axis!r}: choose from {', '.join(GRID_AXES)}")
    typ = axis_type(axis)
    if isinstance(values, str | int | float):
        return parse_list(str(values), typ, axis)
    if not isinstance(values, list) or not values:
        raise UserError(f"grid axis {axis}: give a non-empty list, e.g. {axis}: [{_example(axis)}]")
    return parse_list(",".join(str(v) for v in values), typ, axis)


def expand(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[RunConfig]:
    """The cross product of the grid over base run-flag values ({dest: value}); duplicates dropped.

    Each point goes through `flags.config_from_values`, so precedence matches `fm-ray run`: explicit
    flags (and the settings axis) win over a regime preset's setting/init/batch/budget.
    """
    from fm_ray.run.validate import check

    axes = [a for a in GRID_AXES if a in grid]
    configs: dict[str, RunConfig] = {}
    for point in itertools.product(*(grid[a] for a in axes)):
        values = {**base, **{GRID_AXES[axis]: value for axis, value in zip(axes, point, strict=True)}}
        cfg = _absolute_data_dir(config_from_values(values))
        check(cfg)
        configs.setdefault(run_id(cfg), cfg)
    return list(configs.values())


def _absolute_data_dir(cfg: RunConfig) -> RunConfig:
    # Tune runs trials in their own working directory: a relative --data-dir must not move.
    if cfg.data.data_dir is None or "://" in cfg.data.data_dir:
        return cfg
    data = dataclasses.replace(cfg.data, data_dir=str(Path(cfg.data.data_dir).resolve()))
    return dataclasses.replace(cfg, data=data)


def sweep_from_args(args: argparse.Namespace) -> tuple[list[RunConfig], SweepOptions]:
    """`fm-ray sweep` flags -> (configs, options). Precedence: sweep preset < --spec file < flags."""
    spec: dict[str, Any] = {"base": {}, "grid": {}, "sweep": {}}
    explicit = {k: v for k, v in values_from_args(args).items() if v is not None}
    preset = args.preset
    if preset is not None and preset not in PRESETS:
        if preset not in SWEEP_PRESETS:
            raise UserError(
                f"unknown preset {preset!r}: choose a sweep preset ({', '.join(SWEEP_PRESETS)}) "
                f"or a regime ({', '.join(PRESETS)})"
            )
        spec = _merge(spec, SWEEP_PRESETS[preset])
        del explicit["preset"]  # a sweep preset is no regime: it is a spec, merged above
    if args.spec is not None:
        spec = _merge(spec, load_spec(args.spec))
    base = {**parse_values(spec["base"], "spec base"), **explicit}
    grid = {axis: _grid_values(axis, values) for axis, values in spec["grid"].items()}
    for axis in GRID_AXES:
        if getattr(args, axis, None) is not None:
            grid[axis] = _grid_values(axis, getattr(args, axis))
    sweep = {**spec["sweep"], **{k: getattr(args, k) for k in SWEEP_KEYS if getattr(args, k, None) is not None}}
    unknown = set(sweep) - set(SWEEP_KEYS)
    if unknown:
        raise UserError(f"unknown sweep option(s) {', '.join(sorted(unknown))}: use {', '.join(SWEEP_KEYS)}")
    opts = SweepOptions(out=args.out, resume=args.resume, **sweep)
    given = preset is not None or args.spec is not None or grid or bool(base)
    if args.resume and not given:
        return [], opts  # --resume alone: the stored grid
    return expand(base, grid), opts


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: {**a.get(k, {}), **b.get(k, {})} for k in ("base", "grid", "sweep")}


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """The grid and Tune flags of `fm-ray sweep` (every `fm-ray run` flag comes from flags.add_run_flags)."""
    g = p.add_argument_group("grid (comma-separated lists; each replaces the single-value run flag)")
    for axis, dest in GRID_AXES.items():
        g.add_argument(f"--{axis}", metavar="LIST", help=f"values of {BY_DEST[dest].flag}, e.g. {_example(axis)}")
    g.add_argument(
        "--spec", help="YAML/JSON file: {base: {<run flag>: value}, grid: {<axis>: [...]}, sweep: {max_concurrent: 2}}"
    )
    g = p.add_argument_group("Ray Tune")
    g.add_argument(
        "--out",
        required=True,
        help="sweep directory: a local path or an s3:// / gs:// URI (Tune storage_path; needs the cloud "
        "credentials and pyarrow filesystem support on every node)",
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (redoes nothing)")
    g.add_argument("--max-concurrent", type=int, help="most trials running at once (default: as resources allow)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs reserved for each trial's driver (default 1)")
    g.add_argument("--gpus-per-trial", type=float, help="GPUs reserved for each trial's driver (default 0)")


@dataclass(frozen=True)
class SweepOptions:
    out: str
    resume: bool = False
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self) -> None:
        # spec files hand these over as parsed YAML: check the types before comparing anything
        for key, types in (
            ("max_concurrent", (int,)),
            ("cpus_per_trial", (int, float)),
            ("gpus_per_trial", (int, float)),
        ):
            value = getattr(self, key)
            if (value is None and key == "max_concurrent") or (
                isinstance(value, types) and not isinstance(value, bool)
            ):
                continue
            kind = "an integer" if types == (int,) else "a number"
            raise UserError(f"sweep option {key} must be {kind}, got {value!r}: e.g. {key}: 2")
        if not all(map(math.isfinite, (self.cpus_per_trial, self.gpus_per_trial))):
            raise UserError(
                f"--cpus-per-trial / --gpus-per-trial must be finite, got {self.cpus_per_trial}, {self.gpus_per_trial}"
            )
        if "://" not in self.out:
            from fm_ray.run.rundir import RunDir

            RunDir(self.out).check_writable()
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise UserError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise UserError(
                f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {self.cpus_per_trial}, {self.gpus_per_trial}"
            )
