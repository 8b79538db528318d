"""convert() on nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder.

Every converted model is checked against the original in eval mode: torch's own (fast or slow)
path is the reference.
"""
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch import nn

from sparseprune import convert
from sparseprune.nn import SparseLinear
from sparseprune.nn.attention import (
    SparseMultiheadAttention,
    SparseTransformerEncoder,
    SparseTransformerEncoderLayer,
)

E, HEADS, FF = 32, 4, 64
N, L, S = 3, 6, 5  # batch, target length, source length (cross-attention)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _convert(model: nn.Module) -> nn.Module:
    # No timing (see test_mha_measured_policy for the measuring path), kernels on one thread.
    return convert(model, policy="threshold", num_threads=1)


def _randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def _prune_(module: nn.Module, rng: np.random.Generator, fraction: float = 0.85) -> nn.Module:
    """Zero `fraction` of every weight matrix in place; random biases and norm parameters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.from_numpy(rng.random(p.shape) >= fraction))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + _randn(rng, *p.shape, scale=0.1))
            else:
                p.copy_(_randn(rng, *p.shape, scale=0.1))
    return module.eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-4)


def _layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """A batch-first tensor in the module's layout."""
    return x if batch_first else x.transpose(0, 1).contiguous()


def _padding(n: int, s: int, pads: List[int]) -> torch.Tensor:
    """Bool key padding mask: row b has its last pads[b] positions masked (never all)."""
    mask = torch.zeros(n, s, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p:
            mask[b, s - p:] = True
    return mask


def _bool_attn_mask(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    mask = torch.from_numpy(rng.random(shape) < 0.3)
    mask[..., 0] = False  # every query keeps a key (no fully masked row)
    return mask


def _float(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def _mask_cases(rng: np.random.Generator, tgt: int, src: int) -> Dict[str, dict]:
    kpm = _padding(N, src, [0, 2, 1])
    attn = _bool_attn_mask(rng, tgt, src)
    attn3d = _bool_attn_mask(rng, N * HEADS, tgt, src)
    soft = _randn(rng, tgt, src)
    soft[attn] = float("-inf")
    return {
        "none": {},
        "bool_kpm": {"key_padding_mask": kpm},
        "bool_attn": {"attn_mask": attn},
        "bool_both": {"key_padding_mask": kpm, "attn_mask": attn},
        "bool_3d": {"attn_mask": attn3d},
        "float_kpm": {"key_padding_mask": _float(kpm)},
        "float_attn": {"attn_mask": soft},
        "float_both": {"key_padding_mask": _float(kpm), "attn_mask": soft},
    }


def _check_mha_calls(original: nn.Module, converted: nn.Module, args, masks: Dict[str, dict]) -> None:
    with torch.no_grad():
        for name, kwargs in masks.items():
            for need_weights, average in ((False, True), (True, True), (True, False)):
                kw = dict(kwargs, need_weights=need_weights, average_attn_weights=average)
                out, weights = converted(*args, **kw)
                ref_out, ref_weights = original(*args, **kw)
                _assert_close(out, ref_out)
                if need_weights:
                    assert weights is not None, name
                    _assert_close(weights, ref_weights)
                else:
                    assert weights is None and ref_weights is None, name


class _Holder(nn.Module):
    """A model with an attention submodule (MHA returns a tuple, so not in a Sequential)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def _paths(model: nn.Module) -> Dict[str, str]:
    return {c.path: c.kernel for c in model.sparseprune_report.layers}


# --- MultiheadAttention -----------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches(rng, batch_first, bias):
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first), rng))
    converted = _convert(model)
    attn = converted.attn
    assert isinstance(attn, SparseMultiheadAttention)
    assert isinstance(attn.in_proj, SparseLinear) and isinstance(attn.out_proj, SparseLinear)
    assert _paths(converted) == {"attn.in_proj": "csr", "attn.out_proj": "csr"}
    x = _layout(_randn(rng, N, L, E), batch_first)
    _check_mha_calls(model, converted, (x, x, x), _mask_cases(rng, L, L))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_cross_attention_matches(rng, batch_first, bias):
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first), rng))
    converted = _convert(model)
    attn = converted.attn
    # A standalone module keeps split kernels for cross-attention, cut from the fused one.
    assert all(isinstance(p, SparseLinear) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = _layout(_randn(rng, N, L, E), batch_first)
    mem = _layout(_randn(rng, N, S, E), batch_first)
    _check_mha_calls(model, converted, (q, mem, mem), _mask_cases(rng, L, S))
    other = _layout(_randn(rng, N, S, E), batch_first)
    _check_mha_calls(model, converted, (q, mem, other), {"none": {}})


def test_mha_self_attention_module_without_split_kernels(rng):
    """An in_proj without q/k/v kernels still gives exact cross-attention (sparse or dense)."""
    mha = _prune_(nn.MultiheadAttention(E, HEADS, batch_first=True), rng)
    q, mem = _randn(rng, N, L, E), _randn(rng, N, S, E)
    for keep_dense in (False, True):
        def make_linear(linear, suffix, keep_dense=keep_dense):
            return linear if keep_dense else SparseLinear.from_dense(linear)

        converted = SparseMultiheadAttention.from_dense(mha, make_linear, cross_attention=False)
        assert converted.q_proj is None
        _check_mha_calls(mha, converted, (q, mem, mem), {"none": {}})


def test_mha_kdim_vdim_use_split_projections(rng):
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS, kdim=24, vdim=16, batch_first=True), rng))
    converted = _convert(model)
    assert converted.attn.in_proj is None
    assert set(_paths(converted)) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    q, k, v = _randn(rng, N, L, E), _randn(rng, N, S, 24), _randn(rng, N, S, 16)
    masks = _mask_cases(rng, L, S)
    _check_mha_calls(model, converted, (q, k, v), {k_: masks[k_] for k_ in ("none", "bool_both", "float_attn")})


def test_mha_unbatched_and_causal(rng):
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS), rng))
    converted = _convert(model)
    x = _randn(rng, L, E)
    _check_mha_calls(model, converted, (x, x, x), {"none": {}, "kpm": {"key_padding_mask": _padding(1, L, [2])[0]}})
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    xb = _randn(rng, L, N, E)
    with torch.no_grad():
        for need_weights in (False, True):
            kw = dict(attn_mask=causal, is_causal=True, need_weights=need_weights)
            _assert_close(converted(xb, xb, xb, **kw)[0], model(xb, xb, xb, **kw)[0])
        with pytest.raises(RuntimeError, match="attn_mask"):
            converted(xb, xb, xb, is_causal=True)


def test_mha_rejects_bad_inputs(rng):
    converted = _convert(_Holder(_prune_(nn.MultiheadAttention(E, HEADS), rng)))
    x = _randn(rng, L, N, E)
    with torch.no_grad():
        with pytest.raises(ValueError, match="attn_mask"):
            converted(x, x, x, attn_mask=torch.zeros(L + 1, L))
        with pytest.raises(ValueError, match="key_padding_mask"):
            converted(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
        with pytest.raises(TypeError, match="attn_mask"):
            converted(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
        with pytest.raises(ValueError, match="key"):
            converted(x, x[:, :1], x)


def test_dense_mha_stays_original(rng):
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    converted = _convert(_Holder(mha))
    assert type(converted.attn) is nn.MultiheadAttention
    assert _paths(converted) == {"attn.in_proj": "dense", "attn.out_proj": "dense"}


@pytest.mark.parametrize(
    "kwargs, reason", [({"add_bias_kv": True}, "add_bias_kv"), ({"add_zero_attn": True}, "add_zero_attn")]
)
def test_unsupported_mha_left_dense_with_reason(rng, kwargs, reason):
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS, **kwargs), rng))
    converted = _convert(model)
    assert type(converted.attn) is nn.MultiheadAttention
    (choice,) = converted.sparseprune_report.layers
    assert choice.path == "attn" and choice.kernel == "dense" and reason in choice.reason
    x = _randn(rng, L, N, E)
    with torch.no_grad():
        _assert_close(converted(x, x, x)[0], model(x, x, x)[0])


def test_mha_measured_policy(rng):
    """The one timing test: tiny layers, one batch size."""
    model = _Holder(_prune_(nn.MultiheadAttention(E, HEADS, batch_first=True), rng, fraction=0.9))
    converted = convert(model, policy="measure", batch_sizes=(1,), num_threads=1)
    choices = {c.path: c for c in converted.sparseprune_report.layers}
    assert set(choices) == {"attn.in_proj", "attn.out_proj"}
    assert all(c.dense_ms for c in choices.values())
    x = _randn(rng, N, L, E)
    _check_mha_calls(model, converted, (x, x, x), {"none": {}})


# --- TransformerEncoderLayer / TransformerEncoder ---------------------------------------------


def _encoder(rng, *, norm_first, activation, batch_first=True, nested=False, final_norm=True):
    layer = nn.TransformerEncoderLayer(
        E, HEADS, FF, dropout=0.1, activation=activation, batch_first=batch_first, norm_first=norm_first
    )
    norm = nn.LayerNorm(E) if final_norm else None
    return _prune_(nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=nested), rng)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_matches(rng, norm_first, activation, batch_first):
    model = _encoder(rng, norm_first=norm_first, activation=activation, batch_first=batch_first)
    converted = _convert(model)
    assert isinstance(converted, SparseTransformerEncoder)
    expected_paths = {
        f"TransformerEncoder.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    }
    assert _paths(converted) == dict.fromkeys(expected_paths, "csr")
    for layer in converted.layers:
        assert isinstance(layer, SparseTransformerEncoderLayer)
        assert isinstance(layer.self_attn, SparseMultiheadAttention)
        assert layer.self_attn.q_proj is None  # self-attention only: no split kernels
        assert layer.linear1.relu is (activation == "relu") and layer.relu_fused is (activation == "relu")
    x = _layout(_randn(rng, N, L, E), batch_first)
    kpm = _padding(N, L, [0, 3, 1])
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    calls = [
        {},
        {"src_key_padding_mask": kpm},
        {"mask": causal},
        {"mask": causal, "is_causal": True},
        {"mask": causal.isinf(), "src_key_padding_mask": kpm},
    ]
    with torch.no_grad():
        for kw in calls:
            _assert_close(converted(x, **kw), model(x, **kw))


# The reference model takes torch's nested-tensor path, which warns that it is a prototype.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("pads", [[0, 3, 1], [0, 0, 0]])
def test_transformer_encoder_nested_tensor_path(rng, pads):
    """torch packs a padded batch into a nested tensor (zeros at the pads); so does the result."""
    model = _encoder(rng, norm_first=False, activation="relu", nested=True)
    assert model.use_nested_tensor
    converted = _convert(model)
    assert converted.zero_padding
    x = _randn(rng, N, L, E)
    kpm = _padding(N, L, pads)
    with torch.no_grad():
        _assert_close(converted(x, src_key_padding_mask=kpm), model(x, src_key_padding_mask=kpm))
        # Not left-aligned: torch's mask check refuses the nested path, and so do we.
        holes = torch.zeros(N, L, dtype=torch.bool)
        holes[1, 1] = True
        _assert_close(converted(x, src_key_padding_mask=holes), model(x, src_key_padding_mask=holes))


@pytest.mark.parametrize("norm_first", [False, True])
def test_single_encoder_layer_fast_path_reference(rng, norm_first):
    """A standalone batch-first layer: the reference is torch's fused encoder-layer kernel."""
    layer = _prune_(nn.TransformerEncoderLayer(E, HEADS, FF, batch_first=True, norm_first=norm_first), rng)
    converted = _convert(nn.Sequential(layer))
    assert isinstance(converted[0], SparseTransformerEncoderLayer)
    assert set(_paths(converted)) == {"0.self_attn.in_proj", "0.self_attn.out_proj", "0.linear1", "0.linear2"}
    x = _randn(rng, N, L, E)
    with torch.no_grad():
        _assert_close(converted(x), layer(x))


def test_encoder_layer_with_callable_activation_and_dense_attention(rng):
    """Only the feed-forward is pruned: the attention block stays torch's own module."""
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, activation=torch.tanh, batch_first=True)
    _prune_(layer, rng, fraction=0.0)
    with torch.no_grad():
        for lin in (layer.linear1, layer.linear2):
            lin.weight.mul_(torch.from_numpy(rng.random(lin.weight.shape) >= 0.85))
    converted = _convert(layer)
    assert isinstance(converted, SparseTransformerEncoderLayer)
    assert type(converted.self_attn) is nn.MultiheadAttention
    assert not converted.relu_fused and isinstance(converted.linear1, SparseLinear)
    kernels = _paths(converted)
    assert kernels["TransformerEncoderLayer.self_attn.in_proj"] == "dense"
    assert kernels["TransformerEncoderLayer.linear1"] == "csr"
    x = _randn(rng, N, L, E)
    kpm = _padding(N, L, [1, 0, 2])
    with torch.no_grad():
        _assert_close(converted(x, src_key_padding_mask=kpm), layer(x, src_key_padding_mask=kpm))


def test_dense_encoder_stays_original(rng):
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    converted = _convert(model)
    assert type(converted) is nn.TransformerEncoder
    assert all(type(m) is nn.TransformerEncoderLayer for m in converted.layers)
    assert len(converted.sparseprune_report.layers) == 8
    assert not converted.sparseprune_report.converted


def test_encoder_layer_subclass_with_own_forward_left_dense(rng):
    class Custom(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 2

    layer = _prune_(Custom(E, HEADS, FF, batch_first=True), rng)
    converted = _convert(nn.Sequential(layer))
    assert type(converted[0]) is Custom
    (choice,) = converted.sparseprune_report.layers
    assert choice.kernel == "dense" and "overrides forward" in choice.reason


def test_decoder_layer_attention_converted_through_mha_handler(rng):
    """nn.TransformerDecoderLayer calls its attention modules, so the MHA handler covers it."""
    layer = _prune_(nn.TransformerDecoderLayer(E, HEADS, FF, batch_first=True), rng)
    converted = _convert(nn.Sequential(layer))
    assert isinstance(converted[0].self_attn, SparseMultiheadAttention)
    assert isinstance(converted[0].multihead_attn, SparseMultiheadAttention)
    tgt, memory = _randn(rng, N, L, E), _randn(rng, N, S, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        _assert_close(
            converted[0](tgt, memory, tgt_mask=causal, tgt_is_causal=True),
            layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True),
        )


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_full_transformer_pruned_with_torch_prune(rng):
    """nn.Transformer end to end, pruned by torch.nn.utils.prune (masks read through the hooks)."""
    import torch.nn.utils.prune as torch_prune

    model = _prune_(nn.Transformer(E, HEADS, 2, 2, FF, batch_first=True), rng, fraction=0.0)
    with torch.no_grad():  # so the pruned weights are leaves convert() can deep-copy
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                torch_prune.l1_unstructured(module, "in_proj_weight", 0.8)
            elif isinstance(module, nn.Linear):
                torch_prune.l1_unstructured(module, "weight", 0.8)
    converted = _convert(model)
    assert isinstance(converted.encoder, SparseTransformerEncoder)
    assert isinstance(converted.decoder.layers[1].multihead_attn, SparseMultiheadAttention)
    report = converted.sparseprune_report
    assert len(report.layers) == len(report.converted) == 2 * 4 + 2 * 6
    src, tgt = _randn(rng, N, S, E), _randn(rng, N, L, E)
    kpm = _padding(N, S, [1, 0, 2])
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    kw = dict(tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    with torch.no_grad():
        _assert_close(converted(src, tgt, **kw), model(src, tgt, **kw))
