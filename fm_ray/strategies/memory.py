"""The memory plan of a query, before any work: built from the config and the model, checked
against what each process has, refused in one line when it does not fit.

`PoolSession` checks it before every query (so `fm-ray run`, Tune trials, projects and
`fm_ray.select` all do), `fm-ray run` also before its first round's training and with `--dry-run`.
"""

from __future__ import annotations

import numpy as np
import torch

from fm_ray._internal.resources import free_gpu_bytes, free_ram_bytes
from fm_ray.config import StrategyConfig
from fm_ray.core.memory import PHASES, Item, Plan, shortfall
from fm_ray.data.parquet import ROW_GROUP
from fm_ray.data.source import ImageSource, TensorImages, as_source
from fm_ray.errors import UserError
from fm_ray.pool import partition
from fm_ray.pool.shard import BLOCK
from fm_ray.strategies import STRATEGIES, Pixels, PlanInputs

FIX_SHARD = "use more --shards (each holds its members' predictions), or a packed pool (`fm-ray pack`) to stream pixels"
FIX_PASS = "use a smaller --model or smaller images (one block of 256 passes at a time)"


def head_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(C, E) of the model's final nn.Linear: classes and penultimate width ((0, 0) without one)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return (heads[-1].out_features, heads[-1].in_features) if heads else (0, 0)


def layer_outputs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """Numbers each leaf module outputs for one sample of `input_shape` (one forward pass, on the
    CPU); empty for a model that cannot take zeros of that shape (its workspace is not planned)."""
    sizes: list[int] = []

    def count(_m: torch.nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    except Exception:
        return []
    finally:
        for h in handles:
            h.remove()
    return sizes


def pixels_of(images: ImageSource | torch.Tensor) -> Pixels:
    """A source's pixels as the plan sees them: a tensor is held (by each shard, its members'),
    anything else (a packed pool) is streamed. Reads no pixel."""
    source = as_source(images)
    if isinstance(source, TensorImages):
        return Pixels(tuple(source.shape), source.x_N_C_H_W.element_size(), streamed=False)
    return Pixels(tuple(source.shape))


def pool_items(x: PlanInputs, needs_model: bool) -> list[Item]:
    """What every strategy's largest shard holds besides its selection state: its bookkeeping, its
    pixels (held, or one decoded row group and one block while streamed) and, when the strategy
    needs the model, the cached predictions (``shard.predictions()``: probs and features of every
    member, float32, on the CPU) and the forward pass that makes them."""
    N, C, E = max(x.shard_members), x.n_classes, x.feat_dim
    sh = "gpu" if x.shard_gpu else "ram"
    passes = ("predict", "embed")
    bookkeeping = Item(
        "shard", "ram", "member positions and labeled flags", N * 9, f"members x 9 B = {N} x 9 B", PHASES, FIX_SHARD
    )
    items = [bookkeeping]
    if needs_model:
        items += [
            Item(
                "shard",
                "ram",
                "cached predictions (probs + features)",
                N * (C + E) * 4,
                f"members x (C + E) x 4 B = {N} x ({C} + {E}) x 4 B",
                PHASES,
                FIX_SHARD,
            ),
        ]
        if x.largest_output:  # without autograd a layer's input and output are alive at once
            b = min(BLOCK, N)
            items.append(
                Item(
                    "shard",
                    sh,
                    "one block's forward pass",
                    b * 2 * x.largest_output * 4,
                    f"{b} x 2 x {x.largest_output} (the largest layer output) x 4 B",
                    ("predict",),
                    FIX_PASS,
                )
            )
    px = x.pixels
    if px is None:
        return items
    numel = int(np.prod(px.shape))
    if not px.streamed:
        items.append(
            Item(
                "shard",
                "ram",
                "pixels held in RAM",
                N * numel * px.itemsize,
                f"members x {'x'.join(map(str, px.shape))} x {px.itemsize} B",
                PHASES,
                FIX_SHARD,
            )
        )
    elif needs_model:  # random reads no pixels
        g = min(ROW_GROUP, N)
        items.append(
            Item("shard", "ram", "one decoded row group", g * numel, f"{g} x {numel} B (streamed)", passes, FIX_PASS)
        )
    if needs_model:
        b = min(BLOCK, N)
        items.append(
            Item(
                "shard",
                sh,
                "one block of pixels and normalized inputs",
                b * numel * (px.itemsize + 4),
                f"{b} x {numel} x ({px.itemsize} + 4) B",
                passes,
                FIX_PASS,
            )
        )
    return items


def plan_inputs(
    model: torch.nn.Module,
    n_classes: int,
    pool_size: int,
    n_shards: int,
    labeled: np.ndarray,
    k: int,
    cfg: StrategyConfig,
    shard_device: str,
    local: bool,
    driver: torch.device | None = None,
    input_shape: tuple[int, ...] | None = None,
    pixels: Pixels | None = None,
) -> PlanInputs:
    """The plan's inputs from the model and the pool as the shards will hold it (`pool.partition`);
    `input_shape` (one sample's; default: the pixels') sizes the forward and Fisher passes'
    workspace (None: not counted); `pixels` (`pixels_of`) plans the pixels the shards hold."""
    input_shape = input_shape or (pixels.shape if pixels is not None else None)
    outputs = [] if input_shape is None else layer_outputs(model, input_shape)
    parts = partition(pool_size, n_shards, BLOCK)
    members = [len(p) for p in parts]
    free = [int((~np.isin(p, labeled)).sum()) for p in parts]
    driver = driver or next(model.parameters()).device
    return PlanInputs(
        n_params=sum(p.numel() for p in model.parameters()),
        n_classes=n_classes,
        feat_dim=head_shape(model)[1],
        activations=sum(outputs),
        largest_output=max(outputs, default=0),
        shard_members=members,
        shard_free=free,
        n_labeled=len(labeled),
        k=k,
        cfg=cfg,
        shard_gpu=torch.device(shard_device).type == "cuda",
        driver_gpu=driver.type == "cuda",
        local=local,
        pixels=pixels,
    )


def query_plan(inputs: PlanInputs) -> Plan | None:
    """The query's plan: what every shard holds (`pool_items`) and the items the strategy declares
    (None: an unknown strategy)."""
    strategy = STRATEGIES.get(inputs.cfg.name)
    if strategy is None:
        return None
    own = None if strategy.plan is None else strategy.plan(inputs)
    items = pool_items(inputs, strategy.needs_model) + list(() if own is None else own.items)
    return Plan(tuple(items), len(inputs.shard_free), inputs.local)


def free_memory(inputs: PlanInputs, driver_device: str | torch.device) -> dict[tuple[str, str], int]:
    """What each process may still allocate. The shards of the local backend live in the driver's
    process (its check covers them); Ray shards are checked against this machine's RAM too (a
    cluster's other nodes cannot be seen from here), their GPUs only where this process sees one."""
    free: dict[tuple[str, str], int] = {}
    ram = free_ram_bytes()
    if ram is not None:
        free[("driver", "ram")] = ram
        if not inputs.local:
            free[("shard", "ram")] = ram
    gpu = free_gpu_bytes(driver_device) if inputs.driver_gpu else None
    if gpu is not None:
        free[("driver", "gpu")] = gpu
    if inputs.shard_gpu and torch.cuda.is_available():
        shard_gpu = free_gpu_bytes("cuda")
        if shard_gpu is not None:
            free[("shard", "gpu")] = shard_gpu
    return free


def check_plan(plan: Plan | None, inputs: PlanInputs, driver_device: str | torch.device) -> None:
    """A UserError (exit 2, one line) when the plan exceeds what a process has."""
    if plan is None:
        return
    short = shortfall(plan, free_memory(inputs, driver_device))
    if short is not None:
        raise UserError(f"{inputs.cfg.name} will not fit: {short}")
