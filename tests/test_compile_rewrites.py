"""compile's capturable stand-ins (sparseprune.compile.rewrites) against torch's own modules, in
inference (eval, no_grad), without compiling: same outputs (NaN rows included) over the mask
settings, the same parameter storage, the same public face."""
import copy
import itertools

import pytest
import torch
from torch import nn

from sparseprune.compile import UnsupportedOperation
from sparseprune.compile.rewrites import rewrite_for_capture

B, L, E = 3, 5, 8


def _same(got, ref):
    """Equal NaN positions, equal values elsewhere (fp32 rounding)."""
    if isinstance(ref, tuple):
        for g, r in zip(got, ref):
            assert (g is None) == (r is None)
            if r is not None:
                _same(g, r)
        return
    assert got.shape == ref.shape
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(ref), atol=2e-5, rtol=1e-5)


@pytest.fixture
def masks():
    gen = torch.Generator().manual_seed(3)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, 3:] = True
    padding[1] = True  # a sample whose keys are all padding
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    return {
        "x": torch.randn(B, L, E, generator=gen),
        "padding": padding,
        "causal": causal,
        "fpadding": torch.zeros(B, L).masked_fill(padding, float("-inf")),
        "fcausal": torch.zeros(L, L).masked_fill(causal, float("-inf")),
        "additive": torch.randn(L, L, generator=gen),
    }


def _mha(heads=2, **kwargs):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, heads, batch_first=True, **kwargs).eval()
    if m.in_proj_bias is not None:
        with torch.no_grad():
            m.in_proj_bias.uniform_(-1, 1)
            m.out_proj.bias.uniform_(-1, 1)
    return m


_MHA_MASKS = [(), ("padding",), ("causal",), ("causal", "padding"), ("fcausal",), ("fpadding",),
              ("fcausal", "fpadding"), ("additive",), ("causal", "is_causal"), ("causal", "padding", "is_causal")]


def _mha_kwargs(names, masks):
    kwargs = {}
    for n in names:
        if n == "is_causal":
            kwargs["is_causal"] = True
        elif n in ("padding", "fpadding"):
            kwargs["key_padding_mask"] = masks[n]
        else:
            kwargs["attn_mask"] = masks[n]
    return kwargs


@pytest.mark.parametrize("heads, bias", [(2, True), (1, True), (2, False)], ids=["fast", "odd_heads", "no_bias"])
@pytest.mark.parametrize("names", _MHA_MASKS, ids=lambda n: "+".join(n) or "none")
def test_multihead_attention_matches_torch(names, heads, bias, masks):
    mha = _mha(heads, bias=bias)
    stand_in = rewrite_for_capture(copy.deepcopy(mha))
    x = masks["x"]
    kwargs = _mha_kwargs(names, masks)
    for need_weights, average, cross in itertools.product((False, True), (True, False), (False, True)):
        kv = x.clone() if cross else x  # another tensor: torch's slow path
        with torch.no_grad():
            ref = mha(x, kv, kv, need_weights=need_weights, average_attn_weights=average, **kwargs)
            got = stand_in(x, kv, kv, need_weights=need_weights, average_attn_weights=average, **kwargs)
        _same(got, ref)


def test_multihead_attention_with_kdim_and_vdim(masks):
    mha = _mha(kdim=6, vdim=10)
    stand_in = rewrite_for_capture(copy.deepcopy(mha))
    x, key, value = masks["x"], torch.randn(B, 7, 6), torch.randn(B, 7, 10)
    for kwargs in ({}, {"key_padding_mask": torch.rand(B, 7) > 0.5}, {"attn_mask": torch.randn(L, 7)}):
        with torch.no_grad():
            _same(stand_in(x, key, value, **kwargs), mha(x, key, value, **kwargs))


@pytest.mark.parametrize("heads, bias", [(2, True), (1, True), (2, False)], ids=["fused", "odd_heads", "no_bias"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "norm_first"])
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.GELU(approximate="tanh"), nn.SiLU()],
                         ids=["relu", "gelu", "gelu_tanh", "silu_module"])
def test_encoder_layer_and_encoder_match_torch(activation, norm_first, heads, bias, masks):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, heads, 16, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first, bias=bias).eval()
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False).eval()
    x = masks["x"]
    settings = [{}, {"src_key_padding_mask": masks["padding"]}, {"src_mask": masks["causal"], "is_causal": True},
                {"src_mask": masks["fcausal"]}, {"src_mask": masks["additive"]},
                {"src_mask": masks["causal"], "src_key_padding_mask": masks["padding"]}]
    for module in (layer, encoder):
        stand_in = rewrite_for_capture(copy.deepcopy(module))
        for kwargs in settings:
            if module is encoder and "src_mask" in kwargs:
                kwargs = {("mask" if k == "src_mask" else k): v for k, v in kwargs.items()}
            with torch.no_grad():
                _same(stand_in(x, **kwargs), module(x, **kwargs))


def test_stand_ins_share_the_parameters_and_keep_the_public_face():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, 16, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    attn = model[0].layers[1].self_attn
    in_proj, out_proj, linear1 = attn.in_proj_weight, attn.out_proj, model[0].layers[1].linear1
    rewrite_for_capture(model)
    new = model[0].layers[1].self_attn
    assert type(model[0]).__name__ == "TransformerEncoder" and isinstance(model[0], nn.TransformerEncoder)
    assert isinstance(model[0].layers[1], nn.TransformerEncoderLayer) and isinstance(new, nn.MultiheadAttention)
    assert type(new) is not nn.MultiheadAttention
    assert new.out_proj is out_proj and model[0].layers[1].linear1 is linear1 and new.in_proj_weight is in_proj
    assert (new.embed_dim, new.num_heads, new.batch_first) == (E, 2, True)
    # q/k/v projections are views of in_proj_weight: no copy
    base = in_proj.untyped_storage().data_ptr()
    for k, part in enumerate("qkv"):
        w = getattr(new.in_proj, part).weight
        assert w.untyped_storage().data_ptr() == base and w.storage_offset() == k * E * E
        assert torch.equal(w, in_proj[k * E:(k + 1) * E])


def test_shared_modules_are_replaced_once_and_subclasses_kept():
    class OwnForward(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    shared = nn.MultiheadAttention(E, 2, batch_first=True)
    model = nn.ModuleDict({"a": shared, "b": shared, "own": OwnForward(E, 2, batch_first=True)})
    rewrite_for_capture(model)
    assert model["a"] is model["b"] and type(model["a"]) is not nn.MultiheadAttention
    assert type(model["own"]) is OwnForward


@pytest.mark.parametrize("build, call, match", [
    (lambda: nn.MultiheadAttention(E, 2), lambda m, x: m(x, x, x),
     r"module 'm' \(MultiheadAttention\): MultiheadAttention\(batch_first=False\).*batch_first=True"),
    (lambda: nn.MultiheadAttention(E, 2, batch_first=True, add_zero_attn=True), lambda m, x: m(x, x, x),
     r"add_bias_kv or add_zero_attn"),
    (lambda: nn.MultiheadAttention(E, 2, batch_first=True), lambda m, x: m(x, x, x, is_causal=True),
     r"is_causal=True without attn_mask"),
    (lambda: nn.MultiheadAttention(E, 2, batch_first=True),
     lambda m, x: m(x, x, x, attn_mask=torch.zeros(B * 2, L, L, dtype=torch.bool)), r"a 3-D attn_mask"),
    (lambda: nn.MultiheadAttention(E, 2, batch_first=True),
     lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(B, L, dtype=torch.int64)), r"a torch\.int64 key_padding"),
    (lambda: nn.MultiheadAttention(E, 2, batch_first=True), lambda m, x: m(x[0], x[0], x[0]), r"unbatched 2-D"),
])
def test_refusals_name_the_module_and_the_setting(build, call, match, masks):
    model = nn.ModuleDict({"m": build().eval()})
    rewrite_for_capture(model)
    with pytest.raises(UnsupportedOperation, match=match) as info, torch.no_grad():
        call(model["m"], masks["x"])
    assert "sparseprune.convert(model, example_inputs) still works" in str(info.value)
