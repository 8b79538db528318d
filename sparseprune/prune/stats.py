"""How sparse a model is: the share of exact zeros in each layer's effective weight."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from sparseprune.prune.api import LayerTypes, check_layer_types
from sparseprune.prune.reparam import _check_module, effective_weight, parameter_state

GLOBAL_KEY = "__global__"


def sparsity(model_or_module: nn.Module, layer_types: LayerTypes = (nn.Linear, nn.Conv2d)) -> Dict[str, float]:
    """{module path: fraction of zero weights} for each module of `layer_types`, plus
    "__global__": zeros / entries over all of them (0.0 when there are none).

    Counts exact zeros of the effective weight (`weight_orig * weight_mask` when pruned, which
    stays right after optimizer steps between forwards), so zeros the kernels can skip count
    whether they come from a mask or not. The model itself, if it is such a layer, is keyed by
    its class name.
    """
    model = _check_module(model_or_module, "model_or_module")
    types = check_layer_types(layer_types)
    result: Dict[str, float] = {}
    zeros = total = 0
    for path, module in model.named_modules():
        if not isinstance(module, types):
            continue
        try:
            orig, mask = parameter_state(module, "weight")
        except ValueError:
            continue  # no weight (e.g. a custom layer type): nothing to count
        with torch.no_grad():
            n_zero = int((effective_weight(orig, mask) == 0).sum())
        result[path or type(module).__name__] = n_zero / orig.numel() if orig.numel() else 0.0
        zeros += n_zero
        total += orig.numel()
    result[GLOBAL_KEY] = zeros / total if total else 0.0
    return result
