"""One typed, frozen config tree: built from CLI flags or a dict, passed unchanged to workers and trials."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from fm_ray.core.stopping import CRITERIA
from fm_ray.errors import UserError

BACKENDS = ("auto", "local", "ray")
DEFAULT_ROUNDS = 5  # README "Quick start" states it


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | cifar10 | imagefolder:<path>
    setting: str = "setting2"  # setting1 | setting2 | balanced | custom (with class_counts)
    class_counts: tuple[tuple[int, int], ...] | None = None  # ((class, count), ...)
    data_dir: str | None = None  # else $FM_RAY_DATA, else the user cache
    skip_bad_images: bool = False  # drop undecodable images (listed in skipped_images.csv) instead of failing


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # cnn | mlp | resnet18 | torchvision:<name> (any torchvision classifier)
    pretrained: bool = False  # torchvision's ImageNet weights, from the torch cache
    checkpoint: str | None = None  # a state dict loaded before training each round (driver only)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50  # cap; training normally stops earlier at target_train_acc (the reference: 99%)
    lr: float = 1e-3
    batch_size: int = 64
    target_train_acc: float = 0.99  # stop early once an epoch's training accuracy reaches this
    warm_start: bool = False  # default: weights reset every round, as the reference code does
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    freeze_backbone: bool = False  # train the final layer only; Fisher and selection still see all weights


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fishermask"  # the method fm_ray is for; `fm-ray strategies` lists the baselines
    sparsity: float = 0.002  # FisherMask: fraction of all weights kept in the mask
    fisher_samples: int | None = 1024  # pool samples for the Fisher diagonal; None = the whole pool
    lam: float = 1.0  # lambda in M_0 = lambda*I + n_L/(n_L+K) F_L
    backward_steps: int = 0  # BAIT's backward pruning: (1+b)K forward picks, then prune to K
    labeled_init: bool = True  # start M from the labeled Fisher
    include_last_layer: bool = False  # the reference code keeps the whole final layer; the paper does not
    greedy: str = "fast"  # fast | reference
    chunk_size: int = 64  # samples per batched gradient chunk
    fisher_dtype: str = "float32"  # float32 | float64: compute dtype of Fisher diagonal and embeddings
    embed_dtype: str = "float32"  # float32 (= as computed) | bfloat16 | float16: stored Fisher embeddings
    # opt-in approximations (docs/method.md, "Approximations"); None = exact
    candidates: int | None = None  # greedy candidates: N unlabeled samples chosen by candidate_rule
    candidate_rule: str = "uniform"  # uniform (seeded) | entropy | margin | least_confidence (top N)
    top_classes: int | None = None  # keep each sample's c most likely classes' rows (BAIT Exp)
    project: int | None = None  # seeded random projection of the embeddings to r dimensions
    fisher_pool: int | None = None  # F from a seeded uniform sample of N unlabeled samples (None: all)
    # Bayesian strategies (bald, batchbald): MC dropout on the head's input (strategies/mc.py)
    mc_samples: int = 20  # T: MC-dropout draws per sample
    mc_dropout: float = 0.5  # p: dropout rate before the head
    batchbald_samples: int = 10_000  # joint entropy exact while the picks' C^b labelings are at most this, else sampled
    # stochastic batches for a score strategy (Kirsch et al. 2023, arXiv 2106.12059); None = top-k
    stochastic: str | None = None  # power | softmax | softrank
    beta: float = 1.0  # inverse temperature of the stochastic batch
    # typiclust/probcover: features of a frozen model instead of the trained one's: torchvision:<name> (with
    # --pretrained: ImageNet weights) or checkpoint:<path> (a state dict of --model); None = the trained model
    features: str | None = None
    probcover_delta: float = 0.75  # ProbCover's ball radius on L2-normalized features (the paper's CIFAR-10 value)


@dataclass(frozen=True)
class PoolConfig:
    # auto: Ray when a cluster, several shards or GPUs per shard are asked, else in-process
    # (pool.backend.resolve_backend); ray | local force one
    backend: str = "auto"
    shards: int = 1
    cpus_per_shard: float = 1.0
    gpus_per_shard: float | None = None  # None: share the cluster's GPUs among the shards, if it has any
    ray_address: str | None = None  # else $RAY_ADDRESS, else an embedded local instance
    # `fm-ray run` only: run the recipe in a Ray actor holding these (fm_ray/remote.py); None = in-process
    driver_cpus: float | None = None
    driver_gpus: float | None = None


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    init: int = 100  # initial labeled set size (seeded random)
    batch: int = 100  # samples queried per round
    # query rounds (round 0 is the initial set); None = until budget or pool. A small default, so a
    # first `fm-ray run` ends in minutes; --budget without --rounds means None (the budget governs).
    rounds: int | None = DEFAULT_ROUNDS
    budget: int | None = None  # max labeled samples in all; None = no cap besides rounds and pool
    seed: int = 0
    preset: str | None = None
    dry_run: bool = False  # `fm-ray run --dry-run`: print the memory plan, train nothing
    # cold start: the strategy that picks the initial set (None: seeded random); with init 0 it picks --batch
    init_strategy: str | None = None
    stop: str | None = None  # end the run at the first round this stopping criterion holds (core.stopping)
    stop_set: int = 1000  # pool samples (seeded, fixed) the stopping criteria are judged on  # `fm-ray run --dry-run`: print the memory plan, train nothing


# The paper's regimes (Gul et al., arXiv 2411.05752, section 5; see docs/method.md). The paper gives setting 1's low regime only as
# "575 labels in all (10%)"; we start from 115 and add 115 a round (4 rounds), our choice.
PRESETS: dict[str, dict[str, Any]] = {
    "s1-low": {"setting": "setting1", "init": 115, "batch": 115, "budget": 575},
    "s1-high": {"setting": "setting1", "init": 250, "batch": 250, "budget": 5750},
    "s2": {"setting": "setting2", "init": 500, "batch": 500, "budget": 6500},
}


def resolve_backend(pool: PoolConfig) -> str:
    """The pool backend `auto` stands for: Ray when a cluster is given (--ray-address or $RAY_ADDRESS),
    several shards or GPUs per shard are asked (what Ray shard actors are for); in-process otherwise,
    so a small project or a quick run starts in seconds. `ray` and `local` stay as given."""
    if pool.backend != "auto":
        return pool.backend
    cluster = pool.ray_address or os.environ.get("RAY_ADDRESS")
    return "ray" if cluster or pool.shards > 1 or (pool.gpus_per_shard or 0) > 0 else "local"


def with_resolved_backend(cfg: RunConfig) -> RunConfig:
    """`cfg` with its backend resolved here, before it travels to a Tune trial or a remote driver
    (their workers see another environment, and trial resources depend on the backend)."""
    pool = dataclasses.replace(cfg.pool, backend=resolve_backend(cfg.pool))
    return dataclasses.replace(cfg, pool=pool)


def initial_size(cfg: RunConfig) -> int:
    """Labels of round 0: --init, or with --init 0 (a cold start by --init-strategy) one --batch."""
    return cfg.init or cfg.batch


def rounds_for_budget(init: int, batch: int, budget: int) -> int:
    """Query rounds needed to go from `init` to `budget` labels, `batch` a round (last may be partial)."""
    return max(0, -(-(budget - init) // batch))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of `to_dict` (JSON round trip turns tuples into lists; undo that)."""
    data = dict(d["data"])
    if data.get("class_counts") is not None:
        data["class_counts"] = tuple((int(c), int(n)) for c, n in data["class_counts"])
    top = {k: v for k, v in d.items() if k not in ("data", "model", "train", "strategy", "pool")}
    return RunConfig(
        data=DataConfig(**data),
        model=ModelConfig(**d["model"]),
        train=TrainConfig(**d["train"]),
        strategy=StrategyConfig(**d["strategy"]),
        pool=PoolConfig(**d["pool"]),
        **top,
    )


def parse_class_counts(spec: str) -> tuple[tuple[int, int], ...]:
    """'0:250,1:5000' -> ((0, 250), (1, 5000))."""
    try:
        pairs = [item.split(":") for item in spec.split(",") if item.strip()]
        counts = tuple((int(c), int(n)) for c, n in pairs)
    except ValueError:
        raise UserError(
            f"--class-counts {spec!r} is not valid: give class:count pairs, e.g. --class-counts 0:250,1:5000"
        ) from None
    if not counts or any(n <= 0 or c < 0 for c, n in counts):
        raise UserError(f"--class-counts {spec!r}: classes must be >= 0 and counts positive, e.g. 0:250,1:5000")
    if len({c for c, _ in counts}) != len(counts):
        raise UserError(f"--class-counts {spec!r} names a class twice: give each class once")
    return counts


def _in_range(flag: str, value: float, low: float, high: float, low_open: bool, fix: str) -> None:
    """One numeric check; NaN and infinities fail it too (every comparison with NaN is False)."""
    above = value > low if low_open else value >= low
    if not (above and value <= high and math.isfinite(value)):
        raise UserError(f"{flag} must be {fix}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Every check that needs no data, so bad input fails before anything runs; data-dependent
    checks (pool size, class counts) live in fm_ray.data and the recipe's set-up (run/recipe.py)."""
    _validate_counts(cfg)
    _validate_train(cfg.train)
    validate_strategy(cfg.strategy)
    _validate_pool(cfg.pool)


def _validate_counts(cfg: RunConfig) -> None:
    for name in ("batch", "rounds"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}: pass a number >= 1")
    if cfg.init < 0 or (cfg.init == 0 and cfg.init_strategy is None):
        raise UserError(
            f"--init must be positive, got {cfg.init}: pass a number >= 1, or --init 0 with --init-strategy "
            "(e.g. typiclust) to pick the first --batch with no labels"
        )
    if cfg.budget is not None and cfg.budget < initial_size(cfg):
        raise UserError(f"--budget {cfg.budget} is below --init {cfg.init}: raise --budget or lower --init")
    if cfg.stop_set <= 0:
        raise UserError(f"--stop-set must be positive, got {cfg.stop_set}: e.g. --stop-set 1000")
    if cfg.stop is not None and cfg.stop not in CRITERIA:
        raise UserError(f"--stop must be one of {', '.join(CRITERIA)}, got {cfg.stop!r}")
    if cfg.stop == "budget" and cfg.budget is None:
        raise UserError("--stop budget needs a --budget: give one, or choose another --stop")
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")


def _validate_train(t: TrainConfig) -> None:
    if t.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {t.epochs}")
    _in_range("--lr", t.lr, 0, math.inf, True, "a positive number, e.g. --lr 1e-3")
    if t.batch_size <= 0:
        raise UserError(f"--train-batch-size must be positive, got {t.batch_size}: e.g. --train-batch-size 64")
    _in_range("--target-train-acc", t.target_train_acc, 0, 1, True, "in (0, 1], e.g. 0.99")


def validate_strategy(s: StrategyConfig) -> None:
    """The strategy options' own checks (also run by `PoolSession.select` for `fm_ray.select`)."""
    _in_range("--sparsity", s.sparsity, 0, 1, True, "in (0, 1], e.g. 0.002")
    _in_range("--lam", s.lam, 0, math.inf, True, "a positive number, e.g. --lam 1")
    if s.backward_steps < 0:
        raise UserError(f"--backward-steps must be >= 0, got {s.backward_steps}")
    if s.chunk_size <= 0:
        raise UserError(f"chunk_size must be positive, got {s.chunk_size}")
    if s.fisher_samples is not None and s.fisher_samples <= 0:
        raise UserError(f"--fisher-samples must be positive or 'all', got {s.fisher_samples}")
    if s.greedy not in ("fast", "reference"):
        raise UserError(f"--greedy must be fast or reference, got {s.greedy!r}")
    if s.fisher_dtype not in ("float32", "float64"):
        raise UserError(f"--fisher-dtype must be float32 or float64, got {s.fisher_dtype!r}")
    if s.embed_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--embed-dtype must be float32, bfloat16 or float16, got {s.embed_dtype!r}")
    approximations = (
        ("--candidates", s.candidates),
        ("--top-classes", s.top_classes),
        ("--project", s.project),
        ("--fisher-pool", s.fisher_pool),
    )
    for flag, value in approximations:
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}: pass a number >= 1 or leave it out (exact)")
    _in_range("--probcover-delta", s.probcover_delta, 0, 2, True, "in (0, 2] (features are L2-normalized), e.g. 0.75")
    if s.features is not None and not s.features.startswith(("torchvision:", "checkpoint:")):
        raise UserError(f"--features must be torchvision:<name> or checkpoint:<path>, got {s.features!r}")
    rules = ("uniform", "entropy", "margin", "least_confidence")
    if s.candidate_rule not in rules:
        raise UserError(f"--candidate-rule must be one of {', '.join(rules)}, got {s.candidate_rule!r}")
    _validate_bayes(s)


STOCHASTIC = ("power", "softmax", "softrank")  # core.stochastic's modes


def _validate_bayes(s: StrategyConfig) -> None:
    if s.mc_samples <= 0:
        raise UserError(f"--mc-samples must be positive, got {s.mc_samples}: e.g. --mc-samples 20")
    if not 0 <= s.mc_dropout < 1:  # NaN fails too
        raise UserError(f"--mc-dropout must be in [0, 1), e.g. 0.5, got {s.mc_dropout}")
    if s.batchbald_samples <= 0:
        raise UserError(f"--batchbald-samples must be positive, got {s.batchbald_samples}: e.g. 10000")
    _in_range("--beta", s.beta, 0, math.inf, True, "a positive number, e.g. --beta 1")
    if s.stochastic is not None and s.stochastic not in STOCHASTIC:
        raise UserError(f"--stochastic must be one of {', '.join(STOCHASTIC)}, got {s.stochastic!r}")
    if s.stochastic == "power" and s.name == "margin":
        raise UserError(
            "--stochastic power samples in proportion to score^beta and margin's scores are <= 0 (the negated gap "
            "of the top two classes): use --stochastic softmax or softrank with margin"
        )


def _validate_pool(pl: PoolConfig) -> None:
    inf = math.inf
    if pl.gpus_per_shard is not None:
        _in_range("--gpus-per-shard", pl.gpus_per_shard, 0, inf, False, ">= 0")
    _in_range("--cpus-per-shard", pl.cpus_per_shard, 0, inf, True, "positive")
    if pl.shards <= 0:
        raise UserError(f"--shards must be positive, got {pl.shards}")
    if pl.driver_cpus is not None:
        _in_range("--driver-cpus", pl.driver_cpus, 0, inf, True, "positive")
    if pl.driver_gpus is not None:
        _in_range("--driver-gpus", pl.driver_gpus, 0, inf, False, ">= 0")
    if pl.backend not in BACKENDS:
        raise UserError(f"--backend must be auto, local or ray, got {pl.backend!r}")
