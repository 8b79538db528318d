"""Lowering of attention: nn.MultiheadAttention, nn.TransformerEncoder(Layer),
scaled dot-product attention and matmul between activations."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import fx, nn

from sparseprune.compile.torch_ops import _ACTIVATION_FUNCTIONS, _ACTIVATION_MODULES
from sparseprune.compile.values import _NotComputed, _Tensor


class AttentionLowering:
    """Attention lowering, a mixin of compile's _Lowering (self is the lowering: fail, tensor,
    emit, linear_op... come from there)."""

    def lower_mha(self, node: fx.Node, m: nn.MultiheadAttention, path: str, query: int, key: int, value: int,
                  key_padding_mask=None, attn_mask=None, is_causal: bool = False) -> int:
        """nn.MultiheadAttention (batch_first) as q/k/v linears, one attention op and out_proj."""
        if not m.batch_first:
            raise self.fail(node, "MultiheadAttention(batch_first=False): the executor needs the batch first "
                                  "(build it with batch_first=True)")
        if m.bias_k is not None or m.add_zero_attn:
            raise self.fail(node, "MultiheadAttention with add_bias_kv or add_zero_attn")
        if attn_mask is not None:
            raise self.fail(node, "attn_mask is not supported (a bool key_padding_mask input is, and a causal mask "
                                  "through F.scaled_dot_product_attention(is_causal=True))")
        mask = self.padding_mask(node, key_padding_mask, self.shape_of(key)[0])
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            weights = [w[:e], w[e:2 * e], w[2 * e:]]
        else:
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        b = m.in_proj_bias
        biases = [None, None, None] if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
        projected = []
        for part, src, w_t, b_t in zip("qkv", (query, key, value), weights, biases):
            if len(self.shape_of(src)) != 2:
                raise self.fail(node, f"its {part} input has per-sample shape {self.shape_of(src)}, expected "
                                      "(sequence, features)")
            pair = self._param_pairs.setdefault((id(m), part), (w_t, b_t))
            op, shape = self.linear_op(node, src, pair, f"{path}.in_proj.{part}")
            projected.append(self.emit_shaped(op, shape, f"{path}.{part}"))
        q, k, v = projected
        head_dim = e // m.num_heads
        op = {"op": "attention", "q": q, "k": k, "v": v, "layout": "sequence_first", "heads": int(m.num_heads),
              "scale": 1.0 / math.sqrt(head_dim), "causal": bool(is_causal), "name": f"{path}.attention"}
        if mask is not None:
            op["key_mask"] = mask
        att = self.emit_shaped(op, self.shape_of(q)[:1] + self.shape_of(v)[1:], f"{path}.attention")
        op, shape = self.linear_op(node, att, m.out_proj, f"{path}.out_proj")
        return self.emit_shaped(op, shape, f"{path}.out_proj")

    def lower_encoder_layer(self, node: fx.Node, layer: nn.TransformerEncoderLayer, path: str, src: int,
                            padding: Any = None) -> int:
        """nn.TransformerEncoderLayer (batch_first, no masks): attention and feed-forward blocks with
        their residual adds and layer norms, post- or pre-norm."""
        act = layer.activation
        kind = _ACTIVATION_FUNCTIONS.get(act) or _ACTIVATION_MODULES.get(type(act))
        if kind is None or (isinstance(act, nn.GELU) and act.approximate != "none"):
            raise self.fail(node, f"encoder layer activation {act!r}")

        def norm(x: int, ln: nn.LayerNorm, name: str) -> int:
            return self.norm_module(node, x, ln, name)

        def add(a: int, b: int, name: str) -> int:
            return self.emit_shaped({"op": "add", "a": a, "b": b, "activation": None, "name": name},
                                    self.shape_of(a), name)

        def attention_block(x: int) -> int:
            return self.lower_mha(node, layer.self_attn, f"{path}.self_attn", x, x, x, key_padding_mask=padding)

        def feed_forward(x: int) -> int:
            op, shape = self.linear_op(node, x, layer.linear1, f"{path}.linear1", kind)
            hidden = self.emit_shaped(op, shape, f"{path}.linear1")
            op, shape = self.linear_op(node, hidden, layer.linear2, f"{path}.linear2")
            return self.emit_shaped(op, shape, f"{path}.linear2")

        x = src
        if layer.norm_first:
            x = add(x, attention_block(norm(x, layer.norm1, f"{path}.norm1")), f"{path}.add1")
            x = add(x, feed_forward(norm(x, layer.norm2, f"{path}.norm2")), f"{path}.add2")
        else:
            x = norm(add(x, attention_block(x), f"{path}.add1"), layer.norm1, f"{path}.norm1")
            x = norm(add(x, feed_forward(x), f"{path}.add2"), layer.norm2, f"{path}.norm2")
        return x

    def norm_module(self, node: fx.Node, x: int, ln: nn.Module, name: str) -> int:
        """A LayerNorm inside a lowered encoder (its layers' norm1/norm2, the encoder's final norm)
        over the last dimension; no weight (elementwise_affine=False) or no bias (bias=False) are
        the identity scale / zero shift."""
        n = self.shape_of(x)[-1]
        if type(ln) is not nn.LayerNorm:
            raise self.fail(node, f"encoder norm '{name}' is a {type(ln).__name__} (only nn.LayerNorm is supported)")
        if tuple(ln.normalized_shape) != (n,):
            raise self.fail(node, f"encoder norm '{name}' over {tuple(ln.normalized_shape)}: only the last "
                                  f"dimension ({n},) is supported")
        self.arrays[f"{name}.gamma"] = (np.ones(n, np.float32) if ln.weight is None
                                        else ln.weight.detach().float().cpu().numpy().reshape(-1).copy())
        self.arrays[f"{name}.beta"] = (np.zeros(n, np.float32) if ln.bias is None
                                       else ln.bias.detach().float().cpu().numpy().reshape(-1).copy())
        return self.emit_shaped({"op": "layernorm", "in": x, "weight": name, "eps": float(ln.eps), "name": name},
                                self.shape_of(x), name)

    def padding_mask(self, node: fx.Node, mask: Any, keys: int):
        """The buffer of a key padding mask (a bool model input of shape (batch, keys), True =
        padding), or None."""
        if mask is None:
            return None
        if not (isinstance(mask, _Tensor) and mask.buffer in self.mask_buffers):
            raise self.fail(node, "a key padding mask must be a bool input of the model (True = padding); float "
                                  "and computed masks are not supported")
        if self.shape_of(mask.buffer) != (keys,):
            raise self.fail(node, f"the key padding mask has per-sample shape {self.shape_of(mask.buffer)}, "
                                  f"expected ({keys},)")
        return mask.buffer

    def lower_attention_module(self, node: fx.Node, m: nn.Module) -> Any:
        path = node.target
        args = [self.arg(node, i, "") for i in range(len(node.args))]
        kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        if isinstance(m, nn.MultiheadAttention):
            names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                     "average_attn_weights", "is_causal"]
            bound = dict(zip(names, args), **kwargs)
            q, k, v = (self.tensor(node, bound.get(n), n) for n in ("query", "key", "value"))
            out = self.lower_mha(node, m, path, q, k, v, bound.get("key_padding_mask"), bound.get("attn_mask"),
                                 bool(bound.get("is_causal", False)))
            return (_Tensor(out), _NotComputed("the attention weights (need_weights=True)"))
        names = ["src", "mask" if isinstance(m, nn.TransformerEncoder) else "src_mask", "src_key_padding_mask",
                 "is_causal"]
        bound = dict(zip(names, args), **kwargs)
        if bound.get(names[1]) is not None or bound.get("is_causal"):
            raise self.fail(node, f"encoder attention masks ({names[1]} / is_causal) are not supported (a bool "
                                  "src_key_padding_mask input is)")
        padding = bound.get("src_key_padding_mask")
        if padding is not None and isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            raise self.fail(node, "an encoder with a padding mask and nested tensors (torch zeroes padded positions "
                                  "then): build it with enable_nested_tensor=False")
        x = self.tensor(node, bound.get("src"), "src")
        if isinstance(m, nn.TransformerEncoderLayer):
            layers, final_norm = [("", m)], None
        else:
            layers, final_norm = [(f".layers.{i}", layer) for i, layer in enumerate(m.layers)], m.norm
        for suffix, layer in layers:
            if not (type(layer) is nn.TransformerEncoderLayer and layer.self_attn.batch_first):
                raise self.fail(node, "encoder layers must be batch_first nn.TransformerEncoderLayer")
            x = self.lower_encoder_layer(node, layer, path + suffix, x, padding)
        if final_norm is not None:
            x = self.norm_module(node, x, final_norm, f"{path}.norm")
        return self.reshape(node, x)

    def matmul(self, node: fx.Node, a_value: Any, b_value: Any) -> _Tensor:
        a = self.tensor(node, a_value, "first operand")
        b = self.tensor(node, b_value, "second operand")
        sa, sb = self.shape_of(a), self.shape_of(b)
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            raise self.fail(node, f"matmul of per-sample shapes {sa} and {sb}: both operands need the same "
                                  "rank >= 2 (with the batch, >= 3) and the same leading dimensions (no broadcasting)")
        transpose_b = b in self.transposed  # read the source of a transpose directly (its copy becomes dead)
        op = {"op": "matmul", "a": a, "b": self.transposed.get(b, b), "transpose_b": transpose_b, "scale": 1.0,
              "name": node.name}
        return self.emit(op, node)

    def sdpa(self, node: fx.Node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False) -> _Tensor:
        if attn_mask is not None:
            raise self.fail(node, "attn_mask is not supported (is_causal=True is)")
        if dropout_p != 0.0:
            raise self.fail(node, f"dropout_p={dropout_p!r} (the executable is for inference: pass 0.0 in eval)")
        if enable_gqa:
            raise self.fail(node, "enable_gqa=True")
        bq, bk, bv = (self.tensor(node, t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
        sq, sk, sv = self.shape_of(bq), self.shape_of(bk), self.shape_of(bv)
        if len(sq) < 2 or not (len(sq) == len(sk) == len(sv)) or not (sq[:-2] == sk[:-2] == sv[:-2]):
            raise self.fail(node, f"query/key/value per-sample shapes {sq}, {sk}, {sv} (no broadcasting)")
        scale = 1.0 / math.sqrt(sq[-1]) if scale is None else float(scale)
        return self.emit({"op": "attention", "q": bq, "k": bk, "v": bv, "layout": "heads_first", "heads": 1,
                          "scale": scale, "causal": bool(is_causal), "name": node.name}, node)
