"""The torch modules and functions the lowering recognises, and the fx tracer it uses."""
from __future__ import annotations

import operator
from typing import List

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparseprune.nn.sparse_conv import SparseConv2d
from sparseprune.nn.sparse_linear import SparseLinear

_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
}
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardswish: "hardswish",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_SUB = (operator.sub, torch.sub)
_DIV = (operator.truediv, torch.div)


# torch's attention modules branch on tensor properties (fast paths) and cannot be traced: they
# stay whole and are lowered from their parameters (_Lowering.lower_mha and friends).
_ATTENTION_LEAVES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


class _Tracer(fx.Tracer):
    """fx's tracer, also keeping sparseprune's native modules (their forward is numpy) and torch's
    attention modules whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (SparseLinear, SparseConv2d)) or type(m) in _ATTENTION_LEAVES
                or super().is_leaf_module(m, module_qualified_name))


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _fn_name(target) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch") or module == "":
        # F.linear, F.gelu, F.scaled_dot_product_attention... are builtins of torch._C._nn
        prefix = "torch.nn.functional" if module in ("torch.nn.functional", "torch._C._nn") else "torch"
        return f"{prefix}.{name}"
    return f"{module}.{name}"
