"""Copying models that are in the middle of pruning."""
from __future__ import annotations

import copy

import torch
from torch import nn


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also for models pruned by torch.nn.utils.prune with grad enabled.

    Their `weight` attribute is then a non-leaf tensor (weight_orig * weight_mask), which
    deepcopy refuses; the copy gets it detached, and the forward pre-hook recomputes it anyway.
    The original model is left exactly as it was.
    """
    saved = []
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                saved.append((module, key, value))
                setattr(module, key, value.detach())
    try:
        return copy.deepcopy(model)
    finally:
        for module, key, value in saved:
            setattr(module, key, value)
