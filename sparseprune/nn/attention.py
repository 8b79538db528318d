"""Attention and Transformer-encoder modules whose projections can be native sparse kernels.

torch's nn.MultiheadAttention reads `in_proj_weight` and `out_proj.weight` directly (through
F.multi_head_attention_forward or its fused fast path), and nn.TransformerEncoderLayer /
nn.TransformerEncoder may take fused fast paths that read every weight of the layer. Replacing
their child modules therefore changes nothing (or breaks them). The modules here compute the
same math with every projection called as a module, so each one can be dense or sparse.

All of them are inference-only: dropout is the identity whatever `training` says.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseprune.nn.sparse_linear import SparseLinear

# make_linear(linear, path_suffix) -> the module to use for that projection (the dense
# nn.Linear itself, a SparseLinear, ...). The encoder layer also passes relu=True for linear1
# when its activation is ReLU: the returned module may then fuse it (and says so by `relu`).
MakeLinear = Callable[..., nn.Module]


def _additive_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """torch's mask convention as an additive float mask: bool True (masked) becomes -inf."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A standalone nn.Linear holding a copy of (weight, bias)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.detach())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def _row_splits(sparse: SparseLinear, parts: int) -> Tuple[SparseLinear, ...]:
    """`sparse` cut into `parts` equal row ranges, each packed in the same format."""
    dense = sparse.to_dense()
    fmt, block = sparse.packed.format, tuple(sparse.packed.block_shape)
    rows = dense.out_features // parts
    pieces = []
    for i in range(parts):
        part = slice(i * rows, (i + 1) * rows)
        piece = _linear(dense.weight[part], None if dense.bias is None else dense.bias[part])
        pieces.append(SparseLinear.from_dense(piece, fmt, block, num_threads=sparse.num_threads))
    return tuple(pieces)


class SparseMultiheadAttention(nn.Module):
    """nn.MultiheadAttention's forward, with each projection an ordinary (possibly sparse) module.

    Self-attention (query is key is value, the call TransformerEncoderLayer makes) runs the fused
    3E-row `in_proj` once. Other calls use `q_proj`/`k_proj`/`v_proj`: built at conversion from
    the in-projection (same kernel, split by rows) when `cross_attention=True`; without them a
    dense in_proj is applied through row slices of its weight, any other in_proj by projecting
    each input with all 3E rows and keeping its third (3x the work, still exact). Modules whose
    key/value dims differ from embed_dim have only the split projections.

    Attention itself is F.scaled_dot_product_attention, or an explicit softmax when the weights
    are asked for. Masks follow nn.MultiheadAttention: bool True means "do not attend", float
    masks are added to the scores.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        out_proj: nn.Module,
        in_proj: Optional[nn.Module] = None,
        q_proj: Optional[nn.Module] = None,
        k_proj: Optional[nn.Module] = None,
        v_proj: Optional[nn.Module] = None,
        batch_first: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        split = (q_proj, k_proj, v_proj)
        if any(p is None for p in split) and not all(p is None for p in split):
            raise ValueError("q_proj, k_proj and v_proj must be given together")
        if in_proj is None and q_proj is None:
            raise ValueError("give in_proj, or q_proj, k_proj and v_proj")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = bool(batch_first)
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if in_proj is not None and not self._qkv_same_embed_dim:
            raise ValueError("a fused in_proj needs kdim == vdim == embed_dim")
        self.in_proj = in_proj
        self.q_proj, self.k_proj, self.v_proj = split
        self.out_proj = out_proj

    @staticmethod
    def unsupported_reason(mha: nn.MultiheadAttention) -> Optional[str]:
        """Why `mha` cannot be rebuilt as a SparseMultiheadAttention, or None."""
        if type(mha).forward is not nn.MultiheadAttention.forward:
            return f"{type(mha).__name__} overrides forward"
        if mha.bias_k is not None or mha.bias_v is not None:
            return "add_bias_kv is not supported"
        if mha.add_zero_attn:
            return "add_zero_attn is not supported"
        weights = [mha.in_proj_weight, mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
        if any(w is not None and w.dtype != torch.float32 for w in weights):
            return "only float32 weights are supported"
        return None

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, make_linear: MakeLinear, cross_attention: bool = True
    ) -> "SparseMultiheadAttention":
        """Rebuild `mha`, asking make_linear(linear, suffix) for each projection.

        The suffixes are "in_proj" (or "q_proj", "k_proj", "v_proj" when kdim/vdim differ from
        embed_dim) and "out_proj". With cross_attention=False no separate q/k/v kernels are
        packed for a sparse in_proj (use it for modules only ever called as self-attention).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        reason = cls.unsupported_reason(mha)
        if reason is not None:
            raise ValueError(f"cannot convert this MultiheadAttention: {reason}")
        E = mha.embed_dim
        bias = mha.in_proj_bias
        in_proj = q_proj = k_proj = v_proj = None
        if mha._qkv_same_embed_dim:
            in_proj = make_linear(_linear(mha.in_proj_weight, bias), "in_proj")
            if cross_attention and isinstance(in_proj, SparseLinear):
                q_proj, k_proj, v_proj = _row_splits(in_proj, 3)
        else:
            biases = (None, None, None) if bias is None else bias.chunk(3)
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            q_proj, k_proj, v_proj = (
                make_linear(_linear(w, b), name)
                for w, b, name in zip(weights, biases, ("q_proj", "k_proj", "v_proj"))
            )
        out_proj = make_linear(mha.out_proj, "out_proj")
        converted = cls(
            E, mha.num_heads, out_proj, in_proj, q_proj, k_proj, v_proj,
            batch_first=mha.batch_first, kdim=mha.kdim, vdim=mha.vdim,
        )
        return converted.train(mha.training)

    # -- projections -------------------------------------------------------------------------

    def _project_one(self, x: Tensor, i: int) -> Tensor:
        """Projection i (0 = q, 1 = k, 2 = v) of x, for inputs that are not all the same tensor."""
        split = (self.q_proj, self.k_proj, self.v_proj)[i]
        if split is not None:
            return split(x)
        rows = slice(i * self.embed_dim, (i + 1) * self.embed_dim)
        if isinstance(self.in_proj, nn.Linear):
            bias = self.in_proj.bias
            return F.linear(x, self.in_proj.weight[rows], None if bias is None else bias[rows])
        return self.in_proj(x)[..., rows]

    def _in_project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self.in_proj is not None and query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        return self._project_one(query, 0), self._project_one(key, 1), self._project_one(value, 2)

    def _heads(self, x: Tensor, seq_first: bool) -> Tensor:
        """(N, L, E) or (L, N, E) -> (N, H, L, D)."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.permute(1, 2, 0, 3) if seq_first else x.transpose(1, 2)

    # -- masks -------------------------------------------------------------------------------

    def _merged_mask(
        self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
        n: int, tgt_len: int, src_len: int, dtype: torch.dtype,
    ) -> Optional[Tensor]:
        """One additive mask broadcastable to (N, H, L, S), or None."""
        merged = None
        attn = _additive_mask(attn_mask, "attn_mask", dtype)
        if attn is not None:
            if attn.dim() == 2 and attn.shape == (tgt_len, src_len):
                merged = attn.view(1, 1, tgt_len, src_len)
            elif attn.dim() == 3 and attn.shape == (n * self.num_heads, tgt_len, src_len):
                merged = attn.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(
                    f"attn_mask must have shape {(tgt_len, src_len)} or "
                    f"{(n * self.num_heads, tgt_len, src_len)}, got {tuple(attn.shape)}"
                )
        padding = _additive_mask(key_padding_mask, "key_padding_mask", dtype)
        if padding is not None:
            if padding.shape != (n, src_len):
                raise ValueError(f"key_padding_mask must have shape {(n, src_len)}, got {tuple(padding.shape)}")
            padding = padding.view(n, 1, 1, src_len)
            merged = padding if merged is None else merged + padding
        return merged

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"{name}: nested tensors are not supported by SparseMultiheadAttention")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 2-D (unbatched) or all 3-D, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features in its last dimension, got {tuple(t.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal is a hint that attn_mask is the causal mask: pass attn_mask too "
                "(nn.Transformer.generate_square_subsequent_mask makes one)"
            )

        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of 1 in batch-first layout
            same_kv = key is value
            same_qk = query is key
            query = query.unsqueeze(0)
            key = query if same_qk else key.unsqueeze(0)
            value = key if same_kv else value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_first = batched and not self.batch_first
        seq_dim, batch_dim = (0, 1) if seq_first else (1, 0)
        n, tgt_len, src_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        if key.shape[batch_dim] != n or value.shape[batch_dim] != n or value.shape[seq_dim] != src_len:
            raise ValueError(
                f"query, key and value disagree on batch or key/value sequence length: "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )

        # Projections run on the input as laid out; only their outputs are rearranged.
        q, k, v = (self._heads(t, seq_first) for t in self._in_project(query, key, value))

        # As in F.multi_head_attention_forward: the causal hint replaces the mask only when
        # nothing else needs the mask itself.
        causal_kernel = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal_kernel else self._merged_mask(
            attn_mask, key_padding_mask, n, tgt_len, src_len, q.dtype
        )

        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_kernel)

        # (N, H, L, D) -> the input layout with E features, contiguous for the out projection.
        if seq_first:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, n, self.embed_dim)
        else:
            out = out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _is_relu(fn: object) -> bool:
    return fn is F.relu or fn is torch.relu or isinstance(fn, nn.ReLU)


class SparseTransformerEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's slow-path math with self_attn, linear1 and linear2 as modules.

    norm_first or not, any activation; when linear1 has the ReLU fused (`linear1.relu is True`)
    the separate activation is skipped. Dropout is the identity (inference only). Masks may be
    bool or float, as for nn.TransformerEncoderLayer; nested tensors are not supported.
    """

    def __init__(
        self,
        self_attn: nn.Module,
        linear1: nn.Module,
        linear2: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module,
        activation: Callable[[Tensor], Tensor],
        norm_first: bool = False,
    ):
        super().__init__()
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {type(activation).__name__}")
        self.relu_fused = getattr(linear1, "relu", False) is True
        if self.relu_fused and not _is_relu(activation):
            raise ValueError("linear1 has a ReLU fused but the activation is not ReLU")
        self.self_attn = self_attn
        self.linear1 = linear1
        self.linear2 = linear2
        self.norm1 = norm1
        self.norm2 = norm2
        self.activation = activation
        self.norm_first = bool(norm_first)

    @staticmethod
    def unsupported_reason(layer: nn.TransformerEncoderLayer) -> Optional[str]:
        """Why `layer` cannot be rebuilt as a SparseTransformerEncoderLayer, or None."""
        base = nn.TransformerEncoderLayer
        for name in ("forward", "_sa_block", "_ff_block"):
            if getattr(type(layer), name) is not getattr(base, name):
                return f"{type(layer).__name__} overrides {name}"
        if not (isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear)):
            return "linear1 and linear2 must be nn.Linear"
        if not isinstance(layer.self_attn, nn.MultiheadAttention):
            return "self_attn must be an nn.MultiheadAttention"
        return None

    @classmethod
    def from_dense(
        cls,
        layer: nn.TransformerEncoderLayer,
        make_linear: MakeLinear,
        make_attention: Optional[Callable[[nn.MultiheadAttention], nn.Module]] = None,
    ) -> "SparseTransformerEncoderLayer":
        """Rebuild `layer` with make_linear(linear, suffix, relu=...) for linear1 ("linear1",
        relu=True when the activation is ReLU) and linear2 ("linear2"), and make_attention(mha)
        for self_attn (default: a SparseMultiheadAttention whose projections come from
        make_linear with suffixes "self_attn.in_proj", "self_attn.out_proj")."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"layer must be an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        reason = cls.unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"cannot convert this TransformerEncoderLayer: {reason}")
        if make_attention is None:
            def make_attention(mha: nn.MultiheadAttention) -> nn.Module:
                return SparseMultiheadAttention.from_dense(
                    mha, lambda lin, suffix: make_linear(lin, f"self_attn.{suffix}"), cross_attention=False
                )
        activation = layer.activation
        self_attn = make_attention(layer.self_attn)
        linear1 = make_linear(layer.linear1, "linear1", relu=_is_relu(activation))
        linear2 = make_linear(layer.linear2, "linear2")
        converted = cls(self_attn, linear1, linear2, layer.norm1, layer.norm2, activation, layer.norm_first)
        return converted.train(layer.training)

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], padding: Optional[Tensor], is_causal: bool) -> Tensor:
        return self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=padding, need_weights=False, is_causal=is_causal
        )[0]

    def _ff_block(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        if not self.relu_fused:
            h = self.activation(h)
        return self.linear2(h)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
        if src.is_nested:
            raise ValueError("src: nested tensors are not supported by SparseTransformerEncoderLayer")
        # Float masks, as nn.TransformerEncoderLayer hands them on (a kept nn.MultiheadAttention
        # then sees the same masks as in the original layer).
        src_mask = _additive_mask(src_mask, "src_mask", src.dtype)
        padding = _additive_mask(src_key_padding_mask, "src_key_padding_mask", src.dtype)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, padding, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, padding, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, relu_fused={self.relu_fused}"


def _left_aligned(valid: Tensor) -> bool:
    """Every row of `valid` (N, S) is a run of True followed by a run of False."""
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


class SparseTransformerEncoder(nn.Module):
    """nn.TransformerEncoder over layers that are not all nn.TransformerEncoderLayer.

    torch's encoder may pack a padded batch into a nested tensor and hand it to its layers
    (reading the first layer's weights to decide); a converted layer takes the padded batch
    with its key padding mask instead. Where torch would have taken the nested path
    (`zero_padding`, the original `use_nested_tensor`, and the same run-time conditions), the
    padded positions are zeroed before the final norm, as torch's unpacking does, so the
    output matches torch's everywhere.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        norm: Optional[nn.Module] = None,
        zero_padding: bool = False,
        mask_check: bool = True,
    ):
        super().__init__()
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError("layers must be a non-empty nn.ModuleList")
        self.layers = layers
        self.num_layers = len(layers)
        self.norm = norm
        self.zero_padding = bool(zero_padding)
        self.mask_check = bool(mask_check)

    @classmethod
    def from_dense(cls, encoder: nn.TransformerEncoder) -> "SparseTransformerEncoder":
        """Wrap `encoder`'s (already converted) layers and norm."""
        if not isinstance(encoder, nn.TransformerEncoder):
            raise TypeError(f"encoder must be an nn.TransformerEncoder, got {type(encoder).__name__}")
        converted = cls(
            encoder.layers, encoder.norm,
            zero_padding=getattr(encoder, "use_nested_tensor", False),
            mask_check=getattr(encoder, "mask_check", True),
        )
        return converted.train(encoder.training)

    def _torch_would_nest(self, src: Tensor, mask: Optional[Tensor], padding: Optional[Tensor]) -> bool:
        # The conditions of nn.TransformerEncoder.forward's nested-tensor path.
        if not self.zero_padding or padding is None or mask is not None or src.dim() != 3:
            return False
        first = self.layers[0]
        if first.training or not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled():
            return False
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())):
            return False
        return not self.mask_check or _left_aligned(padding == 0)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
        padding = _additive_mask(src_key_padding_mask, "src_key_padding_mask", src.dtype)
        mask = _additive_mask(mask, "mask", src.dtype)
        if is_causal is None:  # detect it, as torch does: only the mask's values count
            is_causal = False
            if mask is not None and src.dim() in (2, 3):
                batch_first = getattr(getattr(self.layers[0], "self_attn", None), "batch_first", False)
                seq_len = src.shape[1] if src.dim() == 3 and batch_first else src.shape[0]
                causal = torch.triu(
                    torch.full((seq_len, seq_len), float("-inf"), dtype=mask.dtype, device=mask.device), diagonal=1
                )
                is_causal = mask.shape == causal.shape and bool((mask == causal).all())
        zero_padded = self._torch_would_nest(src, mask, padding)
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=padding)
        if zero_padded:
            out = out.masked_fill((padding != 0).unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, zero_padding={self.zero_padding}"
