"""Executables (issue 5): spec validation, compile == torch, save/load, torch-free loading, a fuzz
of hostile files, sharing across threads, and input checks."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from concurrency import run_in_threads  # tests/concurrency.py
from spec_edits import drop_field, set_field  # tests/spec_edits.py
from torch import nn

from sparseprune.bench.models import TinyTransformer

from sparseprune import formats
from sparseprune.compile import UnsupportedOperation, VerificationError, compile, verify
from sparseprune.runtime import Executable, SpecError, load, run_reference, validate

# --- a hand-written spec using every op ------------------------------------------------------


def _lin(rng, name, rows, cols, sparsity=0.7, block=None):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    arrays = formats.csr_arrays(w) if block is None else formats.bsr_arrays(w, *block)
    return {f"{name}.indptr": arrays.indptr, f"{name}.indices": arrays.indices, f"{name}.values": arrays.values,
            f"{name}.bias": rng.standard_normal(rows).astype(np.float32)}


def _conv(rng, name, cout, cin, k=3, groups=1):
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    a = formats.conv_arrays(w)
    return {f"{name}.row_ptr": a.row_ptr, f"{name}.taps": a.taps, f"{name}.values": a.values,
            f"{name}.bias": rng.standard_normal(cout).astype(np.float32)}


def every_op_spec(rng):
    """conv-relu, maxpool, grouped conv (gelu), add (relu), avgpool, global pool, flatten alias,
    bsr linear (silu), activation, mul, csr linear, layernorm, softmax."""
    arrays = {**_conv(rng, "c1", 8, 3), **_conv(rng, "c2", 8, 8, groups=2), **_lin(rng, "fc1", 16, 8, block=(4, 1)),
              **_lin(rng, "fc2", 6, 16), "ln.gamma": (rng.random(6) + 0.5).astype(np.float32),
              "ln.beta": rng.standard_normal(6).astype(np.float32)}
    conv = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    shapes = [[3, 10, 10], [8, 10, 10], [8, 5, 5], [8, 5, 5], [8, 5, 5], [8, 3, 3], [8, 1, 1], [8], [16], [16],
              [16], [6], [6], [6]]
    buffers = [{"shape": s} for s in shapes]
    buffers[7]["alias_of"] = 6
    ops = [
        {"op": "conv2d", "in": 0, "out": 1, "weight": "c1", "in_channels": 3, "out_channels": 8, "groups": 1, **conv,
         "activation": "relu"},
        {"op": "maxpool2d", "in": 1, "out": 2, "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]},
        {"op": "conv2d", "in": 2, "out": 3, "weight": "c2", "in_channels": 8, "out_channels": 8, "groups": 2, **conv,
         "activation": "gelu"},
        {"op": "add", "a": 3, "b": 2, "out": 4, "activation": "relu"},
        {"op": "avgpool2d", "in": 4, "out": 5, "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]},
        {"op": "global_avgpool", "in": 5, "out": 6},
        {"op": "linear", "in": 7, "out": 8, "weight": "fc1", "format": "bsr", "block": [4, 1], "rows": 16, "cols": 8,
         "activation": "silu"},
        {"op": "activation", "kind": "tanh", "in": 8, "out": 9},
        {"op": "mul", "a": 8, "b": 9, "out": 10},
        {"op": "linear", "in": 10, "out": 11, "weight": "fc2", "format": "csr", "block": [1, 1], "rows": 6, "cols": 16,
         "name": "head.fc2"},
        {"op": "layernorm", "in": 11, "out": 12, "weight": "ln", "eps": 1e-5},
        {"op": "softmax", "in": 12, "out": 13},
    ]
    spec = {"format": "sparseprune.executable", "version": 1, "buffers": buffers, "inputs": [0], "outputs": [13, 6],
            "ops": ops}
    return spec, arrays


def test_native_plan_matches_the_numpy_reference(rng):
    spec, arrays = every_op_spec(rng)
    exe = Executable.from_spec(spec, arrays, n_threads=2)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 10, 10)).astype(np.float32)
        got = exe.run(x)
        ref = run_reference(spec, arrays, [x])
        assert isinstance(got, tuple) and len(got) == 2
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert exe.input_shapes == ((3, 10, 10),)
    assert exe.output_shapes == ((6,), (8, 1, 1))
    assert exe.run(np.zeros((0, 3, 10, 10), np.float32))[0].shape == (0, 6)


def _bad(spec_edit=None, array_edit=None):
    def apply(spec, arrays):
        if spec_edit:
            spec_edit(spec)
        if array_edit:
            array_edit(arrays)
    return apply




BAD_SPECS = [
    # (mutation, exception, message fragment naming the field)
    (_bad(set_field(["version"], 2)), SpecError, r"spec\.version must be 1"),
    (_bad(set_field(["version"], "1")), SpecError, r"spec\.version"),
    (_bad(set_field(["format"], "onnx")), SpecError, r"spec\.format"),
    (_bad(set_field(["extra"], 1)), SpecError, r"spec has unknown field 'extra'"),
    (_bad(drop_field(["ops"])), SpecError, r"spec has no field 'ops'"),
    (_bad(set_field(["ops"], [])), SpecError, r"spec\.ops must be a non-empty list"),
    (_bad(set_field(["buffers"], {})), SpecError, r"spec\.buffers must be a non-empty list"),
    (_bad(set_field(["inputs"], [99])), SpecError, r"spec\.inputs\[0\] = 99 is not a buffer id"),
    (_bad(set_field(["outputs"], [-1])), SpecError, r"spec\.outputs\[0\] = -1 is not a buffer id"),
    (_bad(set_field(["outputs"], [True])), SpecError, r"spec\.outputs\[0\] must be a buffer id"),
    (_bad(set_field(["ops", 0, "out"], 14)), SpecError, r"spec\.ops\[0\]\.out = 14 is not a buffer id \(0\.\.13\)"),
    (_bad(set_field(["ops", 3, "b"], -2)), SpecError, r"spec\.ops\[3\]\.b = -2"),
    (_bad(set_field(["ops", 0, "op"], "fft")), SpecError, r"spec\.ops\[0\]\.op must be one of"),
    (_bad(set_field(["ops", 0, "ceil_mode"], True)), SpecError, r"spec\.ops\[0\] has unknown field 'ceil_mode'"),
    (_bad(drop_field(["ops", 1, "stride"])), SpecError, r"spec\.ops\[1\] has no field 'stride'"),
    (_bad(set_field(["ops", 0, "activation"], "swish2")), SpecError, r"spec\.ops\[0\]\.activation"),
    (_bad(set_field(["ops", 7, "kind"], None)), SpecError, r"spec\.ops\[7\]\.kind"),
    (_bad(set_field(["ops", 9, "weight"], 3)), SpecError, r"spec\.ops\[9\] \(head\.fc2\)\.weight must be a string"),
    (_bad(set_field(["ops", 9, "rows"], 7)), SpecError, r"output buffer 11 must have shape \(7,\)"),
    (_bad(set_field(["ops", 9, "cols"], 15)), SpecError, r"input buffer 10 \(16,\) must end in cols = 15"),
    (_bad(set_field(["ops", 9, "block"], [4, 1])), SpecError, r"block must be \[1, 1\] for format 'csr'"),
    (_bad(set_field(["ops", 6, "block"], [2, 2])), SpecError, r"spec\.ops\[6\]\.block \[2, 2\] is not one of"),
    (_bad(set_field(["ops", 6, "format"], "coo")), SpecError, r"spec\.ops\[6\]\.format must be 'csr' or 'bsr'"),
    (_bad(set_field(["ops", 0, "kernel"], [0, 3])), SpecError, r"spec\.ops\[0\]\.kernel\[0\] = 0 is out of range"),
    (_bad(set_field(["ops", 0, "kernel"], [3, 3, 3])), SpecError, r"spec\.ops\[0\]\.kernel must be a list of 2 ints"),
    (_bad(set_field(["ops", 0, "stride"], [2, 2])), SpecError, r"output buffer 1 must have shape \(8, 5, 5\)"),
    (_bad(set_field(["ops", 2, "groups"], 3)), SpecError, r"groups = 3 must divide"),
    (_bad(set_field(["ops", 0, "in_channels"], 4)), SpecError, r"input buffer 0 must be \(4, H, W\)"),
    (_bad(set_field(["ops", 1, "padding"], [2, 0])), SpecError, r"padding \[2, 0\] must be at most half the kernel"),
    (_bad(set_field(["ops", 10, "eps"], -1.0)), SpecError, r"spec\.ops\[10\]\.eps must be a finite number > 0"),
    (_bad(set_field(["ops", 10, "eps"], float("nan"))), SpecError, r"eps must be a finite number"),
    (_bad(set_field(["ops", 3, "b"], 1)), SpecError, r"a \(8, 5, 5\) and b \(8, 10, 10\) do not broadcast"),
    (_bad(set_field(["ops", 5, "out"], 5)), SpecError, r"out must not share storage with in"),
    (_bad(set_field(["ops", 1, "in"], 12)), SpecError, r"reads a buffer that no input or earlier op writes"),
    (_bad(set_field(["buffers", 3, "shape"], [-8, 5, 5])), SpecError, r"spec\.buffers\[3\]\.shape\[0\] = -8"),
    (_bad(set_field(["buffers", 3, "shape"], [8, 0, 5])), SpecError, r"spec\.buffers\[3\]\.shape\[1\] = 0"),
    (_bad(set_field(["buffers", 3, "shape"], [1 << 20, 1 << 20])), SpecError, r"more than \d+ elements per sample"),
    (_bad(set_field(["buffers", 3, "shape"], [1] * 9)), SpecError, r"spec\.buffers\[3\]\.shape must be a list of 1 to 8"),
    (_bad(set_field(["buffers", 3, "shape"], [8.0, 5, 5])), SpecError, r"spec\.buffers\[3\]\.shape\[0\] must be an int"),
    (_bad(set_field(["buffers", 7, "alias_of"], 8)), SpecError, r"alias_of = 8 must name an earlier buffer"),
    (_bad(set_field(["buffers", 7, "alias_of"], 5)), SpecError, r"must have the element count of buffer 5"),
    (_bad(set_field(["buffers", 7, "dtype"], "f16")), SpecError, r"spec\.buffers\[7\] has unknown field 'dtype'"),
    (_bad(array_edit=lambda a: a.pop("fc2.values")), SpecError, r"array 'fc2\.values' \(float32 values\) is missing"),
    (_bad(array_edit=lambda a: a.update({"fc2.bais": a.pop("fc2.bias")})), SpecError,
     r"array 'fc2\.bais' is not used by any op"),
    (_bad(array_edit=lambda a: a.update({"fc2.values": a["fc2.values"].astype(np.float64)})), TypeError,
     r"array 'fc2\.values' must be float32, got float64"),
    (_bad(array_edit=lambda a: a.update({"fc2.indices": a["fc2.indices"].astype(np.float32)})), TypeError,
     r"array 'fc2\.indices' must be int64 or int32"),
    (_bad(array_edit=lambda a: a.update({"fc2.indices": a["fc2.indices"] + 16})), SpecError,
     r"array 'fc2\.indices' holds \d+, out of range \[0, 16\)"),
    (_bad(array_edit=lambda a: a.update({"c1.taps": -a["c1.taps"] - 1})), SpecError,
     r"array 'c1\.taps' holds -\d+, out of range \[0, 27\)"),
    (_bad(array_edit=lambda a: a.update({"fc2.indptr": a["fc2.indptr"][::-1].copy()})), SpecError,
     r"array 'fc2\.indptr' must start at 0"),
    (_bad(array_edit=lambda a: a["fc2.indptr"].__setitem__(3, a["fc2.indptr"][-1] + 1)), SpecError,
     r"array 'fc2\.indptr' must be non-decreasing"),
    (_bad(array_edit=lambda a: a.update({"fc2.indptr": a["fc2.indptr"][:-1].copy()})), SpecError,
     r"array 'fc2\.indptr' must have 7 entries"),
    (_bad(array_edit=lambda a: a.update({"fc2.values": a["fc2.values"][:-1].copy()})), SpecError,
     r"array 'fc2\.values' must have \d+ entries"),
    (_bad(array_edit=lambda a: a.update({"fc1.bias": a["fc1.bias"][:3].copy()})), SpecError,
     r"array 'fc1\.bias' must have rows = 16 entries"),
    (_bad(array_edit=lambda a: a.update({"c2.bias": a["c2.bias"].reshape(2, 4)})), SpecError,
     r"array 'c2\.bias' must be 1-D"),
    (_bad(array_edit=lambda a: a.update({"ln.gamma": a["ln.gamma"][:5].copy()})), SpecError,
     r"array 'ln\.gamma' must have 6 entries"),
    (_bad(array_edit=lambda a: a.update({"fc2.indices": np.zeros_like(a["fc2.indices"])})), SpecError,
     r"array 'fc2\.indices' holds 0 twice in row|array 'fc2\.indices' holds"),
    (_bad(array_edit=lambda a: a.update({"ln.beta": [0.0] * 6})), TypeError, r"array 'ln\.beta' must be a numpy array"),
]


@pytest.mark.parametrize("mutate, exc, match", BAD_SPECS)
def test_bad_specs_raise_clean_errors_naming_the_field(rng, mutate, exc, match):
    spec, arrays = every_op_spec(rng)
    Executable.from_spec(spec, arrays)  # the unmutated spec is valid
    mutate(spec, arrays)
    with pytest.raises(exc, match=match):
        Executable.from_spec(spec, arrays)


def test_spec_as_json_text_and_bad_json(rng):
    spec, arrays = every_op_spec(rng)
    assert Executable.from_spec(json.dumps(spec), arrays).n_ops == len(spec["ops"])
    with pytest.raises(SpecError, match="not valid JSON"):
        Executable.from_spec("{not json", arrays)
    with pytest.raises(SpecError, match="not valid JSON"):
        Executable.from_spec("[" * 100000 + "]" * 100000, arrays)
    with pytest.raises(SpecError, match="spec must be a JSON object"):
        validate([1, 2], arrays)
    with pytest.raises(TypeError, match="arrays must be a dict"):
        validate(spec, [1])


def test_hostile_specs_fail_cleanly(rng):
    spec, arrays = every_op_spec(rng)
    text = json.dumps(spec)

    def refused(spec_text, arrays=arrays, match=None):
        with pytest.raises(SpecError, match=match) as info:
            Executable.from_spec(spec_text, arrays)
        assert len(str(info.value)) < 2000  # messages stay short whatever the input
        return info

    deep = "[" * 900 + "]" * 900
    refused(text.replace('"version": 1,', f'"version": 1, "metadata": {{"a": {deep}}},'), match="nested more than")
    refused(text.replace('"kernel": [2, 2]', f'"kernel": {deep}', 1), match=r"kernel must be a list of 2 ints")
    refused(text.replace('"eps": 1e-05', '"eps": ' + "9" * 4000), match=r"eps must be a finite number")
    refused(text.replace('"eps": 1e-05', '"eps": 1e-300'), match=r"eps must be a finite number")
    refused(text.replace('"op": "softmax"', '"op": "softmax", "' + "x" * 1_000_000 + '": 1'), match="unknown field")
    refused(text.replace('"inputs": [0]', '"inputs": [' + "9" * 4000 + "]"),
            match=r"spec\.inputs\[0\] = 9+\.\.\.9+ is not")
    wrapped = dict(arrays)  # differences of these int64s wrap around to small positive steps
    ptr = arrays["fc2.indptr"].copy()
    ptr[1], ptr[2] = 2**63 - 1, -(2**63)
    wrapped["fc2.indptr"] = ptr
    refused(spec, wrapped, match="non-decreasing")


# --- compile == torch ----------------------------------------------------------------------------


def _prune(model, fraction, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight[torch.rand(m.weight.shape, generator=gen) < fraction] = 0
    return model


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def mlp(gen):
    return _prune(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), 0.9, gen)


def small_cnn(gen):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():  # a BatchNorm that is not the identity, so folding is exercised
        bn = model[1]
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
    return _prune(model, 0.6, gen)


class ResidualBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * 6 * 6, 3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y)
        y = torch.relu(y + x)
        return self.fc(y.view(y.size(0), -1))


class NormHead(nn.Module):
    """Token-wise: Linear -> LayerNorm -> GELU -> Dropout -> Linear -> softmax over the last dim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(16, 6)

    def forward(self, x):
        h = self.drop(F.gelu(self.norm(self.fc(x))))
        return F.softmax(self.out(h) * torch.sigmoid(self.out(h)), dim=-1)


MODELS = {
    "mlp": (mlp, (3, 32)),
    "cnn": (small_cnn, (2, 3, 12, 12)),
    "residual": (lambda gen: _prune(ResidualBlock(), 0.5, gen), (2, 4, 6, 6)),
    "norm_head": (lambda gen: _prune(NormHead(), 0.5, gen), (2, 7, 12)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("policy", ["measure", "threshold"])
def test_compile_matches_torch(name, policy, gen, one_torch_thread):
    build, shape = MODELS[name]
    model = build(gen).eval()
    x = torch.randn(*shape, generator=gen)
    exe = compile(model, (x,), policy=policy, num_threads=1)
    assert exe.n_threads == 1
    for batch in (1, 5):  # any batch size, not only the example's
        xb = torch.randn(batch, *shape[1:], generator=gen)
        with torch.no_grad():
            ref = model(xb).numpy()
        np.testing.assert_allclose(exe.run(xb.numpy()), ref, rtol=1e-4, atol=1e-5)
    assert model.training is False and all(p.requires_grad for p in model.parameters())


class _Coverage(nn.Module):
    """Strided, depthwise ('same'), dilated convs; functional and module activations; pools;
    flatten / view / reshape; torch.add and operator +; two outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.adapt = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 16)
        self.relu6, self.silu, self.sigmoid, self.tanh = nn.ReLU6(), nn.SiLU(), nn.Sigmoid(), nn.Tanh()

    def forward(self, x):
        x = F.relu6(self.stem(x))
        y = torch.add(self.act(self.bn(self.dw(x))), x)
        y = self.pool(F.silu(self.dil(y)))
        y = torch.flatten(self.adapt(F.max_pool2d(y, 2, 2)), 1)
        y = self.relu6(self.fc(y))
        z = (self.tanh(self.fc2(y)) + self.silu(y)).view(y.shape[0], 4, 4)
        return F.softmax(z, -1), self.sigmoid(z.reshape(-1, 16))


def test_compile_op_coverage(gen):
    model = _prune(_Coverage(), 0.5, gen).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1, generator=gen)
        model.bn.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    exe = compile(model, (x,))
    assert [(o["op"], o.get("activation", o.get("kind"))) for o in exe.spec["ops"]] == [
        ("conv2d", "relu6"), ("conv2d", "hardswish"), ("add", None), ("conv2d", "silu"), ("avgpool2d", None),
        ("maxpool2d", None), ("avgpool2d", None), ("linear", "relu6"), ("linear", "tanh"), ("activation", "silu"),
        ("add", None), ("softmax", None), ("activation", "sigmoid")]
    xb = torch.randn(3, 3, 16, 16, generator=gen)
    with torch.no_grad():
        refs = model(xb)
    for got, ref in zip(exe.run(xb.numpy()), refs):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_measure_policy_times_block_formats_when_they_fit(gen):
    layer = nn.Linear(64, 128)
    with torch.no_grad():  # 4x1 blocks: whole groups of 4 output rows share a zero column
        keep = torch.rand(32, 1, 64, generator=gen) < 0.2
        layer.weight.mul_(keep.expand(32, 4, 64).reshape(128, 64))
    x = torch.randn(8, 64, generator=gen)
    exe = compile(layer, (x,), policy="measure", num_threads=1)
    row = exe.metadata["layers"][0]
    assert row["reason"].startswith("measured ['bsr4x1', ") and "'csr', 'dense'] at [" in row["reason"]
    assert row["kernel"] in ("dense", "csr", "bsr4x1", "bsr8x1")
    with torch.no_grad():
        np.testing.assert_allclose(exe.run(x.numpy()), layer(x).numpy(), rtol=1e-5, atol=1e-5)
    assert compile(layer, (x,), policy="threshold").metadata["layers"][0]["kernel"] == "csr"


def test_functional_linear_on_parameters_and_a_bare_layer(gen):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5, generator=gen))
            self.b = nn.Parameter(torch.randn(6, generator=gen))
            self.w2 = nn.Parameter(torch.randn(4, 6, generator=gen))

        def forward(self, x):
            return F.linear(torch.tanh(F.linear(x, self.w, self.b)), weight=self.w2)

    model = Functional()
    x = torch.randn(3, 5, generator=gen)
    exe = compile(model, (x,), policy="threshold")
    assert [(o["op"], o["name"]) for o in exe.spec["ops"]] == [("linear", "w"), ("linear", "w2")]
    assert exe.spec["ops"][0]["activation"] == "tanh"  # fused
    with torch.no_grad():
        np.testing.assert_allclose(exe.run(x.numpy()), model(x).numpy(), rtol=1e-5, atol=1e-6)
    conv = nn.Conv2d(2, 4, 3)
    exe = compile(conv, (torch.randn(1, 2, 5, 5, generator=gen),), policy="threshold")
    assert [o["op"] for o in exe.spec["ops"]] == ["conv2d"]


def test_compile_folds_and_fuses(gen):
    exe = compile(small_cnn(gen), (torch.randn(2, 3, 12, 12, generator=gen),), policy="threshold")
    ops = exe.spec["ops"]
    assert [o["op"] for o in ops] == ["conv2d", "maxpool2d", "conv2d", "global_avgpool", "linear"]
    assert ops[0]["activation"] == "relu" and ops[2]["activation"] == "relu"  # BN folded, ReLU fused
    assert ops[0]["name"] == "0"
    assert exe.metadata["layers"][0]["name"] == "0"
    res = compile(ResidualBlock(), (torch.randn(2, 4, 6, 6, generator=gen),), policy="threshold")
    ops = res.spec["ops"]  # the shortcut add and its ReLU run inside the second convolution
    assert [(o["op"], o.get("activation")) for o in ops] == [("conv2d", "relu"), ("conv2d", "relu"), ("linear", None)]
    assert ops[1]["residual"] == res.spec["inputs"][0]


def test_compile_leaves_the_model_alone_and_reads_masked_weights(gen):
    from sparseprune import prune

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
    prune.magnitude(model[0], 0.8)
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)  # torch's own pruning too
    x = torch.randn(3, 16, generator=gen)
    exe = compile(model, (x,), policy="threshold")
    assert model.training  # the caller's model keeps its mode
    with torch.no_grad():
        np.testing.assert_allclose(exe.run(x.numpy()), model.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
    assert exe.layer_table()[0]["sparsity"] >= 0.79


def test_compile_an_already_converted_model(gen):
    from sparseprune import convert
    from sparseprune.nn import SparseConv2d, SparseLinear

    model = _prune(small_cnn(gen), 0.9, gen).eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    converted = convert(model, policy="threshold")  # layer by layer (no example inputs)
    kinds = {type(m) for m in converted.modules()}
    assert SparseConv2d in kinds and SparseLinear in kinds
    exe = compile(converted, (x,), policy="threshold")
    assert [o["op"] for o in exe.spec["ops"]] == ["conv2d", "maxpool2d", "conv2d", "global_avgpool", "linear"]
    # the converted layers' packed arrays and kernels, as convert chose them
    # The converted layers' packed arrays and kernels as convert chose them, except the first
    # convolution: compile folds the BatchNorm after it, which makes new weights to choose for.
    sparse = [m for m in converted.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    rows = exe.metadata["layers"]
    assert rows[0]["reason"].startswith("policy='threshold'")
    assert [(row["kernel"], row["reason"]) for row in rows[1:]] == [(m.kernel, "already converted") for m in sparse[1:]]
    with torch.no_grad():
        np.testing.assert_allclose(exe.run(x.numpy()), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_file_size_of_a_90_percent_sparse_model(gen, tmp_path):
    model = _prune(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)), 0.9, gen)
    exe = compile(model, (torch.randn(2, 256, generator=gen),), policy="threshold")
    size = exe.save(tmp_path / "m.safetensors")
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert size <= 0.25 * dense, (size, dense)  # the target


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return torch.cat([self.block(x), x], dim=0)


class _ScalarMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return 0.5 / self.fc(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=False)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _BatchMixingView(nn.Module):
    def forward(self, x):
        return torch.relu(x).view(-1, 2)


@pytest.mark.parametrize(
    "model, shape, match",
    [
        (_Cat(), (2, 4), r"aten\.cat.*node 'cat'.*the batch dimension"),
        (_ScalarMul(), (2, 4), r"aten\.reciprocal.*a number divided by an activation"),
        (_BatchMixingView(), (2, 4), r"aten\.view.*merging the batch"),
        (_Attention(), (2, 3, 4), r"module 'attn' \(MultiheadAttention\).*batch_first=False"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), (1, 2, 5, 5),
         r"aten\.pad.*module '0' \(Conv2d\): padding mode 'reflect'"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)), (2, 4), r"module '1' \(Softmax\): softmax over dim 0"),
        (nn.Sequential(nn.Conv2d(2, 2, 3), nn.MaxPool2d(2, ceil_mode=True)), (1, 2, 7, 7),
         r"module '1' \(MaxPool2d\): ceil_mode=True"),
        (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU()), (2, 4), r"module '1' \(LeakyReLU\)"),
    ],
)
def test_unsupported_ops_name_the_op_and_path_and_point_to_convert(model, shape, match):
    with pytest.raises(UnsupportedOperation, match=match) as info:
        compile(model, (torch.randn(*shape),), policy="threshold")
    assert "sparseprune.convert(model, example_inputs) still works" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_compile_argument_checks(gen):
    model = mlp(gen)
    with pytest.raises(ValueError, match="policy"):
        compile(model, (torch.randn(2, 32),), policy="fast")
    with pytest.raises(TypeError, match="float32"):
        compile(model, (torch.randn(2, 32, dtype=torch.float64),))
    with pytest.raises(ValueError, match="batch dimension"):
        compile(model, (torch.randn(32),))
    with pytest.raises(ValueError, match="num_threads"):
        compile(model, (torch.randn(2, 32),), num_threads=0)


def test_verify_refuses_a_wrong_executable(gen):
    model = mlp(gen)
    x = torch.randn(2, 32, generator=gen)
    exe = compile(model, (x,), policy="threshold")
    with torch.no_grad():
        ref = model(x).numpy()
    assert verify(exe, (x,), [ref]) < 1e-5
    with pytest.raises(VerificationError, match="output 0 differs"):
        verify(exe, (x,), [ref + 1.0])


# --- files -----------------------------------------------------------------------------------------


@pytest.fixture
def saved_cnn(tmp_path, gen):
    model = small_cnn(gen).eval()
    x = torch.randn(3, 3, 12, 12, generator=gen)
    exe = compile(model, (x,), policy="threshold")
    path = tmp_path / "cnn.safetensors"
    exe.save(path)
    return exe, path, x.numpy()


@pytest.fixture
def saved_transformer(tmp_path, gen):
    model = TinyTransformer().eval()
    _prune(model, 0.8, gen)  # nn.Linear layers go CSR; the attention in_proj stays dense
    ids = torch.randint(0, 30, (3, 7), generator=gen)
    exe = compile(model, (ids,), policy="threshold")
    path = tmp_path / "transformer.safetensors"
    exe.save(path)
    return exe, path, ids.numpy()


def test_save_load_round_trip(saved_cnn):
    exe, path, x = saved_cnn
    loaded = load(path, n_threads=1)
    np.testing.assert_array_equal(loaded.run(x, n_threads=1), exe.run(x, n_threads=1))
    assert loaded.spec == exe.spec and loaded.metadata["layers"] == exe.metadata["layers"]
    assert loaded.input_shapes == exe.input_shapes and loaded.output_shapes == exe.output_shapes
    assert loaded.nbytes == exe.nbytes < os.path.getsize(path)
    assert loaded.n_threads == 1
    assert "Executable(inputs=[(batch, 3, 12, 12)]" in repr(loaded)
    with pytest.raises(TypeError, match="pickled"):
        import pickle

        pickle.dumps(loaded)


def test_load_refuses_files_that_are_not_executables(tmp_path, saved_cnn):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a valid executable file"):
        load(tmp_path / "text.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparseprune executable"):
        load(tmp_path / "plain.safetensors")
    exe = saved_cnn[0]
    spec = exe.spec
    spec["version"] = 2
    save_file(dict(exe.arrays), str(tmp_path / "v2.safetensors"), metadata={"sparseprune_spec": json.dumps(spec)})
    with pytest.raises(ValueError, match="spec.version must be 1"):
        load(tmp_path / "v2.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):  # an OSError, not a bad file
        load(tmp_path)


_TORCH_FREE_RUN = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    {prelude}
    import numpy as np
    import sparseprune.runtime as rt
    exe = rt.load(sys.argv[1])
    y = exe.run(np.load(sys.argv[2]))
    np.testing.assert_allclose(y, np.load(sys.argv[3]), rtol=1e-6, atol=1e-7)
    assert "torch" not in {{k.split(".")[0] for k, v in sys.modules.items() if v is not None}}
    print("ok")
    """
)

# Imports sparseprune.runtime without running sparseprune/__init__.py (which imports the
# torch-side API), to check that the runtime's own imports are torch-free.
_STUB_PARENT = textwrap.dedent(
    """
    import importlib.util, types
    _spec = importlib.util.find_spec("sparseprune")
    _pkg = types.ModuleType("sparseprune")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["sparseprune"] = _pkg
    """
)


def _torch_free(tmp_path, saved, prelude):
    exe, path, x = saved
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", exe.run(x))
    script = _TORCH_FREE_RUN.format(prelude=prelude)
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_runtime_modules_never_import_torch(tmp_path, saved_cnn):
    _torch_free(tmp_path, saved_cnn, _STUB_PARENT)


def test_load_and_run_in_a_process_without_torch(tmp_path, saved_cnn):
    """The deployment case: `import sparseprune.runtime` where torch is not installed. Needs
    sparseprune/__init__.py to import its torch-side API lazily."""
    _torch_free(tmp_path, saved_cnn, "")


_FUZZ = textwrap.dedent(
    r'''
    import json, struct, sys
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    import sparseprune.runtime as rt

    base_path, work, x_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(1234)
    blob = open(base_path, "rb").read()
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + header_len])
    value_ranges = [(8 + header_len + v["data_offsets"][0], 8 + header_len + v["data_offsets"][1])
                    for k, v in header.items() if k.endswith(".values") and v["data_offsets"][1] > v["data_offsets"][0]]
    exe = rt.load(base_path)
    x = np.load(x_path)
    spec0, arrays0 = exe.spec, {k: v.copy() for k, v in exe.arrays.items()}
    n_buf = len(spec0["buffers"])

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def spec_edit(spec, arrays):
        ops = spec["ops"]
        op = pick(ops)
        kind = int(rng.integers(16))
        if kind == 0:
            op[pick([k for k in ("in", "a", "b", "out") if k in op])] = pick([n_buf, n_buf + 7, -1, 2**40])
        elif kind == 1:
            spec[pick(["inputs", "outputs"])] = [pick([n_buf, -3, 10**30])]
        elif kind == 2:
            lin = pick([o for o in ops if o["op"] == "linear"])
            lin[pick(["rows", "cols"])] += pick([-1, 1, 1000])
        elif kind == 3:
            b = pick(spec["buffers"])
            b["shape"][int(rng.integers(len(b["shape"])))] = pick([-1, 0, 2**31, 2**62, -2**63])
        elif kind == 4:
            pick(spec["buffers"])["shape"] = pick([[], [1] * 12, [2**20, 2**20, 2**20], "abc", None])
        elif kind == 5:
            name = pick([k for k in arrays if k.endswith((".indices", ".taps"))])
            a = arrays[name]
            if a.size:
                a[int(rng.integers(a.size))] = pick([-1, 10**6, 2**31 - 1, -2**31])
            else:
                arrays[name] = np.array([5], a.dtype)
        elif kind == 6:
            name = pick([k for k in arrays if k.endswith((".indptr", ".row_ptr"))])
            a = arrays[name]
            a[int(rng.integers(1, a.size))] = pick([-5, a[-1] + 3, 2**62])
        elif kind == 7:
            name = pick(sorted(k for k in arrays if arrays[k].size))
            arrays[name] = arrays[name][: max(arrays[name].size - int(rng.integers(1, 4)), 0)].copy()
        elif kind == 8:
            name = pick(sorted(arrays))
            arrays[name] = arrays[name].astype(pick([np.float64, np.int16, np.float16, np.uint8]))
        elif kind == 9:
            del arrays[pick(sorted(k for k in arrays if not k.endswith(".bias")))]  # bias is optional
        elif kind == 10:
            # fields where every one of these values is invalid (not name/activation/eps, nor the
            # flags and numbers, and cat's operand list, for which some of them are valid)
            valid_somewhere = ("name", "activation", "eps", "scale", "shift", "causal", "transpose_b", "inputs")
            key = pick(sorted(k for k in op if k not in valid_somewhere))
            op[key] = pick([None, "x", -1, 2**70, [1, 2, 3], {"a": 1}, 1.5, True])
        elif kind == 11:
            shaped = [o for o in ops if o["op"] in ("conv2d", "maxpool2d")]
            if shaped:
                pick(shaped)[pick(["kernel", "stride", "padding"])] = pick([[-1, 1], [2**30, 1], [100, 100], [0]])
            else:  # models without convolutions: break a permutation, an axis or a head count
                o = pick([o for o in ops if o["op"] in ("permute", "cat", "attention")])
                key = {"permute": "perm", "cat": "axis", "attention": "layout"}[o["op"]]
                o[key] = pick({"perm": [[0, 0, 1], [], [3, 1, 2]], "axis": [7, -1], "layout": ["", "heads_last", 3]}[key])
        elif kind == 12:
            spec["version"] = pick([0, 2, "1", None, 1.0])
        elif kind == 13:
            b = spec["buffers"][int(rng.integers(1, n_buf))]
            b["alias_of"] = pick([n_buf + 1, 0, -1, "0"])
        elif kind == 14:
            op["op"] = pick(["conv3d", "", 5, "Linear"])
        else:
            del op[pick([k for k in op if k not in ("op", "name", "activation")])]  # a required field
        return json.dumps(spec)

    outcomes = {}
    unexpected = []
    for i in range(n):
        path = f"{work}/m{i}.safetensors"
        byte_level = ["truncate", "header-bytes", "data-bytes", "header-len", "value-bytes"]
        category = byte_level[i % 5] if i < n // 3 else "spec"
        if category == "truncate":
            data = blob[: int(rng.integers(0, len(blob)))]
        elif category == "header-bytes":
            data = bytearray(blob)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(8, 8 + header_len))] = int(rng.integers(256))
        elif category == "data-bytes":
            data = bytearray(blob)
            for _ in range(int(rng.integers(1, 40))):
                data[int(rng.integers(8 + header_len, len(blob)))] = int(rng.integers(256))
        elif category == "value-bytes":  # damaged weights: still a valid executable, must run
            data = bytearray(blob)
            lo, hi = pick(value_ranges)
            for _ in range(int(rng.integers(1, 10))):
                data[int(rng.integers(lo, hi))] = int(rng.integers(256))
        elif category == "header-len":
            data = struct.pack("<Q", pick([0, 1, header_len + 1, len(blob), 2**63, 2**64 - 1])) + blob[8:]
        if category != "spec":
            open(path, "wb").write(bytes(data))
        else:
            spec = json.loads(json.dumps(spec0))
            arrays = {k: v.copy() for k, v in arrays0.items()}
            text = spec_edit(spec, arrays)
            if rng.random() < 0.1:
                text = text[: int(rng.integers(len(text)))]
            try:
                save_file(arrays, path, metadata={"sparseprune_spec": text})
            except Exception:  # safetensors refused to write it (e.g. an odd dtype): write the original
                save_file(arrays0, path, metadata={"sparseprune_spec": text})
        try:
            loaded = rt.load(path)
        except (ValueError, TypeError, KeyError, SafetensorError) as exc:
            outcomes[category + ":refused"] = outcomes.get(category + ":refused", 0) + 1
            continue
        except BaseException as exc:
            unexpected.append(f"{category} #{i}: {type(exc).__name__}: {exc}"[:300])
            continue
        # Loaded: only mutations that leave a valid executable may get here; it must run.
        loaded.run(x)
        outcomes[category + ":loaded"] = outcomes.get(category + ":loaded", 0) + 1
    print(json.dumps({"outcomes": outcomes, "unexpected": unexpected}))
    '''
)


@pytest.mark.parametrize("saved", ["saved_cnn", "saved_transformer"])
def test_fuzzed_files_fail_cleanly_and_never_crash(tmp_path, saved, request):
    exe, path, x = request.getfixturevalue(saved)
    np.save(tmp_path / "x.npy", x[:1])
    work = tmp_path / "fuzz"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FUZZ, str(path), str(work), str(tmp_path / "x.npy"), "200"],
                          capture_output=True, text=True, timeout=600)
    # A crash (segfault, abort) shows as a negative return code.
    assert proc.returncode == 0, f"fuzz process died with {proc.returncode}: {proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["unexpected"] == []
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 200
    # Structural damage is always refused; only flipped weight bytes (or a harmless header
    # byte, e.g. inside a name) may still load, and then they ran above.
    for category in ("truncate", "header-len", "spec"):
        assert outcomes.get(f"{category}:loaded", 0) == 0, outcomes
    assert outcomes.get("spec:refused", 0) >= 100
    assert outcomes.get("value-bytes:loaded", 0) >= 10  # flipped weight bytes load and run


# --- threads and inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("saved", ["saved_cnn", "saved_transformer"])
def test_one_executable_shared_by_threads_matches_serial(saved, rng, request):
    _, path, x0 = request.getfixturevalue(saved)
    exe = load(path, n_threads=1)
    if x0.dtype == np.float32:
        xs = [rng.standard_normal((int(rng.integers(1, 4)),) + x0.shape[1:]).astype(np.float32) for _ in range(80)]
    else:  # token ids
        xs = [rng.integers(0, 30, (int(rng.integers(1, 4)),) + x0.shape[1:]) for _ in range(80)]
    serial = [exe.run(x) for x in xs]
    results = [None] * len(xs)

    def worker(t):
        for i in range(t, len(xs), 4):  # 4 threads x 20 calls
            results[i] = exe.run(xs[i])

    run_in_threads(worker, 4)
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_thread_count_is_per_executable(saved_cnn):
    exe, path, x = saved_cnn
    other = load(path)
    exe.n_threads = 2
    assert other.n_threads is None and exe.n_threads == 2
    np.testing.assert_allclose(exe.run(x), exe.run(x, n_threads=1), rtol=1e-6, atol=1e-7)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_threads"):
            exe.n_threads = bad
        with pytest.raises(ValueError, match="n_threads"):
            exe.run(x, n_threads=bad)


def test_wrong_inputs_name_the_input_and_expected_shape(rng):
    spec, arrays = every_op_spec(rng)
    spec["buffers"][0]["name"] = "image"
    exe = Executable.from_spec(spec, arrays)
    good = np.zeros((2, 3, 10, 10), np.float32)
    name, want = r"input 0 \('image'\)", r"\(batch, 3, 10, 10\)"
    with pytest.raises(ValueError, match=rf"{name} must have shape {want}, got \(2, 3, 10, 9\)"):
        exe.run(np.zeros((2, 3, 10, 9), np.float32))
    with pytest.raises(ValueError, match=rf"{name} must have shape {want}, got \(3, 10, 10\)"):
        exe.run(np.zeros((3, 10, 10), np.float32))
    with pytest.raises(TypeError, match=rf"{name} must be float32, got float64 \(expected shape {want}\)"):
        exe.run(good.astype(np.float64))
    with pytest.raises(TypeError, match=r"input 0 \('image'\) must be a float32 numpy array.*torch tensor"):
        exe.run(torch.zeros(2, 3, 10, 10))
    with pytest.raises(ValueError, match=r"expected 1 input\(s\) \[input 0 \('image'\) \(batch, 3, 10, 10\)\], got 2"):
        exe.run(good, good)
    with pytest.raises(ValueError, match="expected 1 input"):
        exe.run()
    # non-contiguous input is fine
    wide = np.zeros((2, 3, 10, 20), np.float32)[..., ::2]
    np.testing.assert_array_equal(exe.run(wide)[0], exe.run(good)[0])


def test_inputs_that_came_through_pickle_run(rng):
    # a worker process or a server hands over unpickled arrays: equal dtype, distinct dtype object
    import pickle

    spec, arrays = every_op_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    sent = pickle.loads(pickle.dumps(x))
    assert sent.dtype is not x.dtype
    for got, want in zip(exe.run(sent), exe.run(x)):
        np.testing.assert_array_equal(got, want)


def test_two_input_model(gen):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(3, 4)

        def forward(self, x, y):
            return self.a(x) * self.b(y), self.a(x)

    model = Two()
    x, y = torch.randn(2, 5, generator=gen), torch.randn(2, 3, generator=gen)
    exe = compile(model, (x, y), policy="threshold")
    with torch.no_grad():
        ref = model(x, y)
    got = exe.run(x.numpy(), y.numpy())
    np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input 1 .*batch size 3"):
        exe.run(x.numpy(), np.zeros((3, 3), np.float32))


def _relu_chain(n_ops: int, n_buffers: int) -> dict:
    """Input buffer 0 -> relu -> 1 -> relu -> 2 -> relu -> 1 ... over buffers 1 and 2, plus unused
    buffers up to n_buffers."""
    from sparseprune.runtime import spec as spec_module

    ops = [{"op": "activation", "kind": "relu", "in": 0 if i == 0 else 1 + (i + 1) % 2, "out": 1 + i % 2}
           for i in range(n_ops)]
    return {"format": spec_module.SPEC_FORMAT, "version": spec_module.SPEC_VERSION,
            "buffers": [{"shape": [4]} for _ in range(n_buffers)], "inputs": [0], "outputs": [ops[-1]["out"]],
            "ops": ops}


@pytest.mark.parametrize("too_many", ["buffers", "ops"])
def test_specs_with_too_many_buffers_or_ops_are_refused_fast(too_many):
    """The native plan lays buffers out in O(buffers^2) at load: a file may hold at most
    MAX_BUFFERS buffers and MAX_OPS ops, refused by the validator and by the native plan alike
    (which a file reaches past the validator in the fuzzer), in well under a second."""
    import json
    import time

    from sparseprune._native import _C
    from sparseprune.runtime import spec as spec_module

    n = spec_module.MAX_BUFFERS if too_many == "buffers" else spec_module.MAX_OPS
    spec = _relu_chain(1, n + 1) if too_many == "buffers" else _relu_chain(n + 1, 3)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=rf"spec\.{too_many} has {n + 1:,} entries, more than the {n:,} allowed"):
        validate(spec, {})
    with pytest.raises(_C.SpecError, match=rf"spec\.{too_many} has {n + 1} entries, more than the {n} allowed"):
        _C.Plan(json.dumps(spec), {})
    assert time.perf_counter() - t0 < 5.0  # generous: the point is no quadratic layout
    # at the bound: accepted by both, and runs
    spec = _relu_chain(1, n) if too_many == "buffers" else _relu_chain(n, 3)
    validate(spec, {})
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(_C.Plan(json.dumps(spec), {}).run([x], 1)[0], np.maximum(x, 0))
