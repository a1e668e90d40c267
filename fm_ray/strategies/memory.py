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
from fm_ray.core.memory import Plan, shortfall
from fm_ray.errors import UserError
from fm_ray.pool import partition
from fm_ray.pool.shard import BLOCK
from fm_ray.strategies import STRATEGIES, PlanInputs


def head_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(C, E) of the model's final nn.Linear: classes and penultimate width ((0, 0) without one)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return (heads[-1].out_features, heads[-1].in_features) if heads else (0, 0)


def activations(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Numbers every leaf module outputs for one sample of `input_shape` (one forward pass, on the CPU)."""
    total = [0]

    def count(_m: torch.nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    except Exception:  # a model that cannot take zeros (or this shape): its workspace is not planned
        return 0
    finally:
        for h in handles:
            h.remove()
    return total[0]


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
) -> PlanInputs:
    """The plan's inputs from the model and the pool as the shards will hold it (`pool.partition`);
    `input_shape` (one sample's) sizes the Fisher passes' workspace (None: not counted)."""
    parts = partition(pool_size, n_shards, BLOCK)
    members = [len(p) for p in parts]
    free = [int((~np.isin(p, labeled)).sum()) for p in parts]
    driver = driver or next(model.parameters()).device
    return PlanInputs(
        n_params=sum(p.numel() for p in model.parameters()),
        n_classes=n_classes,
        feat_dim=head_shape(model)[1],
        activations=0 if input_shape is None else activations(model, input_shape),
        shard_members=members,
        shard_free=free,
        n_labeled=len(labeled),
        k=k,
        cfg=cfg,
        shard_gpu=torch.device(shard_device).type == "cuda",
        driver_gpu=driver.type == "cuda",
        local=local,
    )


def query_plan(inputs: PlanInputs) -> Plan | None:
    """The plan the strategy declares (None: it holds nothing pool-sized worth planning)."""
    strategy = STRATEGIES.get(inputs.cfg.name)
    return None if strategy is None or strategy.plan is None else strategy.plan(inputs)


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
