"""Capturable stand-ins, swapped into compile's copy of the model before torch.export.

sparseprune's converted layers (SparseLinear, SparseConv2d run numpy in forward) become the
equivalent nn.Linear / nn.Conv2d again (their packed weights read back, a fused ReLU kept): the
lowering packs their weights as convert did (converted_layers).

nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder export to ATen graphs
that move the batch axis (MHA computes in (L, N, E) layout, or calls fused fast-path kernels) and
turn masks into float tensors with zeros_like + masked_fill. rewrite_for_capture() replaces each
module of exactly those types (subclasses with a forward of their own are left alone) by a
subclass (of the same name) whose forward computes the same outputs batch first, from the SAME
parameters and
submodules (no copies): q/k/v projections (nn.Linear children `in_proj.q/k/v` whose weights are
views of the packed in_proj_weight, or of q/k/v_proj_weight), heads as view + transpose,
F.scaled_dot_product_attention with one mask, and out_proj.

Masks, as torch reads them: key_padding_mask (batch, S), True = padding; attn_mask (L, S), True =
masked out; float masks are added to the scores. Bool masks stay bool (combined with & into the
"may attend" mask SDPA takes); when either is float both become additive, as torch does.

The stand-ins follow the path torch takes in inference (eval, no_grad), where its paths differ:
- a query whose keys are all masked gets NaN on the fast paths (MHA self-attention with bool or no
  masks; the encoder layer's fused kernel) and with need_weights=True, zeros on the SDPA path. The
  NaN rows are marked with arithmetic the executor runs: 0 * rsqrt(fraction of allowed keys) + 1
  is 1, or NaN for a row with no allowed key (0 * sum(softmax(mask)) + 1 for float masks);
- the fused encoder kernel applies the mask whatever is_causal says, reads a float mask as bool
  (nonzero = masked) and runs exact GELU for any nn.GELU; the SDPA path lets is_causal replace the
  mask when no padding mask must be merged into it.
"""
from __future__ import annotations

import functools

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseprune.compile.errors import CONVERT_HINT, UnsupportedOperation
from sparseprune.convert.native_module import make_torch
from sparseprune.nn.sparse_conv import SparseConv2d
from sparseprune.nn.sparse_linear import SparseLinear


def _refuse(path: str, module: nn.Module, why: str) -> UnsupportedOperation:
    where = f"module '{path}'" if path else "the model"
    return UnsupportedOperation(f"cannot compile {where} ({type(module).__name__}): {why}. {CONVERT_HINT}")


def _linear_view(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """An nn.Linear whose parameters alias `weight` / `bias` (views: no copy)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = int(weight.shape[1]), int(weight.shape[0])
    layer.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return layer


def _adopt(cls: type, module: nn.Module, path: Optional[str] = None) -> nn.Module:
    """An instance of `cls` (a subclass of module's type) sharing module's parameters, buffers,
    submodules and attributes, so model code reading them sees the same public face; `path` (the
    module's name in the model) is kept for messages."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), \
        dict(module._modules)
    if path is not None:
        new._sp_path = path
    return new


def _additive(masked: Tensor) -> Tensor:
    """A bool mask (True = masked out) as the additive 0 / -inf mask torch makes of it, in
    arithmetic the executor runs: 1 - rsqrt(1 - m) is 1 - 1 = 0, or 1 - inf = -inf."""
    return 1.0 - torch.rsqrt(1.0 - masked.to(torch.float32))


def _allowed_rows(mask: Tensor, additive: bool) -> Tensor:
    """1 for each query row (over the last axis) of `mask` that keeps a key, NaN for one that keeps none."""
    if additive:  # softmax of a row of -inf is NaN, of anything else sums to 1
        return torch.softmax(mask, dim=-1).sum(-1) * 0.0 + 1.0
    return torch.rsqrt(mask.to(torch.float32).mean(-1)) * 0.0 + 1.0  # rsqrt(0) = inf, 0 * inf = NaN


# The stand-ins carry torch's class names (errors and module paths read as the user's model does).


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (batch_first) computed batch first; see the module docstring."""

    _sp_path: str

    @classmethod
    def adopt(cls, m: nn.MultiheadAttention, path: str) -> "MultiheadAttention":
        new = _adopt(cls, m, path)
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            weights = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        b = m.in_proj_bias
        biases = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        in_proj = nn.Module()
        for part, w_t, b_t in zip("qkv", weights, biases):
            in_proj.add_module(part, _linear_view(w_t, b_t))
        new.add_module("in_proj", in_proj)
        return new

    def check(self) -> None:
        if not self.batch_first:
            raise _refuse(self._sp_path, self, "MultiheadAttention(batch_first=False): the executor needs the batch "
                                               "first (build it with batch_first=True)")
        if self.bias_k is not None or self.add_zero_attn:
            raise _refuse(self._sp_path, self, "MultiheadAttention with add_bias_kv or add_zero_attn")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        masks = [m for m in (key_padding_mask, attn_mask) if m is not None]
        # torch's fast path: self-attention in inference with bool (or no) masks (it ignores is_causal)
        fast = (torch.backends.mha.get_fastpath_enabled() and query is key and key is value
                and self.in_proj_bias is not None and self._qkv_same_embed_dim and not self.training
                and self.num_heads % 2 == 0 and not any(torch.is_floating_point(m) for m in masks))
        return self.attend(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                           is_causal, nan_rows=fast or need_weights)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
               need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool, is_causal: bool,
               nan_rows: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """The attention; nan_rows: a query with no key allowed gives NaN (else zeros, as SDPA)."""
        self.check()
        if query.dim() != 3:
            raise _refuse(self._sp_path, self, f"an unbatched {query.dim()}-D query (the executor needs (batch, "
                                               "sequence, features))")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
                raise _refuse(self._sp_path, self, f"a {m.dtype} {name} (torch takes bool or float masks)")
        if attn_mask is not None and attn_mask.dim() != 2:
            raise _refuse(self._sp_path, self, f"a {attn_mask.dim()}-D attn_mask (only (L, S) masks: a "
                                               "(batch * heads, L, S) mask mixes the batch into its first axis)")
        if is_causal and attn_mask is None:
            raise _refuse(self._sp_path, self, "is_causal=True without attn_mask (torch needs the causal attn_mask "
                                               "with this hint; nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch's slow path: the hint replaces the mask
        else:
            is_causal = False
        heads = self.num_heads
        q, k, v = (proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for proj, x in zip((self.in_proj.q, self.in_proj.k, self.in_proj.v), (query, key, value)))
        mask, additive = self._merged_mask(key_padding_mask, attn_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        out = out.transpose(1, 2).flatten(2)  # (batch, L, embed_dim)
        if nan_rows and mask is not None:
            rows = _allowed_rows(mask, additive)  # (batch or 1, 1, L or 1)
            out = out * rows.squeeze(1).unsqueeze(-1)
        out = self.out_proj(out)
        if not need_weights:
            return out, None
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + (mask if additive else _additive(~mask))
        weights = torch.softmax(scores, dim=-1)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)

    @staticmethod
    def _merged_mask(key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], bool]:
        """One 4-D mask broadcasting to (batch, heads, L, S): bool "may attend" when every mask given
        is bool, else additive (a bool mask becoming 0 / -inf, as torch's _canonical_mask)."""
        parts = []
        if key_padding_mask is not None:
            parts.append(key_padding_mask[:, None, None, :])
        if attn_mask is not None:
            parts.append(attn_mask[None, None])
        if not parts:
            return None, False
        if all(p.dtype == torch.bool for p in parts):
            allowed = ~parts[0]
            for p in parts[1:]:
                allowed = allowed & ~p
            return allowed, False
        additive = [p if torch.is_floating_point(p) else _additive(p) for p in parts]
        total = additive[0]
        for p in additive[1:]:
            total = total + p
        return total, True


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer computed with the capturable self-attention."""

    _sp_path: str

    def fused_path(self) -> bool:
        """Whether torch runs this layer (batched, in inference) through its fused kernel."""
        attn = self.self_attn
        return bool(torch.backends.mha.get_fastpath_enabled() and not self.training and attn.batch_first
                    and attn.in_proj_bias is not None and attn._qkv_same_embed_dim and self.activation_relu_or_gelu
                    and self.norm1.eps == self.norm2.eps and attn.num_heads % 2 == 0
                    and not any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules()))

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x: Tensor) -> Tensor:
        act = self.activation
        if self.fused_path():  # the fused kernel runs relu or exact gelu (even for GELU(approximate='tanh'))
            act = F.relu if self.activation_relu_or_gelu == 1 else F.gelu
        return self.dropout2(self.linear2(self.dropout(act(self.linear1(x)))))

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool = False) -> Tensor:
        attn = self.self_attn
        if isinstance(attn, MultiheadAttention):
            fused = self.fused_path()
            if fused:  # the fused kernel ignores the hint (torch's slow path would raise without a mask)
                is_causal = False  # and reads a float mask as bool: nonzero = masked
                attn_mask, key_padding_mask = (m != 0 if m is not None and torch.is_floating_point(m) else m
                                               for m in (attn_mask, key_padding_mask))
            x = attn.attend(x, x, x, key_padding_mask, False, attn_mask, True, is_causal, nan_rows=fused)[0]
        else:
            x = attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                     is_causal=is_causal)[0]
        return self.dropout1(x)


class TransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder looping its (capturable) layers, then its final norm."""

    _sp_path: str

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        if src_key_padding_mask is not None and getattr(self, "use_nested_tensor", False) and \
                torch.backends.mha.get_fastpath_enabled():
            raise _refuse(self._sp_path, self, "an encoder with a padding mask and nested tensors (torch zeroes "
                                               "padded positions then): build it with enable_nested_tensor=False")
        # torch detects a causal mask by its values; the mask itself is applied either way
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=bool(is_causal))
        if self.norm is not None:
            output = self.norm(output)
        return output


class _LinearReLU(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(super().forward(input))


class _Conv2dReLU(nn.Conv2d):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(super().forward(input))


def _dense_layer(layer: nn.Module, path: str) -> nn.Module:
    """A converted SparseLinear / SparseConv2d as the nn.Linear / nn.Conv2d it computes (the
    converted layer kept beside it, not as a submodule: see converted_layers)."""
    dense = layer.to_dense()
    if layer.relu:
        dense = _adopt(_LinearReLU if isinstance(dense, nn.Linear) else _Conv2dReLU, dense)
    dense.__dict__["_sp_converted"] = layer
    return dense


def converted_layers(model: nn.Module) -> Dict[Tuple[int, Tuple[int, ...]], nn.Module]:
    """(data pointer, shape) of each stand-in's weight -> the SparseLinear / SparseConv2d it
    replaced: the lowering packs those as convert did (the same arrays and kernel)."""
    return {(m.weight.data_ptr(), tuple(m.weight.shape)): m.__dict__["_sp_converted"]
            for m in model.modules() if "_sp_converted" in m.__dict__}


_REWRITES = {
    nn.MultiheadAttention: MultiheadAttention.adopt,
    nn.TransformerEncoderLayer: functools.partial(_adopt, TransformerEncoderLayer),
    nn.TransformerEncoder: functools.partial(_adopt, TransformerEncoder),
    SparseLinear: _dense_layer,
    SparseConv2d: _dense_layer,
}


def rewrite_for_capture(model: nn.Module) -> nn.Module:
    """Replace, in place, every module of exactly one of the types above (children first) by its
    capturable stand-in; returns the model (itself replaced when it is one)."""
    done = {}  # id(module) -> its stand-in: a module used in two places is replaced once

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = visit(child, f"{path}.{name}" if path else name)
        make_torch(module)  # a module convert made native is captured from its own torch forward
        stand_in = _REWRITES.get(type(module))
        done[id(module)] = module if stand_in is None else stand_in(module, path)
        return done[id(module)]

    return visit(model, "")
