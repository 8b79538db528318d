"""The native whole-model plan (sparseprune._C.Plan) against torch, op by op and end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseprune import _native, formats

_C = _native._C


def linear_arrays(name, layer):
    indptr, indices, values = formats.csr_arrays(layer.weight.detach().numpy())
    out = {f"{name}.indptr": indptr, f"{name}.indices": indices, f"{name}.values": values}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().numpy()
    return out


def conv_arrays(name, conv):
    row_ptr, taps, values = formats.conv_arrays(conv.weight.detach().numpy())
    out = {f"{name}.row_ptr": row_ptr, f"{name}.taps": taps, f"{name}.values": values}
    if conv.bias is not None:
        out[f"{name}.bias"] = conv.bias.detach().numpy()
    return out


def spec(buffers, inputs, outputs, ops):
    return json.dumps({"format": "sparseprune.executable", "version": 1,
                       "buffers": [{"shape": s} if not isinstance(s, dict) else s for s in buffers],
                       "inputs": inputs, "outputs": outputs, "ops": ops})


def sparse_(module, fraction, gen):
    with torch.no_grad():
        module.weight[torch.rand(module.weight.shape, generator=gen) < fraction] = 0
    return module


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(3)


@pytest.mark.parametrize("act", ["relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", None])
def test_mlp_with_every_activation(act, gen):
    l1, l2 = sparse_(torch.nn.Linear(12, 20), 0.7, gen), torch.nn.Linear(20, 5)
    plan = _C.Plan(spec([[12], [20], [5]], [0], [2], [
        {"op": "linear", "in": 0, "out": 1, "weight": "a", "format": "csr", "block": [1, 1], "rows": 20, "cols": 12,
         "activation": act},
        {"op": "linear", "in": 1, "out": 2, "weight": "b", "format": "csr", "block": [1, 1], "rows": 5, "cols": 20},
    ]), {**linear_arrays("a", l1), **linear_arrays("b", l2)})
    torch_act = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
                 "tanh": torch.tanh, "hardswish": F.hardswish, None: lambda t: t}[act]
    for batch in (1, 7):
        x = torch.randn(batch, 12, generator=gen)
        with torch.no_grad():
            ref = l2(torch_act(l1(x))).numpy()
        np.testing.assert_allclose(plan.run([x.numpy()])[0], ref, rtol=1e-5, atol=1e-5)


def test_cnn_ops_residual_and_head(gen):
    c1 = sparse_(torch.nn.Conv2d(3, 8, 3, padding=1), 0.6, gen)
    c2 = sparse_(torch.nn.Conv2d(8, 8, 3, padding=1), 0.6, gen)
    fc = torch.nn.Linear(8, 6)
    ln_w, ln_b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    arrays = {**conv_arrays("c1", c1), **conv_arrays("c2", c2), **linear_arrays("fc", fc),
              "ln.gamma": ln_w.numpy(), "ln.beta": ln_b.numpy()}
    conv = {"in_channels": 8, "out_channels": 8, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
            "dilation": [1, 1], "groups": 1}
    buffers = [[3, 10, 10], [8, 10, 10], [8, 5, 5], [8, 5, 5], [8, 5, 5], [8, 3, 3], [8, 1, 1],
               {"shape": [8], "alias_of": 6}, [6], [6], [6]]
    ops = [
        {"op": "conv2d", "in": 0, "out": 1, "weight": "c1", **conv, "in_channels": 3, "activation": "relu"},
        {"op": "maxpool2d", "in": 1, "out": 2, "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]},
        {"op": "conv2d", "in": 2, "out": 3, "weight": "c2", **conv},
        {"op": "add", "a": 3, "b": 2, "out": 4, "activation": "relu"},
        {"op": "avgpool2d", "in": 4, "out": 5, "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]},
        {"op": "global_avgpool", "in": 5, "out": 6},
        {"op": "linear", "in": 7, "out": 8, "weight": "fc", "format": "csr", "block": [1, 1], "rows": 6, "cols": 8},
        {"op": "layernorm", "in": 8, "out": 9, "weight": "ln", "eps": 1e-5},
        {"op": "softmax", "in": 9, "out": 10},
    ]
    plan = _C.Plan(spec(buffers, [0], [10], ops), arrays)
    x = torch.randn(4, 3, 10, 10, generator=gen)
    with torch.no_grad():
        h = F.max_pool2d(F.relu(c1(x)), 2)
        h = F.relu(c2(h) + h)
        h = F.avg_pool2d(h, 3, 2, 1).mean(dim=(2, 3))
        ref = torch.softmax(F.layer_norm(fc(h), (6,), ln_w, ln_b, 1e-5), -1).numpy()
    np.testing.assert_allclose(plan.run([x.numpy()], n_threads=2)[0], ref, rtol=1e-5, atol=1e-6)


def _tiny():
    l1 = torch.nn.Linear(4, 3)
    return linear_arrays("a", l1), [
        {"op": "linear", "in": 0, "out": 1, "weight": "a", "format": "csr", "block": [1, 1], "rows": 3, "cols": 4}]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s, a: s.update(version=2), "version"),
        (lambda s, a: s.update(format="other"), "format"),
        (lambda s, a: s.update(inputs=[5]), "inputs"),
        (lambda s, a: s["ops"][0].update(out=7), r"ops\[0\]\.out"),
        (lambda s, a: s["ops"][0].update(rows=4), "must have 4 entries"),
        (lambda s, a: s["buffers"][1].update(shape=[2]), "output must have shape"),
        (lambda s, a: s["ops"][0].update(op="fft"), "not a known op"),
        (lambda s, a: s["ops"][0].update(activation="swish2"), "activation"),
        (lambda s, a: s["ops"][0].update(weight=3), "weight must be a string"),
        (lambda s, a: s["buffers"][1].update(shape=[-3]), "dimension"),
        (lambda s, a: s["buffers"][1].update(alias_of=0), "element count|share storage"),
        (lambda s, a: a.pop("a.values"), "a.values"),
        (lambda s, a: a.update({"a.indices": a["a.indices"] + 100}), "out of range"),
        (lambda s, a: a.update({"a.indptr": a["a.indptr"][::-1].copy()}), "indptr"),
    ],
)
def test_bad_specs_raise_clean_errors(mutate, match):
    arrays, ops = _tiny()
    s = {"format": "sparseprune.executable", "version": 1, "buffers": [{"shape": [4]}, {"shape": [3]}],
         "inputs": [0], "outputs": [1], "ops": ops}
    mutate(s, arrays)
    with pytest.raises(ValueError, match=match):
        _C.Plan(json.dumps(s), arrays)


def test_run_checks_inputs():
    arrays, ops = _tiny()
    plan = _C.Plan(spec([[4], [3]], [0], [1], ops), arrays)
    with pytest.raises(ValueError, match=r"input 0 must have shape \(batch, 4\)"):
        plan.run([np.zeros((2, 5), np.float32)])
    with pytest.raises(TypeError, match="input 0"):
        plan.run([np.zeros((2, 4), np.float64)])
    with pytest.raises(ValueError, match="expected 1 inputs"):
        plan.run([])
    assert plan.run([np.zeros((0, 4), np.float32)])[0].shape == (0, 3)


def test_not_json_is_a_value_error():
    with pytest.raises(ValueError, match="JSON"):
        _C.Plan("{not json", {})


def test_layers_without_bias(gen):
    conv = sparse_(torch.nn.Conv2d(2, 3, 3, bias=False), 0.5, gen)
    lin = sparse_(torch.nn.Linear(27, 4, bias=False), 0.5, gen)
    plan = _C.Plan(spec([[2, 5, 5], [3, 3, 3], {"shape": [27], "alias_of": 1}, [4]], [0], [3], [
        {"op": "conv2d", "in": 0, "out": 1, "weight": "c", "in_channels": 2, "out_channels": 3, "kernel": [3, 3],
         "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
        {"op": "linear", "in": 2, "out": 3, "weight": "l", "format": "csr", "block": [1, 1], "rows": 4, "cols": 27},
    ]), {**conv_arrays("c", conv), **linear_arrays("l", lin)})
    x = torch.randn(2, 2, 5, 5, generator=gen)
    with torch.no_grad():
        ref = lin(conv(x).flatten(1)).numpy()
    np.testing.assert_allclose(plan.run([x.numpy()])[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("in", 2**70), ("out", -(2**70)), ("scale", 10**400), ("shift", -(10**400)),
])
def test_ints_beyond_int64_are_spec_errors_not_cast_errors(field, value):
    op = {"op": "affine", "in": 0, "out": 1, "scale": 1.0, "shift": 0.0}
    op[field] = value
    text = spec([[2], [2]], [0], [1], [op])
    with pytest.raises(ValueError, match=rf"ops\[0\]\.{field} is out of range"):
        _native._C.Plan(text, {})
