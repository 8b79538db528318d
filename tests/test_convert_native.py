"""convert() with example inputs: compile's pipeline on the capturable parts of a model.

The converted module keeps its class, attributes and children and runs its executable; a call the
executable does not cover runs in torch with a NativeFallbackWarning; a part compile cannot take is
reported and its children are tried; nn.MultiheadAttention and encoder layers are compiled with
compile's attention (no second implementation)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune.convert import NativeFallbackWarning, is_native
from sparseprune.nn import SparseLinear


def _prune_(model: nn.Module, gen: torch.Generator, fraction: float = 0.85) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight[torch.rand(m.weight.shape, generator=gen) < fraction] = 0
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight[torch.rand(m.in_proj_weight.shape, generator=gen) < fraction] = 0
    return model.eval()


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item()))


class _Gated(nn.Module):
    """Two inputs, a tuple output, a non-tensor option and a public attribute."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 6)
        self.hidden_size = 24

    def forward(self, x, gate, scale: float = 1.0, return_hidden: bool = False):
        h = torch.relu(self.fc1(x)) * torch.sigmoid(gate)
        y = self.fc2(h) * scale
        return (y, h) if return_hidden else (y,)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


def test_whole_model_runs_natively_with_its_own_face(gen):
    model = _prune_(_Gated(), gen)
    x, g = torch.randn(3, 12, generator=gen), torch.randn(3, 24, generator=gen)
    conv = sp.convert(model, (x, g), policy="threshold")
    assert is_native(conv) and isinstance(conv, _Gated) and type(conv).__name__ == "_Gated"
    assert conv.hidden_size == 24 and isinstance(conv.fc1, nn.Linear)  # attributes and children kept
    assert conv.native_executable.input_names == ("x", "gate")
    for batch in (1, 3, 7):
        xb, gb = torch.randn(batch, 12, generator=gen), torch.randn(batch, 24, generator=gen)
        with torch.no_grad():
            got, want = conv(xb, gate=gb), model(xb, gb)
        assert isinstance(got, tuple) and len(got) == 1
        _close(got[0], want[0])
    assert not is_native(model)  # the caller's model is untouched


def test_calls_the_executable_does_not_cover_run_in_torch_with_a_warning(gen):
    model = _prune_(_Gated(), gen)
    x, g = torch.randn(2, 12, generator=gen), torch.randn(2, 24, generator=gen)
    conv = sp.convert(model, (x, g), policy="threshold")
    cases = {
        "scale": dict(scale=2.0),  # another non-tensor argument
        "return_hidden": dict(return_hidden=True),
    }
    for name, extra in cases.items():
        with pytest.warns(NativeFallbackWarning, match=name):
            got = conv(x, g, **extra)
        with torch.no_grad():
            want = model(x, g, **extra)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _close(a.detach(), b)
    with pytest.warns(NativeFallbackWarning, match="float64"), pytest.raises(RuntimeError, match="dtype"):
        conv(x, g.double())  # torch's own error, as the model would give it
    with pytest.warns(NativeFallbackWarning, match="grad"):
        out = conv(x.requires_grad_(), g)
    assert out[0].requires_grad  # torch ran it, so it trains
    with pytest.warns(NativeFallbackWarning, match="input"):
        got = conv(torch.randn(4, 2, 12, generator=gen), g)  # another rank: torch broadcasts as it would
    assert got[0].shape == (4, 2, 6)


def test_warning_is_given_once_per_reason(gen):
    model = _prune_(_Gated(), gen)
    x, g = torch.randn(2, 12, generator=gen), torch.randn(2, 24, generator=gen)
    conv = sp.convert(model, (x, g), policy="threshold")
    with pytest.warns(NativeFallbackWarning):
        conv(x, g, scale=3.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv(x, g, scale=3.0)  # the same reason again: silent


def test_dict_output_keeps_its_structure(gen):
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return {"logits": self.fc(x), "aux": None, "probs": F.softmax(self.fc(x), -1)}

    model = _prune_(DictOut(), gen)
    x = torch.randn(2, 8, generator=gen)
    conv = sp.convert(model, (x,), policy="threshold")
    assert is_native(conv)
    with torch.no_grad():
        got, want = conv(x), model(x)
    assert list(got) == ["logits", "aux", "probs"] and got["aux"] is None
    _close(got["logits"], want["logits"])
    _close(got["probs"], want["probs"])


class _DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.export cannot capture it, but its blocks can."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.block1(x)
        if y.mean() > 100:  # never true here
            y = -y
        return self.head(self.block2(y))


def test_uncapturable_model_compiles_its_parts(gen):
    model = _prune_(_DataDependent(), gen)
    x = torch.randn(3, 16, generator=gen)
    conv = sp.convert(model, (x,), policy="threshold")
    report = conv.sparseprune_report
    outcome = {m.path: m.native for m in report.modules}
    assert outcome == {"_DataDependent": False, "block1": True, "block2": True}
    assert "torch.export" in report.modules[0].reason
    assert not is_native(conv) and is_native(conv.block1) and is_native(conv.block2)
    assert isinstance(conv.head, SparseLinear)  # a layer outside every compiled part: swapped alone
    with torch.no_grad():
        xb = torch.randn(5, 16, generator=gen)
        _close(conv(xb), model(xb))
    assert "native" in report.table() and "torch" in report.table()


def test_subclass_with_its_own_forward_is_lowered_through_it(gen):
    class PaddedConv(nn.Conv2d):  # pads inside its own forward, as TF-"same" ports do
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)))

    model = _prune_(nn.Sequential(PaddedConv(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1)), gen)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    conv = sp.convert(model, (x,), policy="threshold")
    assert is_native(conv)
    with torch.no_grad():
        _close(conv(x), model(x))
    # Without example inputs the subclass is left alone with the reason, never silently replaced.
    layerwise = sp.convert(model, policy="threshold")
    row = next(c for c in layerwise.sparseprune_report.layers if c.path == "0")
    assert row.kernel == "dense" and "overrides forward" in row.reason and "example_inputs" in row.reason
    with torch.no_grad():
        _close(layerwise(x), model(x))


def test_multihead_attention_is_compiled_with_compiles_attention(gen):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x, key_padding_mask):
            y, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
            return self.fc(y + x)

    model = _prune_(Block(), gen)
    x = torch.randn(3, 6, 16, generator=gen)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = True
    conv = sp.convert(model, (x, mask), policy="threshold")
    assert is_native(conv)
    with torch.no_grad():
        _close(conv(x, mask), model(x, mask))
    # Alone, without example inputs, it is left to torch with the reason.
    alone = sp.convert(model.attn, policy="threshold")
    assert alone is not model.attn and not is_native(alone)
    assert "example_inputs" in alone.sparseprune_report.layers[0].reason


def test_transformer_encoder_with_padding_mask(gen):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = _prune_(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), gen)
    x = torch.randn(2, 5, 16, generator=gen)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    conv = sp.convert(model, (x,), kwargs={"src_key_padding_mask": pad}, policy="threshold")
    assert is_native(conv)
    with torch.no_grad():
        _close(conv(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad))


def test_dynamic_sequence_and_longer_than_the_maximum(gen):
    model = _prune_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), gen)
    x = torch.randn(2, 5, 8, generator=gen)
    seq = torch.export.Dim("seq", min=2, max=10)
    conv = sp.convert(model, (x,), dynamic_shapes={"input": {1: seq}}, policy="threshold")
    assert is_native(conv)
    with torch.no_grad():
        for length in (2, 7, 10):
            xb = torch.randn(3, length, 8, generator=gen)
            _close(conv(xb), model(xb))
        with pytest.warns(NativeFallbackWarning, match="10"):
            xl = torch.randn(1, 12, 8, generator=gen)
            _close(conv(xl), model(xl))


def test_a_converted_model_copies_and_compiles(gen, tmp_path):
    model = _prune_(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), gen)
    x = torch.randn(2, 8, generator=gen)
    conv = sp.convert(model, (x,), policy="threshold")
    clone = copy.deepcopy(conv)
    assert is_native(clone) and clone.native_executable is conv.native_executable  # shared, immutable
    exe = sp.compile(conv, (x,), policy="threshold")  # captured from its own torch forward
    with torch.no_grad():
        np.testing.assert_allclose(exe.run(x.numpy()), model(x).numpy(), rtol=1e-5, atol=1e-6)
        _close(clone(x), model(x))


def test_bad_arguments_are_named():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="example_inputs"):
        sp.convert(model, "not a tensor")
    with pytest.raises(TypeError, match="kwargs"):
        sp.convert(model, kwargs=[1, 2])
    with pytest.raises(ValueError, match="dynamic_shapes"):
        sp.convert(model, dynamic_shapes={"x": {1: None}})
