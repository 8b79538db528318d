"""convert() handlers for nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder.

torch's attention modules read their projection weights directly (and may take fused fast
paths), so their children cannot simply be swapped. Each handler asks convert_linear for every
projection (so each one is in the report under e.g. `encoder.layers.0.self_attn.in_proj`), and
rebuilds the module from sparseprune.nn.attention only when at least one projection went
sparse; otherwise the original module is kept, with torch's fast paths.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from sparseprune.convert.converter import (
    ConvertContext,
    _walk,
    convert_linear,
    record_left,
    register_converter,
)
from sparseprune.nn.attention import (
    SparseMultiheadAttention,
    SparseTransformerEncoder,
    SparseTransformerEncoderLayer,
)


class _Projections:
    """make_linear for one module: convert_linear under `path`, remembering if any went sparse."""

    def __init__(self, path: str, ctx: ConvertContext):
        self.path = path
        self.ctx = ctx
        self.any_sparse = False

    def __call__(self, linear: nn.Linear, suffix: str, relu: bool = False) -> nn.Module:
        saved = self.ctx.fuse_relu
        self.ctx.fuse_relu = relu
        try:
            module = convert_linear(linear, f"{self.path}.{suffix}", self.ctx)
        finally:
            self.ctx.fuse_relu = saved
        if module is not linear:
            self.any_sparse = True
        return module


def _attention_weight(mha: nn.MultiheadAttention) -> Optional[Tensor]:
    return mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight


def _convert_attention(mha: nn.MultiheadAttention, path: str, ctx: ConvertContext, cross_attention: bool) -> nn.Module:
    reason = SparseMultiheadAttention.unsupported_reason(mha)
    if reason is not None:
        record_left(ctx, path, mha, _attention_weight(mha), f"left dense: {reason}")
        return mha
    projections = _Projections(path, ctx)
    converted = SparseMultiheadAttention.from_dense(mha, projections, cross_attention=cross_attention)
    return converted if projections.any_sparse else mha


def convert_multihead_attention(mha: nn.MultiheadAttention, path: str, ctx: ConvertContext) -> nn.Module:
    """A SparseMultiheadAttention when any projection goes sparse, else `mha` itself.

    A standalone module may be used for cross-attention, so a sparse in-projection is also
    packed as separate q/k/v kernels.
    """
    return _convert_attention(mha, path, ctx, cross_attention=True)


def convert_transformer_encoder_layer(
    layer: nn.TransformerEncoderLayer, path: str, ctx: ConvertContext
) -> nn.Module:
    """A SparseTransformerEncoderLayer when any projection goes sparse, else `layer` itself.

    linear1 is converted with the ReLU fused when that is the activation. An attention block
    that stays dense (or cannot be converted) is kept as the original nn.MultiheadAttention.
    """
    reason = SparseTransformerEncoderLayer.unsupported_reason(layer)
    if reason is not None:
        weight = getattr(getattr(layer, "linear1", None), "weight", None)
        record_left(ctx, path, layer, weight if isinstance(weight, Tensor) else None, f"left dense: {reason}")
        return layer
    projections = _Projections(path, ctx)

    def make_attention(mha: nn.MultiheadAttention) -> nn.Module:
        converted = _convert_attention(mha, f"{path}.self_attn", ctx, cross_attention=False)
        projections.any_sparse |= converted is not mha
        return converted

    converted = SparseTransformerEncoderLayer.from_dense(layer, projections, make_attention)
    return converted if projections.any_sparse else layer


def convert_transformer_encoder(encoder: nn.TransformerEncoder, path: str, ctx: ConvertContext) -> nn.Module:
    """Convert the layers; if any changed, a SparseTransformerEncoder replaces torch's encoder
    (whose nested-tensor fast path reads the first layer's weights directly)."""
    saved = ctx.fuse_relu
    before = list(encoder.layers)
    try:
        _walk(encoder, path, ctx)
    finally:
        ctx.fuse_relu = saved
    if all(old is new for old, new in zip(before, encoder.layers)):
        return encoder
    return SparseTransformerEncoder.from_dense(encoder)


register_converter(nn.MultiheadAttention, convert_multihead_attention)
register_converter(nn.TransformerEncoderLayer, convert_transformer_encoder_layer)
register_converter(nn.TransformerEncoder, convert_transformer_encoder)
