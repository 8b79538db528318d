"""Pruning: masks on module parameters, computed by small methods from importance scores.

Three separate pieces:
  * importance (`sparseprune.prune.importance`): how each entry or block is scored;
  * methods (`PruningMethod` subclasses): which entries go for a given amount, from the scores
    and the current mask (masks only ever remove more; `amount` is the total target);
  * application (`prune_parameter`, `prune_global`, `remove`): installing masks through
    torch.nn.utils.prune's reparametrisation (`weight_orig`, `weight_mask`, forward pre-hook),
    so torch's pruning utilities and sparseprune's work on each other's modules.

An int amount is a count (of entries, or of blocks for block pruning), a float a fraction.
"""
from sparseprune.prune.amount import amount_to_count, check_amount
from sparseprune.prune.api import (
    block_magnitude,
    global_magnitude,
    magnitude,
    prune_global,
    prune_parameter,
    random_unstructured,
)
from sparseprune.prune.importance import block_l2, l1_magnitude, random_scores
from sparseprune.prune.methods import BlockMagnitude, MagnitudeUnstructured, PruningMethod, RandomUnstructured
from sparseprune.prune.reparam import InstalledMask, is_pruned, remove
from sparseprune.prune.stats import sparsity

__all__ = [
    "BlockMagnitude",
    "InstalledMask",
    "MagnitudeUnstructured",
    "PruningMethod",
    "RandomUnstructured",
    "amount_to_count",
    "block_l2",
    "block_magnitude",
    "check_amount",
    "global_magnitude",
    "is_pruned",
    "l1_magnitude",
    "magnitude",
    "prune_global",
    "prune_parameter",
    "random_scores",
    "random_unstructured",
    "remove",
    "sparsity",
]
