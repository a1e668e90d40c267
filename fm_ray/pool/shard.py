"""One shard of the pool: where its images are, their global pool positions, and the per-sample
state a strategy builds. The local pool calls it in-process; the Ray pool wraps the same class in an actor.

A shard never holds its pixels: every pass over its members (`stream`) reads them block by block
from its `ImageSource` (a packed pool's Parquet row groups, or a tensor already in RAM) and drops
them, so its memory does not grow with the size of its images.

Strategies act on a shard through module-level functions ``fn(shard, *args)`` (``pool.map(fn, ...)``);
the ones every strategy shares live here. Everything pool-sized a shard builds (predictions aside,
which `train.predict` returns on the CPU) lives on the shard's device.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import resource
import sys
from collections.abc import Callable, Iterator
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np
import torch

from fm_ray.config import ModelConfig
from fm_ray.core.badge import KMeansPPState
from fm_ray.core.bayes import BatchBALDState
from fm_ray.core.greedy import GreedyState
from fm_ray.core.kcenter import KCenterState
from fm_ray.data.normalize import Normalizer
from fm_ray.data.source import ImageSource, as_source
from fm_ray.model.train import predict
from fm_ray.model.zoo import build_model

BLOCK = 256  # inference batch; shards are cut on multiples of it (see pool.partition)
CHECK_ROWS = 4 * BLOCK  # rows per step of a check over a shard's cached predictions
# Fisher compute dtypes (--fisher-dtype) and stored embedding dtypes (--embed-dtype)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")
F = TypeVar("F", bound=Callable)
SelectionState = GreedyState | KCenterState | KMeansPPState | BatchBALDState


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Everything a shard needs to rebuild the model: plain data, cheap to ship to an actor."""

    model: ModelConfig | None  # None: `module` is the model
    channels: int
    side: int
    n_classes: int
    norm: Normalizer
    device: str
    module: torch.nn.Module | None = None  # a user's own model (fm_ray.select), copied onto each shard


class PoolShard:
    def __init__(self, spec: ShardSpec, images: ImageSource | torch.Tensor, index_N: np.ndarray):
        """`images`: this shard's images, position i = pool position `index_N[i]`; a Parquet source
        is read in the shard's own process, pass by pass, so its pixels never pass through the driver."""
        self.spec = spec
        self.images = as_source(images)
        self.index_N = torch.as_tensor(index_N, dtype=torch.long)
        self.device = torch.device(spec.device)
        if spec.module is not None:
            self.model = copy.deepcopy(spec.module)
        else:
            assert spec.model is not None
            # weights come from the driver each round (set_round): never re-read ImageNet or --checkpoint here
            self.model = build_model(
                dataclasses.replace(spec.model, pretrained=False, checkpoint=None),
                spec.channels,
                spec.side,
                spec.n_classes,
            )
        self.labeled_N = torch.zeros(len(index_N), dtype=torch.bool)
        self.state: SelectionState | None = None
        self._preds: tuple[torch.Tensor, torch.Tensor] | None = None

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs_N_C, feats_N_E) of every member under this round's weights, cached, on the CPU."""
        if self._preds is None:
            # written block by block into tensors made once: a list of per-block results, kept while
            # each block's larger activations come and go, fragmented the heap (a shard of 500k
            # samples grew by GBs; benchmarks.million) and needed a second copy to concatenate
            probe = torch.zeros(1, *self.images.shape, dtype=torch.uint8)  # (C, H, W), or (F,) for feature rows
            p, f = predict(self.model, probe, self.spec.norm, self.device)
            N = len(self.index_N)
            probs_N_C, feats_N_E = p.new_empty(N, p.shape[1]), f.new_empty(N, f.shape[1])
            for pos, x_u8 in self.stream():
                probs_N_C[pos], feats_N_E[pos] = predict(self.model, x_u8, self.spec.norm, self.device, batch=BLOCK)
            self._preds = probs_N_C, feats_N_E
        return self._preds

    def stream(self, blocks: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(member positions, uint8 pixels) block by block, read from the source as they are used
        and dropped after (default: every member, in `blocks()`); the only way a shard reads pixels."""
        try:
            for pos in self.blocks() if blocks is None else blocks:
                yield pos, self.images.read(pos.numpy())
        finally:
            self.images.close()  # no file or row group held between passes

    def normalized(self, x_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A block of `stream`'s pixels as model inputs: normalized, on the shard's device in `dtype`."""
        return self.spec.norm(x_u8).to(self.device, dtype)

    def model_in(self, dtype: torch.dtype) -> torch.nn.Module:
        """The model in the Fisher compute dtype (float64 on request: a copy)."""
        return self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)

    def blocks(self) -> list[torch.Tensor]:
        """Member positions in inference batches (the same batches whatever the shard count)."""
        # none for an empty shard (a pool smaller than a block per shard): nothing to score there
        return [b for b in torch.arange(len(self.index_N)).split(BLOCK) if len(b)]


def read_only(fn: F) -> F:
    """Mark a shard function that changes no shard state: the Ray pool never replays it."""
    fn.read_only = True  # type: ignore[attr-defined]
    return fn


def is_read_only(fn: Callable) -> bool:
    return bool(getattr(fn, "read_only", False))


def set_round(shard: PoolShard, weights: dict[str, torch.Tensor] | None, labeled: np.ndarray) -> None:
    """New model weights (None: keep) and the labeled set (global positions); clears every cache
    and state, so a round's calls replayed from here rebuild a restarted shard exactly."""
    if weights is not None:
        shard.model.load_state_dict(weights)
    shard.model.to(shard.device).eval()
    shard.labeled_N = torch.from_numpy(np.isin(shard.index_N.numpy(), labeled))
    shard.state, shard._preds = None, None


def on_state(
    shard: PoolShard, kind: type[S], fn: Callable[Concatenate[S, P], R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """``fn(shard.state, *args)``, the shard's selection state checked to be a ``kind``."""
    state = shard.state
    if not isinstance(state, kind):
        raise RuntimeError(f"shard holds {type(state).__name__}, not the {kind.__name__} this call needs")
    return fn(state, *args, **kwargs)


@read_only
def member_pixels(shard: PoolShard, positions: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The uint8 images of those of the pool `positions` this shard holds, with their positions:
    the driver's labeled set is read here, by the shards, so the driver opens no pool pixel file."""
    index = shard.index_N.numpy()
    mine = np.asarray(positions, dtype=np.int64)[np.isin(positions, index)]
    x_u8 = shard.images.read(np.searchsorted(index, mine))  # index_N is sorted (pool.partition)
    shard.images.close()
    return mine, x_u8


@read_only
def nonfinite_outputs(shard: PoolShard) -> int:
    """How many of this shard's model outputs (probabilities and penultimate features) are NaN or inf."""
    # CHECK_ROWS rows at a time: isfinite over a whole shard's features makes several
    # temporaries of their size (abs among them), a transient of ~2x the cached predictions that
    # was a 1M pool's shard peak, above its memory plan (benchmarks.million)
    return sum(int((~rows.isfinite()).sum()) for t in shard.predictions() for rows in t.split(CHECK_ROWS))


@read_only
def member_probs(shard: PoolShard, positions: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global positions among `positions` (None: all) that are this shard's members, and their
    probabilities. A few members (a stop set) are predicted alone unless the whole shard's
    predictions are already made: a round that makes no query (random's, the last) pays for the
    few, not for a pass over the pool."""
    if positions is None:
        return shard.index_N, shard.predictions()[0]
    mine = torch.from_numpy(np.isin(shard.index_N.numpy(), positions))
    if shard._preds is not None:
        return shard.index_N[mine], shard._preds[0][mine]
    blocks = [b[mine[b]] for b in shard.blocks() if mine[b].any()]  # the same sub-blocks on any shard count
    parts = [
        predict(shard.model, x_u8, shard.spec.norm, shard.device, batch=BLOCK)[0] for _, x_u8 in shard.stream(blocks)
    ]
    probs = torch.cat(parts) if parts else torch.empty(0, shard.spec.n_classes)
    return shard.index_N[mine], probs


@read_only
def first_score_range(shard: PoolShard) -> tuple[float, float] | None:
    """(min, max) of the scores the shard's selection state ranked its candidates by at its first
    step (None: it has not ranked any), for the "all equal" guard."""
    return getattr(shard.state, "first_range", None)


@read_only
def state_bytes(shard: PoolShard) -> int:
    """Bytes of tensors held by the current selection state (per-shard memory report)."""
    if shard.state is None:
        return 0
    return sum(v.numel() * v.element_size() for v in vars(shard.state).values() if isinstance(v, torch.Tensor))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Linux: VmHWM of /proc/self/status, the peak of this process image. getrusage's ru_maxrss is not
    that: it starts from the peak of the process that forked this one (a big test runner, a raylet)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@read_only
def peak_memory_mb(shard: PoolShard) -> tuple[float, float | None]:
    """The shard process's peak resident memory so far, and the peak CUDA memory allocated on the
    shard's device so far (None on CPU), in MB."""
    gpu_mb = torch.cuda.max_memory_allocated(shard.device) / 2**20 if shard.device.type == "cuda" else None
    return peak_rss_mb(), gpu_mb


@read_only
def pid(shard: PoolShard, *_: object) -> int:
    """The shard's process id (any arguments are ignored: a no-op round trip carrying them)."""
    return os.getpid()
