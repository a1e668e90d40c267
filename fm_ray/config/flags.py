"""One mapping between `fm-ray run` flags and `RunConfig` fields.

The CLI flags, a sweep spec's `base` mapping and the sweep grid axes all go through `RUN_FLAGS`, so a
setting means the same wherever it is given, and adding a config field means adding one row here
(tests/test_flags.py fails until every field has exactly one flag). Values travel as one flat
`{flag dest: value}` dict (None = not given) into `config_from_values`, the only builder of a
`RunConfig` from user input; no argv is ever rebuilt and re-parsed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm_ray.config import (
    BACKENDS,
    PRESETS,
    STOCHASTIC,
    DataConfig,
    ModelConfig,
    PoolConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    parse_class_counts,
)
from fm_ray.errors import UserError

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "pool": PoolConfig,
}
# Config fields with no flag on purpose: tuning knobs of the implementation, not of the method.
INTERNAL_FIELDS = ("strategy.chunk_size",)


def _fisher_samples(text: str) -> int | str:
    if text == "all":
        return "all"  # not None: None means "not given", and would fall back to the default 1024
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fisher-samples must be a count or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--fisher-samples must be positive, got {value}")
    return value


def _rounds(text: str) -> int | str:
    if text == "all":
        return "all"  # not None: None means "not given", and would fall back to the default
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rounds must be a count or 'all', got {text!r}") from None


def _class_counts(text: str) -> tuple[tuple[int, int], ...] | None:
    return parse_class_counts(text) if text else None  # an empty --class-counts means not given


@dataclass(frozen=True)
class Flag:
    """One run flag: the config field it sets ("train.batch_size"; "seed" for a RunConfig field)."""

    field: str
    group: str
    help: str  # "{default}" is replaced by the field's default
    name: str = ""  # without "--"; default: the field's name with dashes
    parse: Callable[[str], Any] = str  # text -> value; int and float give argparse's own messages
    kind: str = "value"  # value | switch (--x only) | toggle (--x and --no-x)
    choices: tuple[str, ...] | None = None
    none_means: str | None = None  # the value standing for the field's None where None is no default
    run_only: bool = False  # `fm-ray run` only (driver placement)

    @property
    def flag(self) -> str:
        return "--" + (self.name or self.field.rpartition(".")[2].replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def default(self) -> Any:
        section, _, name = self.field.rpartition(".")
        return getattr(SECTIONS[section]() if section else RunConfig(), name)


DATA, AL, MODEL, FM, POOL = "data", "active learning", "model and training", "FisherMask / BAIT", "pool backend"
BAYES = "Bayesian strategies (bald, batchbald) and stochastic batches"
DRIVER = "driver placement (results do not change)"
RUN_FLAGS: tuple[Flag, ...] = (
    Flag(
        "data.dataset",
        DATA,
        "fashion_mnist | cifar10 | imagefolder:<path> | parquet:<path or URI> (a pool from `fm-ray pack`; "
        "default {default})",
    ),
    Flag("data.setting", DATA, "setting1 | setting2 | balanced (default {default}; paper section 5)"),
    Flag(
        "data.class_counts",
        DATA,
        "per-class pool sizes, e.g. 0:250,1:5000 (overrides --setting)",
        parse=_class_counts,
    ),
    Flag("data.data_dir", DATA, "dataset root (else $FM_RAY_DATA, else ~/.cache/fm_ray/data)"),
    Flag(
        "data.skip_bad_images",
        DATA,
        "drop images that cannot be decoded and list them in <out>/skipped_images.csv (default: fail)",
        kind="switch",
    ),
    Flag("preset", DATA, f"paper regime: {', '.join(PRESETS)} (sets setting, init, batch, budget)"),
    Flag("strategy.name", AL, "query strategy (default {default}); see `fm-ray strategies`", name="strategy"),
    Flag("init", AL, "initial labeled samples, seeded random (default {default})", parse=int),
    Flag("batch", AL, "samples queried per round (default {default})", parse=int),
    Flag(
        "rounds",
        AL,
        "query rounds, or 'all': until --budget or the pool is used up (default {default}; with --budget "
        "or a --preset and no --rounds: all)",
        parse=_rounds,
        none_means="all",
    ),
    Flag("budget", AL, "most labeled samples in all (default: no cap)", parse=int),
    Flag(
        "init_strategy",
        AL,
        "strategy that picks the initial labeled set with no labels, e.g. typiclust or probcover (default: "
        "seeded random); with --init 0 it picks the first --batch",
    ),
    Flag(
        "stop",
        AL,
        "end the run at the first round this stopping criterion holds: kappa_average | overall_uncertainty | "
        "classification_change | budget (default: none; every round records them all)",
        choices=("kappa_average", "overall_uncertainty", "classification_change", "budget"),
    ),
    Flag("stop_set", AL, "seeded pool samples the stopping criteria are judged on (default {default})", parse=int),
    Flag("seed", AL, "seeds everything: pool, initial set, weights, training (default {default})", parse=int),
    Flag(
        "model.name",
        MODEL,
        "cnn | mlp | resnet18 | torchvision:<name>, e.g. torchvision:resnet34 (default {default})",
        name="model",
    ),
    Flag(
        "model.pretrained",
        MODEL,
        "resnet18 / torchvision:<name> with torchvision's ImageNet weights (read from the torch cache)",
        kind="toggle",
    ),
    Flag("model.checkpoint", MODEL, "state dict (torch.save) to load into the model before training each round"),
    Flag(
        "train.freeze_backbone",
        MODEL,
        "train only the final layer (Fisher and selection still use every weight)",
        kind="toggle",
    ),
    Flag("train.epochs", MODEL, "most epochs per round (default {default})", parse=int),
    Flag("train.lr", MODEL, "Adam learning rate (default {default})", parse=float),
    Flag("train.batch_size", MODEL, "training mini-batch (default {default})", name="train-batch-size", parse=int),
    Flag(
        "train.target_train_acc",
        MODEL,
        "stop an epoch loop at this training accuracy (default {default})",
        parse=float,
    ),
    Flag("train.warm_start", MODEL, "keep weights across rounds (default: reset)", kind="switch"),
    Flag("train.device", MODEL, "auto | cpu | cuda | cuda:N (default {default})"),
    Flag("strategy.sparsity", FM, "fraction of weights in the Fisher mask (default {default})", parse=float),
    Flag(
        "strategy.fisher_samples",
        FM,
        "pool samples for the Fisher diagonal, or 'all' (default {default})",
        parse=_fisher_samples,
        none_means="all",
    ),
    Flag("strategy.lam", FM, "lambda in M_0 = lambda I + ... (default {default})", parse=float),
    Flag("strategy.backward_steps", FM, "BAIT backward pruning steps b (default {default})", parse=int),
    Flag("strategy.labeled_init", FM, "start M from the labeled Fisher (default on)", kind="toggle"),
    Flag(
        "strategy.include_last_layer",
        FM,
        "always keep the final layer in the mask, as the reference code does (default off)",
        kind="toggle",
    ),
    Flag("strategy.greedy", FM, "greedy implementation (default {default})", choices=("fast", "reference")),
    Flag(
        "strategy.fisher_dtype",
        FM,
        "compute dtype of the Fisher diagonal and embeddings; sums are float64 either way (default {default})",
        choices=("float32", "float64"),
    ),
    Flag(
        "strategy.embed_dtype",
        FM,
        "dtype the shards store the Fisher embeddings in; bfloat16/float16 halve their memory, the selection "
        "still computes in float32/float64 (default {default}: as computed)",
        choices=("float32", "bfloat16", "float16"),
    ),
    Flag(
        "strategy.candidates",
        FM,
        "approximation: the candidates of fishermask, bait, kcenter and badge limited to N unlabeled samples, "
        "chosen by --candidate-rule (default: all, exact)",
        parse=int,
    ),
    Flag(
        "strategy.fisher_pool",
        FM,
        "approximation: the pool Fisher F estimated from a seeded uniform sample of N unlabeled samples; "
        "with --candidates, embeddings are computed for the sample and the candidates only (default: all, exact)",
        parse=int,
    ),
    Flag(
        "strategy.candidate_rule",
        FM,
        "how --candidates chooses: uniform (seeded, shard-invariant) or the top N by an uncertainty score "
        "(default {default})",
        choices=("uniform", "entropy", "margin", "least_confidence"),
    ),
    Flag(
        "strategy.top_classes",
        FM,
        "approximation: keep each sample's c most likely classes' embedding rows (BAIT Exp, arXiv 2404.08981; "
        "default: all C, exact)",
        parse=int,
    ),
    Flag(
        "strategy.project",
        FM,
        "approximation: seeded random projection of the embeddings to r dimensions, so the d x d state becomes "
        "r x r (default: none, exact)",
        parse=int,
    ),
    Flag(
        "strategy.mc_samples",
        BAYES,
        "MC-dropout draws per sample for bald and batchbald (default {default})",
        parse=int,
    ),
    Flag(
        "strategy.mc_dropout",
        BAYES,
        "dropout rate on the head's input for the MC draws; the model's own layers run as trained (default {default})",
        parse=float,
    ),
    Flag(
        "strategy.batchbald_samples",
        BAYES,
        "batchbald: the joint entropy is exact while the picks' labelings (C^b) are at most this many, else "
        "estimated from this many seeded sampled labelings (default {default})",
        parse=int,
    ),
    Flag(
        "strategy.stochastic",
        BAYES,
        "draw the batch instead of taking the top k, for entropy, margin, least_confidence and bald (Kirsch et "
        "al. 2023, arXiv 2106.12059): power (p ~ score^beta, e.g. PowerBALD), softmax (p ~ exp(beta score)) or "
        "softrank (p ~ rank^-beta) (default: top k)",
        choices=STOCHASTIC,
    ),
    Flag("strategy.beta", BAYES, "the inverse temperature of --stochastic (default {default})", parse=float),
    Flag(
        "strategy.features",
        AL,
        "typiclust/probcover on a frozen model's features: torchvision:<name> (ImageNet weights with "
        "--pretrained) or checkpoint:<path> (a state dict of --model) (default: the trained model's)",
    ),
    Flag(
        "strategy.probcover_delta",
        AL,
        "probcover: radius of the balls it covers, on L2-normalized features (default {default})",
        parse=float,
    ),
    Flag(
        "pool.backend",
        POOL,
        "auto | ray | local (default {default}: Ray when --ray-address or $RAY_ADDRESS, --shards > 1 or "
        "--gpus-per-shard > 0 is given, else in-process; the rows' backend column says which ran)",
        choices=BACKENDS,
    ),
    Flag("pool.shards", POOL, "pool shards (default {default})", parse=int),
    Flag("pool.cpus_per_shard", POOL, "Ray CPUs per shard actor (default {default})", parse=float),
    Flag(
        "pool.gpus_per_shard",
        POOL,
        "Ray GPUs per shard actor, fractions allowed (default: the cluster's GPUs shared evenly, at most "
        "1 each, 0 without GPUs; in a sweep, 0 unless given)",
        parse=float,
    ),
    Flag(
        "pool.ray_address",
        POOL,
        "Ray cluster to join: auto | ray://host:10001 (else $RAY_ADDRESS, else a local instance)",
    ),
    Flag(
        "pool.driver_gpus",
        DRIVER,
        "run the recipe (training, evaluation, the d x d reduce) in a Ray actor holding this many GPUs, "
        "e.g. under `ray job submit` on a head node without GPUs; progress and --out stay here",
        parse=float,
        run_only=True,
    ),
    Flag(
        "dry_run",
        DRIVER,
        "print the memory plan (per process: driver, each shard; RAM and GPU) and exit without training",
        kind="switch",
        run_only=True,
    ),
    Flag("pool.driver_cpus", DRIVER, "CPUs (torch threads) of that actor (default 1)", parse=float, run_only=True),
)
BY_DEST: dict[str, Flag] = {f.dest: f for f in RUN_FLAGS}

# `fm-ray run --help` examples: (what it does, argv after `fm-ray`); tests/test_cli.py parses each one.
RUN_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("a first run: FisherMask, 5 query rounds of 100 on FashionMNIST setting 2", "run --out runs/first"),
    ("continue it after Ctrl+C (the same flags, plus --resume)", "run --out runs/first --resume"),
    ("a quick check on a laptop CPU", "run --model mlp --epochs 2 --rounds 2 --device cpu --out runs/quick"),
    ("a baseline in the paper's setting-2 regime (to 6500 labels)", "run --preset s2 --strategy entropy --out runs/s2"),
    ("the pool on 4 Ray shard actors of a running cluster", "run --shards 4 --ray-address auto --out runs/big"),
)


def epilog(examples: tuple[tuple[str, str], ...]) -> str:
    """The `examples:` block at the end of a command's --help."""
    lines = [f"  # {what}\n  fm-ray {argv}" for what, argv in examples]
    return "examples:\n" + "\n".join(lines)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that the examples block keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line + "\n" for line in text.splitlines())
        return super()._fill_text(text, width, indent)


# ---------------------------------------------------------------------------------------------
# argparse: the flags, and the namespace back to values.


def add_run_flags(p: argparse.ArgumentParser, run_only: bool = False) -> None:
    """The flags of one run (shared by `run`, `sweep` and `project init`); with run_only, only the
    `fm-ray run`-only ones (driver placement). Defaults stay None: None means "not given"."""
    groups: dict[str, Any] = {}
    for f in RUN_FLAGS:
        if f.run_only != run_only:
            continue
        g = groups.get(f.group) or groups.setdefault(f.group, p.add_argument_group(f.group))
        help_text = f.help.replace("{default}", str(f.default()))
        if f.kind == "switch":
            g.add_argument(f.flag, action="store_true", default=None, help=help_text)
        elif f.kind == "toggle":
            g.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind: dict[str, Any] = {} if f.parse is str else {"type": f.parse}
            g.add_argument(f.flag, choices=f.choices, help=help_text, **kind)


def values_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """The run flags of a parsed command line as {dest: value}; flags a command lacks are None."""
    return {f.dest: getattr(a, f.dest, None) for f in RUN_FLAGS}


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Flags -> RunConfig. A preset fills what the flags leave unset."""
    return config_from_values(values_from_args(a))


# ---------------------------------------------------------------------------------------------
# Values (typed, None = not given) -> RunConfig, and back.


def config_from_values(values: Mapping[str, Any]) -> RunConfig:
    """{run flag dest: value} -> RunConfig: the only way user input becomes a config.

    A regime preset fills setting/init/batch/budget where `values` leaves them unset, so explicit
    values win; --class-counts without --setting means the custom setting; a budget without
    --rounds runs until the budget (not the default of a few rounds).
    """
    unknown = sorted(set(values) - set(BY_DEST))
    if unknown:
        raise UserError(f"unknown run flag(s) {', '.join(unknown)}: use names of `fm-ray run` flags, e.g. epochs")
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("class_counts") and "setting" not in given:
        given["setting"] = "custom"
    preset = given.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        given = {**PRESETS[preset], **given}
    if given.get("budget") is not None and "rounds" not in given:
        given["rounds"] = "all"  # a budget given is the stopping rule, not the small default
    if "dataset" in given:
        given["dataset"] = absolute_pool(given["dataset"])
    if given.get("checkpoint"):  # absolute: a Tune trial runs in its own working directory
        given["checkpoint"] = str(Path(given["checkpoint"]).expanduser().absolute())
    if str(given.get("features", "")).startswith("checkpoint:"):
        given["features"] = "checkpoint:" + str(Path(given["features"].split(":", 1)[1]).expanduser().absolute())
    fields: dict[str, dict[str, Any]] = {section: {} for section in ("", *SECTIONS)}
    for dest, value in given.items():
        f = BY_DEST[dest]
        section, _, name = f.field.rpartition(".")
        fields[section][name] = None if f.none_means is not None and value == f.none_means else value
    top = fields.pop("")
    return RunConfig(**{s: cls(**fields[s]) for s, cls in SECTIONS.items()}, **top)


def absolute_pool(dataset: str) -> str:
    """parquet:<relative path> -> an absolute path, so Tune trials (run in other folders) find it."""
    if not dataset.startswith("parquet:") or "://" in dataset:
        return dataset
    return "parquet:" + os.path.abspath(os.path.expanduser(dataset.split(":", 1)[1]))


def values_from_config(cfg: RunConfig, with_run_only: bool = True) -> dict[str, Any]:
    """Every flag's value in `cfg` ({dest: value}); without with_run_only, no `fm-ray run`-only ones."""
    out = {}
    for f in RUN_FLAGS:
        if f.run_only and not with_run_only:
            continue
        section, _, name = f.field.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        out[f.dest] = f.none_means if value is None and f.none_means is not None else value
    return out


def flags_of(cfg: RunConfig, with_run_only: bool = True) -> list[str]:
    """`fm-ray run` flags that rebuild `cfg` exactly (every flag spelled out, presets included)."""
    argv: list[str] = []
    for dest, value in values_from_config(cfg, with_run_only).items():
        f = BY_DEST[dest]
        if f.kind != "value":
            if value or f.kind == "toggle":
                argv.append(f.flag if value else "--no-" + f.flag[2:])
        elif value is None:
            continue
        elif dest == "class_counts":
            argv += [f.flag, ",".join(f"{c}:{n}" for c, n in value)]
        else:
            argv += [f.flag, str(value)]
    return argv


# ---------------------------------------------------------------------------------------------
# Spec files: YAML-typed values -> the values the same flags would give.


def parse_values(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A spec file's `base` ({run flag name: YAML value}) -> typed values for `config_from_values`.

    Scalars go through the flag's own parser as text, so `lr: 1e-3` (a string to YAML) and
    `fisher_samples: all` mean what `--lr 1e-3` and `--fisher-samples all` mean.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in BY_DEST:
            raise UserError(f"{where}: unknown run flag {key!r}: use names of `fm-ray run` flags, e.g. epochs: 2")
        if value is not None:
            out[dest] = parse_value(BY_DEST[dest], value, where)
    return out


def parse_value(f: Flag, value: Any, where: str) -> Any:
    if f.kind != "value":
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: {f.dest} must be true or false, got {value!r}")
    if isinstance(value, bool | list):
        raise UserError(f"{where}: {f.dest} takes one value like {f.flag}, got {value!r}")
    if f.dest == "class_counts" and isinstance(value, dict):
        value = ",".join(f"{c}:{n}" for c, n in value.items())
    text = str(value)
    try:
        parsed = f.parse(text)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{where}: {e}") from None
    except ValueError:
        raise UserError(f"{where}: {f.dest} must be {f.parse.__name__}, got {value!r}: as with {f.flag}") from None
    if f.choices is not None and parsed not in f.choices:
        raise UserError(f"{where}: {f.dest} must be one of {', '.join(f.choices)}, got {value!r}")
    return parsed
