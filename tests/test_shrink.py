"""sparseprune.shrink: physically deleting pruned channels gives a smaller model with the same outputs.

Channels are zeroed by hand (conv filter + bias, and the BatchNorm scale/shift when the test wants
the channel to be exactly zero after it); the expected parameter count is that of the same
architecture built with the surviving widths.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseprune.shrink import ShrinkError, ShrinkReport, shrink


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# Test architectures


class ConvStack(nn.Module):
    """Conv-BN-ReLU x2 -> flatten of C x 8 x 8 -> Linear-ReLU-Linear (flatten maps a channel to 64 features)."""

    def __init__(self, c1=8, c2=8, hidden=16, classes=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2)
        self.relu = nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(c2 * 64, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class PooledStack(nn.Sequential):
    def __init__(self, c1=8, c2=8, c3=8, classes=5):
        super().__init__(
            nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, classes),
        )


class MLP(nn.Sequential):
    def __init__(self, h1=32, h2=24):
        super().__init__(nn.Linear(20, h1), nn.ReLU(), nn.Linear(h1, h2), nn.GELU(), nn.Dropout(0.5), nn.Linear(h2, 5))


class BasicBlock(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """ResNet-18 in miniature: identity shortcuts in layer1, a 1x1 downsample shortcut in layer2."""

    def __init__(self, w1=8, mids1=(8, 8), w2=16, mids2=(16, 16), classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w1, mids1[0], w1), BasicBlock(w1, mids1[1], w1))
        self.layer2 = nn.Sequential(BasicBlock(w1, mids2[0], w2, stride=2), BasicBlock(w2, mids2[1], w2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w2, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, inp, hidden, oup, stride):
        super().__init__()
        self.use_res = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class SmallMobileNet(nn.Module):
    def __init__(self, stem=8, h1=32, mid=12, h2=24, h3=48, head=16, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True),
            InvertedResidual(stem, h1, stem, 1), InvertedResidual(stem, h2, mid, 2), InvertedResidual(mid, h3, mid, 1),
            nn.Conv2d(mid, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


class CatNet(nn.Module):
    def __init__(self, stem=8, a=6, b=6, merge=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1), nn.BatchNorm2d(stem), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(stem, a, 1), nn.BatchNorm2d(a), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(stem, b, 3, padding=1), nn.BatchNorm2d(b), nn.SiLU())
        self.merge = nn.Sequential(nn.Conv2d(a + b, merge, 3, padding=1), nn.BatchNorm2d(merge), nn.Hardswish())
        self.fc = nn.Linear(merge, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = self.merge(x)
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# Helpers


def randomize_bn(model):
    """Non-trivial affine parameters and running statistics; the model goes to eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def zero(conv, channels, bn=None):
    """Zero output channels of conv/linear (weight and bias) and, if given, bn's scale and shift."""
    idx = torch.as_tensor(np.asarray(channels, dtype=np.int64))
    with torch.no_grad():
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0
        if bn is not None:
            bn.weight[idx] = 0
            bn.bias[idx] = 0


def half(rng, n):
    return np.sort(rng.choice(n, n // 2, replace=False))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def assert_same(out, ref, rtol=1e-4):
    assert out.shape == ref.shape
    err = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    assert err <= rtol * scale + 1e-6, f"max error {err:.3g} at scale {scale:.3g}"


def check(model, x, expected_params=None, **kwargs):
    """Shrink, check outputs and the parameter count; return the result."""
    with torch.no_grad():
        ref = model(x)
    result = shrink(model, x, **kwargs)
    with torch.no_grad():
        out = result(x)
    assert_same(out, ref)
    report = result.sparseprune_shrink_report
    assert isinstance(report, ShrinkReport)
    assert report.params_after == n_params(result)
    if expected_params is not None:
        assert n_params(result) == expected_params, report.table()
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in result.named_parameters())
    assert not any(name.endswith("_mask") for name, _ in result.named_buffers())
    return result


X_IMG = (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Architectures


def test_conv_stack_through_flatten(rng):
    model = randomize_bn(ConvStack())
    c1, c2, units = half(rng, 8), half(rng, 8), half(rng, 16)
    zero(model.conv1, c1, model.bn1)
    zero(model.conv2, c2, model.bn2)
    zero(model.fc1, units)
    x = torch.randn(*X_IMG)
    result = check(model, x, n_params(ConvStack(4, 4, 8)))
    assert result.conv2.in_channels == 4 and result.fc1.in_features == 4 * 64 and result.fc1.out_features == 8
    # the 64 features of each kept channel survive in order
    kept = [c for c in range(8) if c not in set(c2.tolist())]
    cols = torch.cat([torch.arange(c * 64, c * 64 + 64) for c in kept])
    kept_units = [u for u in range(16) if u not in set(units.tolist())]
    torch.testing.assert_close(result.fc1.weight, model.fc1.weight[kept_units][:, cols])


def test_pooled_sequential_with_torch_prune_masks(rng):
    model = randomize_bn(PooledStack())
    convs, bns = [model[0], model[3], model[7]], [model[1], model[4], model[8]]
    for conv, bn in zip(convs, bns):
        chans = torch.as_tensor(half(rng, 8))
        mask = torch.ones_like(conv.weight)
        mask[chans] = 0
        torch_prune.custom_from_mask(conv, "weight", mask)
        if conv.bias is not None:
            bias_mask = torch.ones_like(conv.bias)
            bias_mask[chans] = 0
            torch_prune.custom_from_mask(conv, "bias", bias_mask)
        for name in ("weight", "bias"):
            m = torch.ones_like(getattr(bn, name))
            m[chans] = 0
            torch_prune.custom_from_mask(bn, name, m)
    x = torch.randn(*X_IMG)
    result = check(model, x, n_params(PooledStack(4, 4, 4)))
    assert type(result) is PooledStack and isinstance(result[0].weight, nn.Parameter)
    assert torch_prune.is_pruned(model)  # inplace=False left the masks on the input


def test_mlp_units_with_nonzero_bias_are_folded(rng):
    model = MLP().eval()
    u1, u2 = half(rng, 32), half(rng, 24)
    with torch.no_grad():
        model[0].weight[torch.as_tensor(u1)] = 0  # biases stay: relu(b) / gelu(b) are constants
        model[2].weight[torch.as_tensor(u2)] = 0
        model[0].bias.uniform_(-1, 1)
        model[2].bias.uniform_(-1, 1)
    x = torch.randn(4, 20)
    result = check(model, x, n_params(MLP(16, 12)))
    report = result.sparseprune_shrink_report
    folded = {l.path: l.folded for l in report.layers}
    assert folded["2"] == int((model[0].bias[torch.as_tensor(u1)] > 0).sum())  # relu(b) > 0 folded into [2]
    assert folded["5"] == 12  # gelu(b) != 0 for every removed unit of [2]
    assert "2" in report.table() and "total parameters" in report.table()


def _zero_resnet(model, rng, same=True):
    """Zero half the channels of every conv; residual producers share their channels when `same`."""
    stream1 = half(rng, 8)
    for block in model.layer1:
        zero(block.conv1, half(rng, 8), block.bn1)
    zero(model.conv1, stream1 if same else [0, 1, 2, 3], model.bn1)
    zero(model.layer1[0].conv2, stream1 if same else [0, 1, 4, 5], model.layer1[0].bn2)
    zero(model.layer1[1].conv2, stream1 if same else [0, 1, 6, 7], model.layer1[1].bn2)
    stream2 = half(rng, 16)
    b0, b1 = model.layer2
    zero(b0.conv1, half(rng, 16), b0.bn1)
    zero(b1.conv1, half(rng, 16), b1.bn1)
    zero(b0.downsample[0], stream2, b0.downsample[1])
    zero(b0.conv2, stream2, b0.bn2)
    zero(b1.conv2, stream2, b1.bn2)


def test_resnet_residual_groups(rng):
    model = randomize_bn(SmallResNet())
    _zero_resnet(model, rng)
    x = torch.randn(*X_IMG)
    result = check(model, x, n_params(SmallResNet(4, (4, 4), 8, (8, 8))))
    assert result.fc.in_features == 8 and result.layer2[0].downsample[0].out_channels == 8


def test_resnet_residual_union_is_kept(rng):
    model = randomize_bn(SmallResNet())
    _zero_resnet(model, rng, same=False)
    x = torch.randn(*X_IMG)
    # only channels 0 and 1 are zero in every producer of the layer1 stream
    result = check(model, x, n_params(SmallResNet(6, (4, 4), 8, (8, 8))))
    assert result.conv1.out_channels == 6
    kept = {(k.path, tuple(k.channels)): k.reason for k in result.sparseprune_shrink_report.kept}
    assert ("conv1", (2, 3)) in kept and "is not one constant" in kept[("conv1", (2, 3))]


def test_mobilenet_inverted_residuals_fold_stream_constants(rng):
    model = randomize_bn(SmallMobileNet())
    f = model.features
    blocks = [f[3], f[4], f[5]]
    for block, h in zip(blocks, (32, 24, 48)):
        zero(block.conv[0], half(rng, h), block.conv[1])  # expand: exactly zero after its BN
    # residual streams: conv weights only, so each stream channel is relu6(beta')+beta'' != 0,
    # folded into the 1x1 expand/head convs that read it
    s1, s2 = half(rng, 8), half(rng, 12)
    zero(f[0], s1)
    zero(f[3].conv[6], s1)
    zero(f[4].conv[6], s2)
    zero(f[5].conv[6], s2)
    zero(f[6], half(rng, 16), f[7])
    x = torch.randn(*X_IMG)
    result = check(model, x, n_params(SmallMobileNet(4, 16, 6, 12, 24, 8)))
    dw = result.features[3].conv[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 16
    assert sum(l.folded for l in result.sparseprune_shrink_report.layers) > 0


def test_cat_of_branches(rng):
    model = randomize_bn(CatNet())
    zero(model.stem[0], half(rng, 8), model.stem[1])
    a, b = half(rng, 6), half(rng, 6)
    zero(model.a[0], a, model.a[1])
    zero(model.b[0], b, model.b[1])
    zero(model.merge[0], half(rng, 10), model.merge[1])
    x = torch.randn(*X_IMG)
    result = check(model, x, n_params(CatNet(4, 3, 3, 5)))
    keep_b = [c for c in range(6) if c not in set(b.tolist())]
    keep_a = [c for c in range(6) if c not in set(a.tolist())]
    cols = keep_a + [6 + c for c in keep_b]  # cat offsets
    kept_merge = [o for o in range(10) if bool(model.merge[0].weight[o].any())]
    torch.testing.assert_close(result.merge[0].weight, model.merge[0].weight[kept_merge][:, cols])


# ---------------------------------------------------------------------------------------------
# Constants, padding and what is kept


class BiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)  # unpadded: nonzero constants fold
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)  # zero-padded: only zeros go
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def test_zero_weight_nonzero_bias():
    model = BiasNet().eval()
    with torch.no_grad():
        model.c1.weight[:4] = 0
        model.c1.bias[:4] = torch.tensor([0.7, 0.3, -0.5, -0.2])  # relu: 0.7, 0.3, 0, 0
        model.c2.weight[:4] = 0
        model.c2.bias[:4] = torch.tensor([0.4, 0.9, -1.0, -0.1])  # 0.4, 0.9 reach a padded conv: kept
    x = torch.randn(*X_IMG)
    result = check(model, x)
    assert result.c2.in_channels == 4 and result.c1.out_channels == 4
    assert result.c2.out_channels == 6 and result.c3.in_channels == 6
    report = result.sparseprune_shrink_report
    assert {l.path: l.folded for l in report.layers}["c2"] == 2
    kept = {k.path: k for k in report.kept}
    assert kept["c2"].channels == [0, 1] and "zero-padded 'c3'" in kept["c2"].reason


def test_batchnorm_shift_keeps_or_removes_channel():
    # zero conv filter, BN shift left: relu(BN(0)) is positive for some channels, zero for others
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16 * 16, 3))
    randomize_bn(model)
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[0].bias[:4] = 0
        model[1].running_mean[:4] = 0
        model[1].bias[:4] = torch.tensor([0.5, -0.5, 0.25, -1.0])
    x = torch.randn(*X_IMG)
    result = check(model, x)
    assert result[0].out_channels == 4  # channels 1 and 3 are exactly 0 after the ReLU
    assert result.sparseprune_shrink_report.kept[0].channels == [0, 2]


def test_grouped_conv_is_kept_and_depthwise_multiplier_is_cut():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(8, 4, 1)
            self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # channel multiplier 2
            self.c = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.c(torch.relu(self.dw(torch.relu(self.b(self.grouped(torch.relu(self.a(x))))))))

    model = Net().eval()
    zero(model.a, [0, 1, 2])
    zero(model.b, [1, 3])
    x = torch.randn(*X_IMG)
    result = check(model, x)
    assert result.a.out_channels == 8 and result.grouped.in_channels == 8
    assert "grouped conv 'grouped'" in result.sparseprune_shrink_report.kept[0].reason
    assert result.b.out_channels == 2 and result.dw.groups == 2 and result.dw.out_channels == 4
    assert result.c.in_channels == 4


def test_unknown_module_keeps_its_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    zero(model[0], [0, 1])
    zero(model[2], [0, 1])
    x = torch.randn(*X_IMG)
    result = check(model.eval(), x)
    assert result[0].out_channels == 8 and result[2].out_channels == 6
    report = result.sparseprune_shrink_report
    assert any("GroupNorm" in n for n in report.notes)
    assert "GroupNorm" in report.kept[0].reason


def test_every_layer_keeps_a_channel():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    zero(model[0], list(range(8)))
    result = check(model, torch.randn(3, 6))
    assert result[0].out_features == 1


def test_shared_module_called_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
            self.shared = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.shared(torch.relu(self.a(x))) + self.shared(torch.relu(self.b(x)))

    model = Net().eval()
    zero(model.a, [0, 1, 2])
    zero(model.b, [1, 2, 3])
    result = check(model, torch.randn(*X_IMG))
    assert result.shared.in_channels == 4  # 1 and 2 are zero at both call sites


def test_squeeze_excitation_gate_of_a_zero_channel_goes_with_it():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.out = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            x = nn.functional.relu(self.bn(self.conv(x)), inplace=True)
            s = x.mean((2, 3))[:, :, None, None]
            gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
            return self.out(x * gate)

    model = randomize_bn(SE())
    zero(model.conv, [0, 3, 5, 6], model.bn)  # the gate of these channels multiplies zeros
    zero(model.fc1, [1])
    result = check(model, torch.randn(*X_IMG))
    assert result.conv.out_channels == result.fc2.out_channels == result.out.in_channels == 4
    assert result.fc1.out_channels == 3


# ---------------------------------------------------------------------------------------------
# Graphs it cannot follow, and the input model


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(x)


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=1))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


def test_channel_shuffle_reshape_is_an_error():
    with pytest.raises(ShrinkError, match=r"node 'view'.*splits or mixes the channel dim"):
        shrink(Shuffle(), torch.randn(*X_IMG))


def test_unknown_function_is_an_error_or_kept():
    model = Rolled().eval()
    zero(model.a, [0, 1])
    x = torch.randn(*X_IMG)
    with pytest.raises(ShrinkError, match=r"'roll' \(torch\.roll\)"):
        shrink(model, x)
    result = check(model, x, unknown="keep")
    assert result.a.out_channels == 8
    assert any("roll" in n for n in result.sparseprune_shrink_report.notes)


def test_untraceable_model_is_an_error_unless_made_a_leaf():
    with pytest.raises(ShrinkError, match="torch.fx cannot trace Branchy"):
        shrink(Branchy(), torch.randn(*X_IMG))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy(), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    zero(model[0], [0])
    zero(model[2], [1, 2])
    x = torch.randn(*X_IMG).abs()
    result = check(model, x, leaf_modules=Branchy)
    assert result[0].out_channels == 3 and result[2].out_channels == 2
    assert "Branchy" in result.sparseprune_shrink_report.kept[0].reason


class Aliased(nn.Module):
    """`y += 1` mutates the alias `z` in eager mode, which the trace (y = y + 1) does not show."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = y
        y += 1
        return self.b(y) + self.c(z)


def test_verification_catches_what_the_trace_hides():
    model = Aliased().eval()
    zero(model.a, [0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShrinkError, match="does not reproduce the original"):
        shrink(model, torch.randn(*X_IMG), inplace=True)
    assert model.a.out_channels == 4 and model.c.in_channels == 4  # restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hardcoded_channel_count_pins_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.a(x).mean((2, 3)).view(-1, 8))

    model = Net().eval()
    zero(model.a, [0, 1])
    result = check(model, torch.randn(*X_IMG))
    assert result.a.out_channels == 8
    assert "hardcodes 8 channels" in result.sparseprune_shrink_report.kept[0].reason


def test_inplace_false_leaves_input_untouched_and_inplace_true_cuts_it(rng):
    model = randomize_bn(SmallResNet())
    _zero_resnet(model, rng)
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(*X_IMG)
    result = shrink(model, x)
    assert result is not model and result.training and model.training
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN statistics included
    same = shrink(model, x, inplace=True)
    assert same is model and model.conv1.out_channels == 4


def test_arguments_are_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="model"):
        shrink("net", torch.randn(1, 3))
    with pytest.raises(TypeError, match="example_inputs"):
        shrink(model, None)
    with pytest.raises(ValueError, match="unknown"):
        shrink(model, torch.randn(1, 3), unknown="skip")
    with pytest.raises(TypeError, match="leaf_modules"):
        shrink(model, torch.randn(1, 3), leaf_modules=[int])


def test_report_table_and_speed_sanity(rng):
    import time

    model = randomize_bn(SmallResNet())
    _zero_resnet(model, rng)
    x = torch.randn(*X_IMG)
    result = shrink(model, x)
    report = result.sparseprune_shrink_report
    text = report.table()
    assert "layer1.0.conv1" in text and "8 -> 4" in text
    assert report.params_after < report.params_before and 0 < report.param_ratio < 0.5
    assert report.to_dict()["params_after"] == report.params_after
    with torch.no_grad():  # one tiny timing, not asserted on
        t0 = time.perf_counter()
        result(x)
        t1 = time.perf_counter()
        model(x)
        t2 = time.perf_counter()
    print(f"shrunk {1e3 * (t1 - t0):.2f} ms vs masked {1e3 * (t2 - t1):.2f} ms")


def test_shrink_copies_a_model_pruned_with_grad_enabled():
    # torch.nn.utils.prune under autograd leaves `weight` a non-leaf tensor; plain deepcopy refuses it.
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch.nn.utils.prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    with torch.no_grad():
        model[0].bias[model[0].weight_mask[:, 0] == 0] = 0
    thin = shrink(model, (torch.randn(2, 6),))
    assert thin[0].out_features == 4 and thin[2].in_features == 4
    assert torch.nn.utils.prune.is_pruned(model)  # the input model keeps its masks
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(thin(x), model(x), atol=1e-6)
