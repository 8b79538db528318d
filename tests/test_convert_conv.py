"""convert() on convolutional networks: outputs equal the pruned model's; with example inputs the
network is compiled whole (BatchNorm folded, ReLU and shortcut adds fused by compile's passes),
without them each pruned convolution is swapped; unsupported settings left dense with a reason."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune.nn.sparse_conv import SparseConv2d


def zero_fraction_(module: nn.Module, fraction: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[torch.rand(m.weight.shape, generator=gen) < fraction] = 0


def randomize_bn_(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


class BasicBlock(nn.Module):
    """ResNet basic block; one ReLU module used twice (must not be fused away)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return self.relu(out + identity)


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def check_same(model: nn.Module, converted: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert out.shape == ref.shape
    scale = ref.abs().max().item() + 1e-6
    assert (out - ref).abs().max().item() <= tol * scale


def test_resnet_layer_by_layer_without_example_inputs(gen):
    model = small_resnet().eval()
    zero_fraction_(model, 0.8, gen)
    randomize_bn_(model, gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    conv = sp.convert(model, policy="threshold")
    check_same(model, conv, x)
    sparse_convs = [m for m in conv.modules() if isinstance(m, SparseConv2d)]
    assert len(sparse_convs) == 6  # stem, 2 x 2 block convs, 1 downsample
    assert sum(isinstance(m, nn.BatchNorm2d) for m in conv.modules()) == 6  # torch runs them: no fold here
    report = conv.sparseprune_report
    assert {c.path for c in report.layers} >= {"0", "3.conv1", "4.down.0", "7"}
    assert report.modules == []  # nothing to compile without example inputs
    # The input model is untouched.
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[0], nn.Conv2d)


def test_resnet_with_example_inputs_runs_natively_whole(gen):
    model = small_resnet().eval()
    zero_fraction_(model, 0.8, gen)
    randomize_bn_(model, gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    conv = sp.convert(model, (x,), policy="threshold")
    from sparseprune.convert import is_native

    assert is_native(conv) and isinstance(conv, nn.Sequential)
    assert type(conv).__name__ == "Sequential" and isinstance(conv[0], nn.Conv2d)  # its own face
    ops = [op["op"] for op in conv.native_executable.spec["ops"]]
    assert ops.count("conv2d") == 6 and not {"add", "mul"} & set(ops), ops  # BatchNorms folded, adds fused
    for batch in (1, 2, 5):
        check_same(model, conv, torch.randn(batch, 3, 16, 16, generator=gen))
    report = conv.sparseprune_report
    assert [(m.path, m.native) for m in report.modules] == [("Sequential", True)]
    assert {c.path for c in report.layers} >= {"0", "3.conv1", "4.down.0", "7"}
    assert all(c.reason.startswith("in Sequential: ") for c in report.layers)


def test_measure_policy_with_example_inputs_records_timings(gen):
    model = _Uncapturable(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 1)).eval()
    zero_fraction_(model, 0.9, gen)
    x = torch.randn(1, 8, 12, 12, generator=gen)
    conv = sp.convert(model, example_inputs=(x,), batch_sizes=(1,), conv_batch_sizes=(1, 2))
    check_same(model, conv, x)
    report = conv.sparseprune_report
    assert [(m.path, m.native) for m in report.modules] == [("_Uncapturable", False)]
    assert "data" in report.modules[0].reason  # why torch.export could not capture it
    for choice in report.layers:  # each convolution timed at the size it sees, at both batches
        assert set(choice.dense_ms) == {1, 2}
        assert choice.kernel in ("dense", "sparse-conv", "pattern-conv")


class _Uncapturable(nn.Module):
    """Control flow on a tensor's value: torch.export cannot capture the whole; its layers convert."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        y = torch.relu(self.first(x))
        if y.sum() > 0:
            y = y * 1.0
        return self.second(y)


def test_dense_choice_keeps_the_relu(gen):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()).eval()  # dense weights
    x = torch.randn(1, 4, 8, 8, generator=gen)
    conv = sp.convert(model, policy="threshold")
    assert conv.sparseprune_report.layers[0].kernel == "dense"
    check_same(model, conv, x)
    assert (conv(x) >= 0).all()


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3),
        nn.Conv2d(6, 4, (1, 5), stride=(2, 1), padding=(0, 2)),
        nn.Conv2d(6, 4, 5, padding="same"),
    ],
    ids=["depthwise", "grouped-dilated", "rect-stride", "same-odd"],
)
def test_conv_settings(layer, gen):
    model = nn.Sequential(layer).eval()
    zero_fraction_(model, 0.8, gen)
    x = torch.randn(2, 6, 11, 10, generator=gen)
    conv = sp.convert(model, policy="threshold")
    check_same(model, conv, x)


def test_unsupported_settings_stay_dense_with_reason(gen):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Conv3d(4, 4, 1)).eval()
    zero_fraction_(model, 0.9, gen)
    conv = sp.convert(model, policy="threshold")
    choice = conv.sparseprune_report.layers[0]
    assert choice.kernel == "dense" and "circular" in choice.reason
    assert isinstance(conv[1], nn.Conv3d)
    x = torch.randn(1, 4, 6, 6, 6, generator=gen)
    with torch.no_grad():
        assert torch.allclose(conv[0](x[:, :, 0]), model[0](x[:, :, 0]))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_asymmetric_same_padding_stays_dense(gen):
    model = nn.Sequential(nn.Conv2d(4, 4, 4, padding="same")).eval()
    zero_fraction_(model, 0.9, gen)
    conv = sp.convert(model, policy="threshold")
    assert conv.sparseprune_report.layers[0].kernel == "dense"
    assert "asymmetric" in conv.sparseprune_report.layers[0].reason
    check_same(model, conv, torch.randn(1, 4, 7, 7, generator=gen))


def test_wrong_input_names_the_layer(gen):
    model = nn.Sequential(nn.Conv2d(4, 8, 3)).eval()
    zero_fraction_(model, 0.9, gen)
    conv = sp.convert(model, policy="threshold")
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^0: .*4"):
            conv(torch.randn(1, 5, 8, 8))
        with pytest.raises(ValueError, match="^0: "):
            conv(torch.randn(4, 8))
        with pytest.raises(ValueError, match="^0: .*smaller than the"):
            conv(torch.randn(1, 4, 2, 2))
        with pytest.raises(TypeError, match="float32"):
            conv(torch.randn(1, 4, 8, 8, dtype=torch.float64))


def test_torch_pruned_conv_with_grad_enabled_converts(gen):
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)).eval()
    randomize_bn_(model, gen)
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.85)  # no prune.remove
    conv = sp.convert(model, policy="threshold")
    x = torch.randn(2, 4, 9, 9, generator=gen)
    check_same(model, conv, x)
    assert isinstance(conv[0], SparseConv2d) and conv[0].sparsity >= 0.84


def test_unbatched_input_and_nonfinite_match_dense(gen):
    conv = nn.Conv2d(3, 5, 3, padding=1)
    zero_fraction_(conv, 0.7, gen)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(3, 7, 7, generator=gen)
    x[1, 3, 3] = float("inf")
    with torch.no_grad():
        ref, out = conv(x), sparse(x)
    assert torch.equal(torch.isnan(ref), torch.isnan(out))
    finite = ~torch.isnan(ref)
    assert torch.allclose(out[finite], ref[finite], atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_conv_kernel_paths(simd_path, threads, gen):
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    zero_fraction_(conv, 0.6, gen)
    sparse = SparseConv2d.from_dense(conv, num_threads=threads)
    x = torch.randn(3, 5, 13, 9, generator=gen)
    with torch.no_grad():
        out = sparse(x)
    with torch.no_grad():
        assert torch.allclose(out, F.relu(conv(x)) if sparse.relu else conv(x), atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_pattern_kernel_matches_dense(groups, gen):
    conv = nn.Conv2d(8, 12, 3, stride=1, padding=1, groups=groups)
    if groups == 1:
        sp.prune.patterns(conv, n_patterns=4, pattern_size=4, connectivity=0.5)
        sp.prune.remove(conv)
    else:
        zero_fraction_(conv, 0.6, gen)
    sparse = SparseConv2d.from_dense(conv, patterns=True)
    assert sparse.kernel == "pattern-conv" and sparse.packed.n_patterns >= 1
    if groups == 1:
        assert sparse.packed.n_patterns <= 4
    x = torch.randn(2, 8, 9, 7, generator=gen)
    with torch.no_grad():
        assert torch.allclose(sparse(x), conv(x), atol=1e-5)
    # Same weights through the unstructured kernel: same answer.
    with torch.no_grad():
        assert torch.allclose(SparseConv2d.from_dense(conv)(x), sparse(x), atol=1e-5)


def test_pattern_kernel_refuses_too_many_patterns(gen):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    zero_fraction_(conv, 0.5, gen)  # random zeros: far more than 64 distinct kernel patterns
    with pytest.raises(ValueError, match="patterns"):
        SparseConv2d.from_dense(conv, patterns=True)


def test_convert_tries_the_pattern_kernel(gen):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).eval()
    sp.prune.patterns(model[0], n_patterns=4, pattern_size=4, connectivity=0.5)
    x = torch.randn(1, 8, 10, 10, generator=gen)
    conv = sp.convert(model, example_inputs=(x,))
    assert conv.sparseprune_report.layers[0].kernel in ("dense", "sparse-conv", "pattern-conv")
    check_same(model, conv, x)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride,dilation,groups,image", [(1, 1, 1, (40, 37)), (2, 1, 2, (33, 40)), (1, 2, 1, (9, 7))])
def test_sparse_conv_input_channel_panels(simd_path, threads, stride, dilation, groups, image, gen):
    """The kernel runs input-channel panels sized for the image (sparse_conv.h): many channels give
    several panels; channels with no entry in some panel, empty output channels and taps listed
    in any order (a file's order) must give the dense answer, bias and ReLU applied once."""
    from sparseprune._native import _C

    cin, cout = 192, 10  # 2-5 panels of kConvPanelBytes at these images
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, dilation=dilation, groups=groups)
    zero_fraction_(conv, 0.9, gen)
    with torch.no_grad():
        conv.weight[3] = 0                 # an empty output channel
        conv.weight[5, : cin // groups - 8] = 0  # entries in the last panel only
    w = conv.weight.detach().numpy().reshape(cout, -1)
    row_ptr, taps, values = [0], [], []
    rng = np.random.default_rng(0)
    for o in range(cout):
        t = np.flatnonzero(w[o])
        t = t[rng.permutation(t.size)]     # not sorted
        taps.append(t)
        values.append(w[o, t])
        row_ptr.append(row_ptr[-1] + t.size)
    packed = _C.PackedConv(cin, cout, (3, 3), (stride, stride), (1, 1), (dilation, dilation), groups,
                           np.array(row_ptr, np.int64), np.concatenate(taps).astype(np.int64),
                           np.concatenate(values).astype(np.float32), conv.bias.detach().numpy())
    for relu in (False, True):
        sparse = SparseConv2d(packed, relu=relu, num_threads=threads)
        sparse.padding = (1, 1)
        x = torch.randn(2, cin, *image, generator=gen)
        with torch.no_grad():
            ref = conv(x)
            ref = F.relu(ref) if relu else ref
            torch.testing.assert_close(sparse(x), ref, atol=2e-5, rtol=1e-5)
