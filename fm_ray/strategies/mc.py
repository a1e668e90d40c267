"""MC dropout on the shards: ``T`` draws of every member's class probabilities, block by block.

Where the dropout is: on the penultimate features (the input of the model's final ``nn.Linear``,
its head), as Baal's ``patch_module`` would place it in a model without dropout, with rate
``--mc-dropout p``; the backbone runs once, as trained, in eval mode (its cached features from
``shard.predictions()``), and only the head runs ``T`` times. Cheap (no extra backbone passes),
and shard-invariant: draw ``t``'s mask is keyed by (seed, round, draw, feature) only
(``core.bayes.dropout_masks``), one sampled head shared by every sample, as BatchBALD's joint needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fm_ray.core.bayes import dropout_masks, mc_log_probs, mc_seed
from fm_ray.core.memory import Item
from fm_ray.errors import UserError
from fm_ray.pool.shard import BLOCK, PoolShard
from fm_ray.strategies import PlanInputs, QueryContext

_MASK_TAG = 0xD20  # mc_seed's tag for the dropout masks
FIX_MC = "lower --mc-samples, or use more --shards"


@dataclass(frozen=True)
class MCDropout:
    """What a shard needs for a round's MC draws: ``T``, ``p`` and the masks' seed."""

    samples: int
    p: float
    seed: int

    @staticmethod
    def of(ctx: QueryContext) -> MCDropout:
        return MCDropout(ctx.cfg.mc_samples, ctx.cfg.mc_dropout, mc_seed(ctx.seed, ctx.round, _MASK_TAG))


def head_of(model: nn.Module) -> nn.Linear:
    """The final layer: the model's last ``nn.Linear`` in module order (``Classifier.head``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            "MC dropout goes before the model's final nn.Linear and this model has none: choose a model with one"
        )
    return linears[-1]


def mc_blocks(shard: PoolShard, mc: MCDropout) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(member positions, ``log_probs_b_T_C`` on the shard's device) for every block of members."""
    _, feats = shard.predictions()
    head = head_of(shard.model)
    if feats.shape[1] != head.in_features:
        raise UserError(
            f"the model's features have {feats.shape[1]} columns but its last nn.Linear takes {head.in_features}: "
            "MC dropout needs the features that layer sees (drop embed=, or give a model whose last layer is the head)"
        )
    masks_T_E = dropout_masks(mc.seed, mc.samples, feats.shape[1], mc.p).to(shard.device)
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    for pos in shard.blocks():
        yield pos, mc_log_probs(feats[pos].to(shard.device), weight, bias, masks_T_E)


def mc_items(x: PlanInputs, where: str) -> list[Item]:
    """The MC draws of one block and its feature copies, on the shard (``where``: ram or gpu)."""
    T, C, E = x.cfg.mc_samples, x.n_classes, x.feat_dim
    return [
        Item(
            "shard",
            where,
            "MC draws of one block",
            BLOCK * T * (E + 2 * C) * 4,
            f"{BLOCK} x T x (E + 2C) x 4 B = {BLOCK} x {T} x ({E} + 2 x {C}) x 4 B",
            ("embed",),
            FIX_MC,
        )
    ]
