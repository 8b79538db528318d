"""convert() on model code sparseprune did not write: transformers models (BERT, ViT, ConvNeXt,
MobileNetV2, EfficientNet, GPT-2) pruned with torch.nn.utils.prune, and the rules that make that
work: swapped modules keep the public attributes model code reads, a Conv2d/Linear subclass with
its own forward is left as it is, and transformers' Conv1D converts as a transposed Linear."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparseprune as sp  # noqa: E402
from sparseprune.convert import convert_conv2d, converter, is_native  # noqa: E402
from sparseprune.nn import SparseConv2d, SparseLinear  # noqa: E402

PRUNED = (nn.Linear, nn.Conv2d, Conv1D)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # Tiny vocabularies make GPT-2's default token ids out of range: transformers logs about it.
    transformers.logging.set_verbosity_error()


def prune_90_(model: nn.Module) -> nn.Module:
    """90% of every Linear/Conv2d/Conv1D weight, smallest |w| first; BatchNorms get random
    statistics (fresh ones are the identity, which would hide a wrong fold)."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, PRUNED):
            torch_prune.l1_unstructured(m, "weight", 0.9)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def assert_same_outputs(model: nn.Module, converted: nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        ref, out = model(**inputs), converted(**inputs)
    names = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    assert names
    for name in names:
        r, o = ref[name], out[name]
        assert o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * (1.0 + r.abs().max().item()), msg=name)


def sparse_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def check_model(model: nn.Module, make_inputs, shapes, **convert_kwargs) -> nn.Module:
    model = prune_90_(model)
    converted = sp.convert(model, **{"policy": "threshold", **convert_kwargs})
    n_layers = sum(isinstance(m, PRUNED) for m in model.modules())
    report = converted.sparseprune_report
    assert len(report.layers) == n_layers  # every layer has a decision
    for shape in shapes:
        assert_same_outputs(model, converted, make_inputs(*shape))
    return converted


def token_inputs(vocab: int):
    def make(batch: int, length: int) -> dict:
        gen = torch.Generator().manual_seed(batch * 100 + length)
        return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}

    return make


def image_inputs(size: int):
    def make(batch: int) -> dict:
        gen = torch.Generator().manual_seed(batch)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}

    return make


TEXT_SHAPES = [(1, 5), (1, 12), (3, 5), (3, 12)]
IMAGE_SHAPES = [(1,), (3,)]


def test_bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )
    converted = check_model(transformers.BertModel(config), token_inputs(100), TEXT_SHAPES)
    report = converted.sparseprune_report
    assert len(report.converted) == len(report.layers) == 2 * 6 + 1  # q k v o in out per layer, pooler
    assert len(sparse_layers(converted)) == 13


def test_vit_reads_projection_weight_dtype():
    """ViTModel.forward reads embeddings.patch_embeddings.projection.weight.dtype."""
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )
    converted = check_model(transformers.ViTModel(config), image_inputs(32), IMAGE_SHAPES)
    projection = converted.embeddings.patch_embeddings.projection
    assert isinstance(projection, SparseConv2d)
    assert projection.weight.dtype == torch.float32
    assert len(converted.sparseprune_report.converted) == 1 + 2 * 6 + 1


def test_vit_measured_with_example_inputs_runs_natively():
    """With example inputs the whole ViTModel is compiled (kernels measured as the executor runs
    them) and the converted model runs it: same class, same attributes, same outputs."""
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )
    example = image_inputs(32)(2)["pixel_values"]
    converted = check_model(
        transformers.ViTModel(config), image_inputs(32), IMAGE_SHAPES,
        policy="measure", batch_sizes=(1, 4), example_inputs=(example,),
    )
    assert isinstance(converted, transformers.ViTModel) and is_native(converted)
    assert [(m.path, m.native) for m in converted.sparseprune_report.native_modules] == [("ViTModel", True)]
    assert converted.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    assert converted.config is not None and not sparse_layers(converted)  # nothing swapped: it runs whole


def test_convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    converted = check_model(transformers.ConvNextModel(config), image_inputs(32), IMAGE_SHAPES)
    convs = [m for m in sparse_layers(converted) if isinstance(m, SparseConv2d)]
    assert any(m.groups == m.in_channels > 1 for m in convs)  # the 7x7 depthwise convolutions
    assert len(converted.sparseprune_report.converted) == len(converted.sparseprune_report.layers) == 8


def test_mobilenet_v2_tf_padding_reads_conv_attributes():
    """MobileNetV2's TF-"same" padding reads conv.stride, kernel_size and dilation each call."""
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, finegrained_output=False)
    assert config.tf_padding
    converted = check_model(transformers.MobileNetV2Model(config), image_inputs(32), IMAGE_SHAPES)
    report = converted.sparseprune_report
    assert len(report.converted) == len(report.layers) > 40


def test_efficientnet_depthwise_subclass_converts():
    """EfficientNetDepthwiseConv2d subclasses nn.Conv2d without its own forward: converted (the
    BatchNorm after it stays a torch module: folding is compile's, with example inputs)."""
    config = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
    )
    converted = check_model(transformers.EfficientNetModel(config), image_inputs(32), IMAGE_SHAPES)
    report = converted.sparseprune_report
    assert len(report.converted) == len(report.layers)
    depthwise = [c for c in report.layers if c.layer_type == "EfficientNetDepthwiseConv2d"]
    assert depthwise and all(c.kernel != "dense" for c in depthwise)
    assert isinstance(converted.encoder.blocks[0].depthwise_conv.depthwise_conv, SparseConv2d)
    assert isinstance(converted.encoder.blocks[0].depthwise_conv.depthwise_norm, nn.BatchNorm2d)


def test_gpt2_conv1d_converted():
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    converted = check_model(transformers.GPT2Model(config), token_inputs(100), TEXT_SHAPES)
    report = converted.sparseprune_report
    conv1d_rows = [c for c in report.layers if c.layer_type == "Conv1D"]
    assert len(conv1d_rows) == 2 * 4 and all(c.kernel == "csr" for c in conv1d_rows)
    assert conv1d_rows[0].shape == (3 * 32, 32)  # c_attn as the Linear it is: (nf, nx)
    c_attn = converted.h[0].attn.c_attn
    assert isinstance(c_attn, SparseLinear) and (c_attn.nf, c_attn.nx) == (96, 32)
    assert not any(isinstance(m, Conv1D) for m in converted.modules())


# --- the rules, on small modules ---------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """TF-"same" padding inside forward (EfficientNet-Lite ports): the padding is not in the
    module's attributes, so a plain SparseConv2d would lose it."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pad_h = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledConv(nn.Conv2d):
    """Overrides _conv_forward only (weight scaled on the fly)."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


class TaggedConv(nn.Conv2d):
    """Adds an attribute and a method; computes exactly what nn.Conv2d does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "stem"

    def describe(self) -> str:
        return f"{self.tag}: {self.out_channels} filters"


class ResidualLinear(nn.Linear):
    def forward(self, x):
        return x + super().forward(x)


def _zero_90_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, PRUNED):
            torch_prune.l1_unstructured(m, "weight", 0.9)
            torch_prune.remove(m, "weight")
    return model.eval()


def test_subclass_with_own_forward_left_as_is():
    model = _zero_90_(nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), ScaledConv(8, 8, 3, padding=1), TaggedConv(8, 8, 3, padding=1),
        nn.Flatten(), ResidualLinear(8 * 8 * 8, 8 * 8 * 8),
    ))
    converted = sp.convert(model, policy="threshold")
    assert type(converted[0]) is Conv2dSame and type(converted[2]) is ScaledConv
    assert type(converted[5]) is ResidualLinear
    assert isinstance(converted[3], SparseConv2d)  # base forward: converted as before
    assert isinstance(converted[1], nn.ReLU)  # not fused into a layer that stays as it is
    rows = {c.path: c for c in converted.sparseprune_report.layers}
    assert rows["0"].kernel == "dense" and "Conv2dSame overrides forward" in rows["0"].reason
    assert rows["2"].kernel == "dense" and "overrides _conv_forward" in rows["2"].reason
    assert rows["5"].kernel == "dense" and "ResidualLinear overrides forward" in rows["5"].reason
    assert rows["3"].kernel == "sparse-conv" and rows["3"].layer_type == "TaggedConv"
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_registered_subclass_is_declared_equivalent(monkeypatch):
    class SameConv(nn.Conv2d):  # a forward that only adds a check
        def forward(self, x):
            assert x.dim() == 4
            return super().forward(x)

    model = _zero_90_(nn.Sequential(SameConv(3, 8, 3, padding=1)))
    assert type(sp.convert(model, policy="threshold")[0]) is SameConv
    monkeypatch.setattr(converter, "_HANDLERS", dict(converter._HANDLERS))  # undone after the test
    sp.register_converter(SameConv, convert_conv2d)
    converted = sp.convert(model, policy="threshold")
    assert isinstance(converted[0], SparseConv2d)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_register_converter_checks_its_arguments():
    with pytest.raises(TypeError, match="module_type"):
        sp.register_converter(int, converter.convert_linear)
    with pytest.raises(ValueError, match="qualified"):
        sp.register_converter("Conv1D", converter.convert_linear)
    with pytest.raises(TypeError, match="handler"):
        sp.register_converter(nn.Linear, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding="same", bias=True),
        dict(kernel_size=(3, 1), stride=2, padding=(1, 0), dilation=(2, 1), bias=False),
        dict(kernel_size=1, padding="valid", groups=2),
    ],
)
def test_sparse_conv_keeps_public_attributes(kwargs):
    conv = _zero_90_(nn.Sequential(nn.Conv2d(4, 6, **kwargs)))[0]
    sparse = SparseConv2d.from_dense(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(sparse, name) == getattr(conv, name), name
    assert torch.equal(sparse.weight, conv.weight.detach())
    assert (sparse.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(sparse.bias, conv.bias.detach())
    assert sparse.weight is sparse.weight  # built once, then kept
    assert sparse.weight.dtype == torch.float32 and sparse.weight.device.type == "cpu"
    assert not list(sparse.parameters()) and "weight" not in sparse.state_dict()  # no second copy held
    with pytest.raises(AttributeError):  # read-only: writing would not reach the kernel
        sparse.weight = torch.zeros(1)


def test_sparse_conv_weight_is_built_lazily():
    model = _zero_90_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    converted = sp.convert(model, policy="threshold")
    sparse = converted[0]
    assert sparse._weight_cache is None  # nothing dense built until someone reads it
    torch.testing.assert_close(sparse.weight, model[0].weight.detach())


def test_sparse_linear_keeps_public_attributes():
    linear = _zero_90_(nn.Sequential(nn.Linear(12, 7)))[0]
    sparse = SparseLinear.from_dense(linear, "bsr", (4, 1))
    assert (sparse.in_features, sparse.out_features) == (12, 7)
    assert sparse._weight_cache is None
    assert torch.equal(sparse.weight, linear.weight.detach()) and sparse.weight is sparse.weight
    assert torch.equal(sparse.bias, linear.bias.detach())
    assert not list(sparse.parameters())
    no_bias = SparseLinear.from_dense(nn.Linear(5, 3, bias=False))
    assert no_bias.bias is None


def test_conv1d_to_sparse_linear():
    conv1d = _zero_90_(nn.Sequential(Conv1D(nf=6, nx=10)))[0]
    with torch.no_grad():
        conv1d.bias.normal_()
    sparse = SparseLinear.from_conv1d(conv1d)
    assert (sparse.nf, sparse.nx, sparse.in_features, sparse.out_features) == (6, 10, 10, 6)
    assert torch.equal(sparse.weight, conv1d.weight.detach())  # Conv1D's [nx, nf] layout
    assert torch.equal(sparse.bias, conv1d.bias.detach())
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv1d(x), rtol=1e-5, atol=1e-5)
    assert "from Conv1D" in repr(sparse)


def test_conv1d_with_wrong_shapes_left_dense():
    bad = Conv1D(nf=6, nx=10)
    bad.nf = 5  # does not match the weight
    converted = sp.convert(nn.Sequential(bad), policy="threshold")
    assert converted[0].nf == 5 and not isinstance(converted[0], SparseLinear)
    (row,) = converted.sparseprune_report.layers
    assert row.kernel == "dense" and "does not match nf=5" in row.reason


def test_convert_does_not_import_transformers():
    """Conv1D is recognised by name: a model without it never imports transformers."""
    code = (
        "import sys, torch, sparseprune as sp\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "sp.convert(m, policy='threshold')\n"
        "assert 'transformers' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tracing_for_fusions_leaves_no_proxies_behind():
    """fx tracing runs forwards and their hooks on the copy convert() works on: a torch-pruned
    layer's hook, an attribute or a buffer assigned in forward must not keep an fx.Proxy."""

    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("last", torch.zeros(1))
            self.proj = Conv1D(nf=8, nx=8)  # traced through (not a torch.nn leaf), hook runs

        def forward(self, x):
            self.last = x.sum().reshape(1)
            self.seen = x.mean()
            return self.proj(x)

    model = prune_90_(nn.Sequential(Caching()))
    converted = sp.convert(model, policy="threshold")
    tables = [t for m in converted.modules() for t in (vars(m), m._buffers)]
    assert not any(isinstance(v, torch.fx.Proxy) for t in tables for v in t.values())
    assert torch.equal(converted[0].last, torch.zeros(1)) and not hasattr(converted[0], "seen")
    assert isinstance(converted[0].proj, SparseLinear)


def test_conv1d_dense_enough_stays_the_original():
    conv1d = Conv1D(nf=6, nx=10)  # no zeros: below the threshold
    converted = sp.convert(nn.Sequential(conv1d), policy="threshold")
    assert type(converted[0]) is Conv1D  # the model's own module, not the Linear view of it
    (row,) = converted.sparseprune_report.layers
    assert row.kernel == "dense" and row.layer_type == "Conv1D" and row.shape == (6, 10)


def test_conv1d_subclass_with_own_forward_left_as_is():
    class ScaledConv1D(Conv1D):
        def forward(self, x):
            return super().forward(x) * 0.5

    converted = sp.convert(_zero_90_(nn.Sequential(ScaledConv1D(nf=6, nx=10))), policy="threshold")
    assert type(converted[0]) is ScaledConv1D
    (row,) = converted.sparseprune_report.layers
    assert "ScaledConv1D overrides forward (Conv1D.forward)" in row.reason
