"""Network slimming (Liu et al., 2017): train with an L1 penalty on the BatchNorm scales, then
drop the channels with the smallest |gamma| under one threshold across layers.

The penalty (`batchnorm_l1`, added to the loss by `sparseprune.train.train(penalty=...)`) pushes
the scales of unneeded channels towards zero while the network learns to do without them; only
then is |gamma| a fair measure of a channel's worth (ranking an unpenalised network's gamma is
plain filter pruning by another norm). `slim` prunes the filters of each conv followed by a
BatchNorm through the same masks as `filters(importance="bn")`; `sparseprune.shrink` deletes them.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from sparseprune.prune.amount import Amount, check_amount
from sparseprune.prune.api import check_min_kept, global_masks
from sparseprune.prune.layers import batchnorm_scale, conv_bn_pairs, filters
from sparseprune.prune.methods import MagnitudeUnstructured
from sparseprune.prune.reparam import _check_module, parameter_state


def batchnorm_l1(model: nn.Module) -> Tensor:
    """sum |gamma| over every BatchNorm of `model` (differentiable; 0 when there is none)."""
    model = _check_module(model, "model")
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            orig, mask = parameter_state(m, "weight")
            total = total + (orig * mask).abs().sum()  # not effective_weight: that one is detached
    return total


def slim(model: nn.Module, amount: Amount, *, min_kept: float = 0.0) -> Dict[nn.Conv2d, int]:
    """Prune `amount` (a fraction or a count) of the output channels of all the convs followed by
    a BatchNorm (`conv_bn_pairs`), lowest |gamma| first, one ranking across the layers; each conv
    keeps at least `min_kept` of its channels. Returns {conv: channels pruned}."""
    model = _check_module(model, "model")
    check_amount(amount)
    min_kept = check_min_kept(min_kept)
    pairs = conv_bn_pairs(model)
    if not pairs:
        raise ValueError("model has no conv followed by a BatchNorm2d: network slimming ranks BatchNorm scales")
    convs: List[nn.Conv2d] = list(pairs)
    scores = [batchnorm_scale(pairs[c]) for c in convs]
    alive = [parameter_state(pairs[c], "weight")[1] for c in convs]
    keep = global_masks(scores, alive, amount, MagnitudeUnstructured(), min_kept,
                        [f"{type(c).__name__} #{i} channels" for i, c in enumerate(convs)])
    pruned = {}
    for conv, k in zip(convs, keep):
        count = int((k == 0).sum())
        filters(conv, count, importance="bn", bn=pairs[conv])  # the same lowest-|gamma| channels
        pruned[conv] = count
    return pruned
