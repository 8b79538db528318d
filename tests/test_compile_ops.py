"""compile() of attention and sequence models: TransformerEncoderLayer / TransformerEncoder /
MultiheadAttention lowered from their parameters, scaled_dot_product_attention, matmul between
activations (with the transpose read through transpose_b), permute / transpose, cat, embeddings
fed by integer ids, tensor-with-number arithmetic, and the errors for what the executor refuses.
Every executable is compared to the torch model (eval, no_grad) within fp32 rounding."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune
from sparseprune.compile import UnsupportedOperation, compile

# --- helpers -----------------------------------------------------------------------------------


def _assert_close(got, ref, tol=1e-5):
    """|got - ref| <= tol * max(1, max|ref|): fp32 rounding, far below any real error."""
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    assert diff <= tol * scale, f"max |diff| {diff:.3g} > {tol * scale:.3g}"


def _torch(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


def _check(exe, model, *inputs):
    """The executable reproduces the model on `inputs` (tensors)."""
    _assert_close(exe.run(*[x.numpy() for x in inputs]), _torch(model, *inputs))


def _ops(exe, kind=None):
    ops = exe.spec["ops"]
    return [o["op"] for o in ops] if kind is None else [o for o in ops if o["op"] == kind]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _magnitude_prune(module, name, amount):
    torch.nn.utils.prune.l1_unstructured(module, name, amount=amount)


def _encoder_layer(d=16, heads=4, ff=24, norm_first=False, activation="relu", pruned=False):
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    with torch.no_grad():  # layer norms that are not the identity
        for ln in (layer.norm1, layer.norm2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    if pruned:  # torch's own magnitude pruning (compile reads the masked weights)
        _magnitude_prune(layer.self_attn, "in_proj_weight", 0.9)
        for lin in (layer.self_attn.out_proj, layer.linear1, layer.linear2):
            _magnitude_prune(lin, "weight", 0.9)
    return layer.eval()


# --- TransformerEncoderLayer / TransformerEncoder ---------------------------------------------


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned90"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "norm_first"])
@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 7)])
def test_encoder_layer_matches_torch(batch, seq, norm_first, activation, pruned, gen):
    layer = _encoder_layer(norm_first=norm_first, activation=activation, pruned=pruned)
    x = _randn(gen, batch, seq, 16)
    exe = compile(layer, (x,), policy="threshold", num_threads=1)
    _check(exe, layer, x)
    _check(exe, layer, _randn(gen, 4 - batch, seq, 16))  # another batch size (3 or 1)

    assert len(_ops(exe, "attention")) == 1
    att = _ops(exe, "attention")[0]
    assert att["heads"] == 4 and att["causal"] is False and att["layout"] == "sequence_first"
    assert att["scale"] == pytest.approx(1 / math.sqrt(16 / 4))
    linears = {o["name"]: o for o in _ops(exe, "linear")}
    assert sorted(linears) == ["linear1", "linear2", "self_attn.in_proj.k", "self_attn.in_proj.q",
                               "self_attn.in_proj.v", "self_attn.out_proj"]
    want = "csr" if pruned else "dense"
    assert {o["format"] for o in linears.values()} == {want}
    assert linears["linear1"].get("activation") == activation  # fused into the first feed-forward linear
    assert {row["kernel"] for row in exe.metadata["layers"]} == {want}
    if pruned:
        assert min(row["sparsity"] for row in exe.metadata["layers"]) >= 0.85
    assert _ops(exe).count("layernorm") == 2 and _ops(exe).count("add") == 2


def test_encoder_layer_with_an_activation_module_and_measure_policy(gen):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation=nn.GELU(), batch_first=True).eval()
    x = _randn(gen, 2, 5, 8)
    exe = compile(layer, (x,), policy="measure", num_threads=1)
    _check(exe, layer, x)
    assert len(_ops(exe, "attention")) == 1
    assert all(o["format"] in ("dense", "csr", "bsr") for o in _ops(exe, "linear"))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "norm_first"])
def test_encoder_with_two_layers_and_a_final_norm(norm_first, gen):
    layer = _encoder_layer(d=8, heads=2, ff=16, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False).eval()
    with torch.no_grad():
        encoder.layers[1].linear1.weight.mul_(2.0)  # the two (deep-copied) layers differ
        encoder.norm.weight.uniform_(0.5, 1.5)
        encoder.norm.bias.uniform_(-0.5, 0.5)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.encoder = encoder
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(self.inp(x)))

    model = Model().eval()
    x = _randn(gen, 2, 5, 6)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    _check(exe, model, _randn(gen, 1, 5, 6))
    assert len(_ops(exe, "attention")) == 2
    assert [o["name"] for o in _ops(exe, "layernorm")][-1] == "encoder.norm"
    assert _ops(exe)[-2:] == ["layernorm", "linear"]
    names = {o["name"] for o in _ops(exe, "linear")}
    assert {"encoder.layers.0.linear1", "encoder.layers.1.linear1", "encoder.layers.1.self_attn.out_proj"} <= names


@pytest.mark.parametrize("norm", [nn.LayerNorm(8, bias=False), nn.LayerNorm(8, elementwise_affine=False)],
                         ids=["no_bias", "no_affine"])
def test_encoder_final_norm_without_bias_or_affine(norm, gen):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, bias=False)
    encoder = nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=False).eval()
    x = _randn(gen, 2, 5, 8)
    exe = compile(encoder, (x,), policy="threshold")
    _check(exe, encoder, x)
    assert len(_ops(exe, "attention")) == 2


# --- MultiheadAttention ------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, d=12, heads=3, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _CrossAttention(nn.Module):
    def __init__(self, d=12, heads=2, kdim=None, vdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, kdim=kdim, vdim=vdim, batch_first=True)
        self.fc = nn.Linear(d, 5)

    def forward(self, x, key, value):
        out, _weights = self.attn(x, key, value)  # need_weights=True: the unused weights are fine
        return self.fc(out)


@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention(bias, gen):
    model = _SelfAttention(bias=bias).eval()
    x = _randn(gen, 3, 7, 12)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    _check(exe, model, _randn(gen, 1, 7, 12))
    assert _ops(exe) == ["linear", "linear", "linear", "attention", "linear"]
    assert _ops(exe, "attention")[0]["heads"] == 3


def test_mha_cross_attention_with_another_sequence_length(gen):
    model = _CrossAttention().eval()
    x, mem = _randn(gen, 2, 5, 12), _randn(gen, 2, 9, 12)
    exe = compile(model, (x, mem, mem), policy="threshold")
    _check(exe, model, x, mem, mem)
    _check(exe, model, _randn(gen, 3, 5, 12), _randn(gen, 3, 9, 12), _randn(gen, 3, 9, 12))
    assert exe.output_shapes == ((5, 5),)
    assert len(_ops(exe, "attention")) == 1


def test_mha_with_kdim_and_vdim(gen):
    model = _CrossAttention(d=8, heads=2, kdim=6, vdim=10).eval()
    assert not model.attn._qkv_same_embed_dim  # separate q/k/v projection weights
    x, key, value = _randn(gen, 2, 3, 8), _randn(gen, 2, 7, 6), _randn(gen, 2, 7, 10)
    exe = compile(model, (x, key, value), policy="threshold")
    _check(exe, model, x, key, value)
    cols = {o["name"]: o["cols"] for o in _ops(exe, "linear")}
    assert cols["attn.in_proj.q"] == 8 and cols["attn.in_proj.k"] == 6 and cols["attn.in_proj.v"] == 10


def test_mha_pruned_projections_go_csr(gen):
    model = _SelfAttention(d=16, heads=2).eval()
    _magnitude_prune(model.attn, "in_proj_weight", 0.9)
    x = _randn(gen, 2, 5, 16)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    formats = {o["name"]: o["format"] for o in _ops(exe, "linear")}
    assert formats == {"attn.in_proj.q": "csr", "attn.in_proj.k": "csr", "attn.in_proj.v": "csr",
                       "attn.out_proj": "dense"}


@pytest.mark.parametrize("padding", [False, True], ids=["no_mask", "padding_input"])
@pytest.mark.parametrize("average", [True, False])
def test_mha_attention_weights_are_computed_when_used(average, padding, gen):
    class UsesWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(4, 4)

        def forward(self, x, pad=None):
            out, weights = self.attn(x, x, x, key_padding_mask=pad, average_attn_weights=average)
            return out, self.fc(weights)

    model = UsesWeights().eval()
    x = _randn(gen, 3, 4, 8)
    inputs = (x,)
    if padding:  # one sample all padding: NaN rows in both outputs, as torch's
        pad = _padding(gen, 3, 4)
        pad[1] = True
        inputs = (x, pad)
    exe = compile(model, inputs, policy="threshold")
    for got, want in zip(exe.run(*[t.numpy() for t in inputs]), _torch(model, *inputs)):
        _assert_close_nan(got, want)
    assert "softmax" in _ops(exe) and len(_ops(exe, "attention")) == 1
    assert len(_ops(exe, "reduce")) == average + padding  # the mean over heads; the rows that keep a key


# --- hand-written attention: matmul, transpose_b, dead transpose -------------------------------


class _HandAttention(nn.Module):
    def __init__(self, d=12, heads=3):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.q(x).view(B, L, H, D).transpose(1, 2)
        k = self.k(x).view(B, L, H, D).transpose(1, 2)
        v = self.v(x).view(B, L, H, D).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, L, H * D))


def test_hand_written_attention_reads_k_through_transpose_b(gen):
    model = _HandAttention().eval()
    x = _randn(gen, 2, 5, 12)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    _check(exe, model, _randn(gen, 3, 5, 12))
    matmuls = _ops(exe, "matmul")
    assert [m["transpose_b"] for m in matmuls] == [True, False]
    # The k.transpose(-2, -1) copy is dead and dropped: no permute swaps the last two dims, and
    # the first matmul reads the (heads-first) k written by a transpose(1, 2) permute.
    permutes = _ops(exe, "permute")
    assert [p["perm"] for p in permutes] == [[1, 0, 2]] * 4  # q, k, v to heads-first, and back
    writer = {o["out"]: o for o in exe.spec["ops"]}
    k_heads = writer[matmuls[0]["b"]]
    assert k_heads["op"] == "permute" and k_heads["perm"] == [1, 0, 2]
    k_view = exe.spec["buffers"][k_heads["in"]]  # the (L, H, D) view of the k projection
    assert writer[k_view["alias_of"]]["op"] == "linear" and writer[k_view["alias_of"]]["name"] == "k"
    assert exe.spec["buffers"][matmuls[0]["b"]]["shape"] == [3, 5, 4]  # (H, L, D), read transposed
    assert _ops(exe).count("affine") == 1 and _ops(exe).count("softmax") == 1


def test_matmul_and_bmm_between_activations(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            a, b = self.a(x), self.b(x)  # (B, L, 4)
            gram = torch.bmm(a, b.transpose(1, 2))  # (B, L, L), b read transposed
            return torch.matmul(gram, a), a.transpose(1, 2) @ b  # (B, L, 4), (B, 4, 4)

    model = Model().eval()
    x = _randn(gen, 2, 5, 6)
    exe = compile(model, (x,), policy="threshold")
    refs = _torch(model, x)
    for got, ref in zip(exe.run(x.numpy()), refs):
        _assert_close(got, ref)
    assert [m["transpose_b"] for m in _ops(exe, "matmul")] == [True, False, False]
    assert len(_ops(exe, "permute")) == 1  # a.transpose(1, 2) as the first operand is a copy


# --- scaled_dot_product_attention --------------------------------------------------------------


class _SDPA(nn.Module):
    def __init__(self, is_causal=False, scale=None):
        super().__init__()
        self.is_causal, self.scale = is_causal, scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, scale=self.scale)


@pytest.mark.parametrize("is_causal, scale, L, S", [
    (False, None, 5, 5), (True, None, 5, 5), (False, 0.3, 5, 5), (True, 0.7, 7, 7), (False, None, 3, 8),
    (False, 1.5, 6, 4), (True, None, 5, 7), (True, None, 7, 5),  # causal L != S: torch's top-left aligned mask
])
def test_sdpa(is_causal, scale, L, S, gen):
    model = _SDPA(is_causal, scale)
    q, k, v = _randn(gen, 2, 2, L, 4), _randn(gen, 2, 2, S, 4), _randn(gen, 2, 2, S, 6)
    exe = compile(model, (q, k, v), policy="threshold")
    _check(exe, model, q, k, v)
    _check(exe, model, _randn(gen, 1, 2, L, 4), _randn(gen, 1, 2, S, 4), _randn(gen, 1, 2, S, 6))
    (att,) = _ops(exe, "attention")
    assert att["causal"] is is_causal and att["layout"] == "heads_first"
    assert att["scale"] == pytest.approx(1 / math.sqrt(4) if scale is None else scale)
    assert exe.output_shapes == ((2, L, 6),)


def test_sdpa_on_projected_heads_positional_arguments(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            B, L = x.size(0), x.size(1)
            q, k, v = (lin(x).view(B, L, 2, 4).transpose(1, 2) for lin in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
            return self.out(y.transpose(1, 2).reshape(B, L, 8))

    model = Model().eval()
    x = _randn(gen, 3, 7, 8)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    assert _ops(exe, "attention")[0]["causal"] is True


# --- cat, permute, transpose -------------------------------------------------------------------


def test_cat_along_non_batch_dims(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            a = torch.cat([self.fc1(x), x], dim=1)  # (B, 8, 6)
            b = torch.cat((a, torch.relu(a), self.fc1(a)), -1)  # (B, 8, 18)
            c = torch.cat([x, self.fc2(x), x], dim=2)  # (B, 4, 15)
            d = torch.concat([self.fc2(a), self.fc2(a) * 2], dim=-2)  # (B, 16, 3)
            return b, c, d

    model = Model().eval()
    x = _randn(gen, 2, 4, 6)
    exe = compile(model, (x,), policy="threshold")
    for batch in (2, 1):
        xb = _randn(gen, batch, 4, 6)
        for got, ref in zip(exe.run(xb.numpy()), _torch(model, xb)):
            _assert_close(got, ref)
    cats = _ops(exe, "cat")
    assert [(len(c["inputs"]), c["axis"]) for c in cats] == [(2, 0), (3, 1), (3, 1), (2, 0)]


def test_permute_and_transpose(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):  # x: (B, 2, 3, 5)
            p = self.fc(x).permute(0, 3, 1, 2)  # (B, 5, 2, 3)
            t = torch.transpose(p, 1, 2)  # (B, 2, 5, 3)
            s = x.swapaxes(-1, 1)  # (B, 5, 3, 2)
            q = torch.permute(x, (0, 2, 3, 1))  # (B, 3, 5, 2)
            return p, t.contiguous(), s, q

    model = Model().eval()
    x = _randn(gen, 2, 2, 3, 5)
    exe = compile(model, (x,), policy="threshold")
    got, refs = exe.run(x.numpy()), _torch(model, x)
    for k in (0, 1):  # permutes of the linear's output
        _assert_close(got[k], refs[k])
    for k in (2, 3):  # permutes of the input: exact copies
        np.testing.assert_array_equal(got[k], refs[k].numpy())
    # t is read from the linear's output through the composed permutation (p stays lazy)
    assert [o["perm"] for o in _ops(exe, "permute")] == [[2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 2, 0]]


def test_identity_permute_is_no_op(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.permute(0, 1, 2)).permute(0, -2, -1).transpose(2, 2)

    model = Model().eval()
    x = _randn(gen, 2, 3, 4)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    assert _ops(exe) == ["linear"]


# --- embeddings --------------------------------------------------------------------------------


class _EmbeddingHead(nn.Module):
    def __init__(self, vocab=20, dim=8, out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, out)

    def forward(self, ids):
        return self.head(torch.relu(self.emb(ids)))


def test_embedding_with_integer_ids(gen, tmp_path):
    model = _EmbeddingHead().eval()
    ids = torch.randint(0, 20, (2, 6), generator=gen)
    ids[0, 0], ids[1, -1] = 0, 19  # the padding row and the last row
    exe = compile(model, (ids,), policy="threshold")
    assert exe.spec["input_dtypes"] == ["int64"]
    assert _ops(exe) == ["embedding", "activation", "linear"]
    assert [(r["name"], r["op"]) for r in exe.metadata["layers"]] == [("emb", "embedding"), ("head", "linear")]
    ref = _torch(model, ids)
    _assert_close(exe.run(ids.numpy()), ref)
    _assert_close(exe.run(ids.numpy().astype(np.int32)), ref)
    other = torch.randint(0, 20, (3, 6), generator=gen)
    _assert_close(exe.run(other.numpy()), _torch(model, other))

    with pytest.raises(ValueError, match=r"holds 20 at \(0, 0\), not a row of embedding 'emb': ids must lie in \[0, 20\)"):
        exe.run(np.full((2, 6), 20, dtype=np.int64))
    with pytest.raises(ValueError, match=r"holds -1 at \(0, 0\), not a row of embedding 'emb': ids must lie in \[0, 20\)"):
        exe.run(np.full((2, 6), -1, dtype=np.int64))
    with pytest.raises(TypeError, match="integer token ids"):
        exe.run(ids.numpy().astype(np.float32))

    path = tmp_path / "emb.safetensors"
    exe.save(path)
    loaded = sparseprune.load(path)
    assert loaded.spec == exe.spec
    np.testing.assert_array_equal(loaded.run(ids.numpy()), exe.run(ids.numpy()))
    np.testing.assert_array_equal(loaded.run(other.numpy().astype(np.int32)), exe.run(other.numpy()))


def test_int32_example_ids_functional_embedding_and_a_float_input(gen):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 6, generator=gen))
            self.fc = nn.Linear(6, 2)

        def forward(self, ids, pos):
            return self.fc(F.embedding(ids, self.table) + pos)

    model = Model().eval()
    ids, pos = torch.randint(0, 10, (2, 4), generator=gen, dtype=torch.int32), _randn(gen, 2, 4, 6)
    exe = compile(model, (ids, pos), policy="threshold")
    assert exe.spec["input_dtypes"] == ["int64", "float32"]
    _assert_close(exe.run(ids.numpy(), pos.numpy()), _torch(model, ids, pos))
    _assert_close(exe.run(ids.numpy().astype(np.int64), pos.numpy()), _torch(model, ids, pos))
    with pytest.raises(TypeError, match="float32"):
        exe.run(ids.numpy(), pos.numpy().astype(np.float64))


# --- tensor-with-number arithmetic -------------------------------------------------------------


_SCALAR_FNS = {
    "x*2": lambda x: x * 2,
    "2*x": lambda x: 2 * x,
    "x/4": lambda x: x / 4,
    "x+1": lambda x: x + 1,
    "1+x": lambda x: 1 + x,
    "1-x": lambda x: 1 - x,
    "x-3": lambda x: x - 3,
    "x*0.5+1": lambda x: x * 0.5 + 1,
    "(1-x*0.5)/2-0.25": lambda x: (1 - x * 0.5) / 2 - 0.25,
    "torch.mul": lambda x: torch.sub(torch.mul(x, -1.5), 2),
    "methods": lambda x: x.mul(3).add(0.5).sub(1).div(8),
}


class _Scalar(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


@pytest.mark.parametrize("name", sorted(_SCALAR_FNS))
def test_scalar_arithmetic(name, gen):
    model = _Scalar(_SCALAR_FNS[name]).eval()
    x = _randn(gen, 3, 5)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    _check(exe, model, _randn(gen, 2, 5))
    assert _ops(exe)[0] == "linear" and set(_ops(exe)[1:]) == {"affine"}


def test_scalar_affine_with_a_fused_activation(gen):
    model = _Scalar(lambda x: torch.relu(x * 2 - 1)).eval()
    x = _randn(gen, 4, 5)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    last = exe.spec["ops"][-1]
    assert (last["op"], last["activation"], last["scale"], last["shift"]) == ("affine", "relu", 1.0, -1.0)


# --- errors ------------------------------------------------------------------------------------


class _SequenceFirstMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _MHAWithMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.register_buffer("mask", torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


class _SDPAWithMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool).tril())

    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=self.mask)


class _LayerWithMask(nn.Module):
    def __init__(self):  # one head: torch's slow path, which adds a float mask to the scores
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 1, 16, dropout=0.0, batch_first=True)
        self.register_buffer("mask", torch.randn(4, 4))

    def forward(self, x):
        return self.layer(x, src_mask=self.mask)


class _MHAWithBiasKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _MHAWith3DMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.register_buffer("mask", torch.zeros(4, 4, 4, dtype=torch.bool))

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


class _MHACausalWithoutMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x.clone(), x, is_causal=True, need_weights=False)[0]


class _SDPADropout(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


class _CatBatch(nn.Module):
    def forward(self, x):
        return torch.cat([x * 2, x], dim=0)


class _EmbeddingOfComputedIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x):
        return self.emb((x * 4).long())


class _EmbeddingOfShiftedIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids + 1)


class _NumberOverTensor(nn.Module):
    def forward(self, x):
        return 2 / x


class _BroadcastMatmul(nn.Module):
    """(B, 2, L, 4) @ (B, 1, 4, L): torch broadcasts the head dimension."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        B, L = x.size(0), x.size(1)
        a = x.view(B, L, 2, 4).transpose(1, 2)
        b = self.fc(x).transpose(1, 2).reshape(B, 1, 4, L)
        return a @ b


class _EncoderWithPaddingMask(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.register_buffer("padding", torch.tensor([[False] * 4 + [True], [False] * 5]))

    def forward(self, x):
        return self.encoder(x, src_key_padding_mask=self.padding)


def _encoder_with_wide_norm():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm((5, 8)), enable_nested_tensor=False)


_FLOAT = torch.float32


def test_sdpa_with_a_model_mask_compiles(gen):
    """A bool attn_mask the model holds (a constant) is an attention mask of the executable."""
    model = _SDPAWithMask().eval()
    for batch in (2, 3):
        q = _randn(gen, batch, 4, 8)
        exe = compile(model, (q,), policy="threshold")
        (att,) = [o for o in exe.spec["ops"] if o["op"] == "attention"]
        assert att["mask_kind"] == "bool"
        np.testing.assert_allclose(exe.run(q.numpy()), model(q).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build, shape, dtype, match", [
    (_SequenceFirstMHA, (2, 4, 8), _FLOAT, r"module 'attn' \(MultiheadAttention\).*batch_first=False"),
    (_MHAWithBiasKV, (2, 4, 8), _FLOAT, r"module 'attn' \(MultiheadAttention\).*add_bias_kv or add_zero_attn"),
    (_MHAWith3DMask, (2, 4, 8), _FLOAT, r"module 'attn' \(MultiheadAttention\): a 3-D attn_mask"),
    (_MHACausalWithoutMask, (2, 4, 8), _FLOAT, r"module 'attn' \(MultiheadAttention\): is_causal=True without "
                                               r"attn_mask"),
    (_SDPADropout, (2, 4, 8), _FLOAT, r"aten\.scaled_dot_product_attention.*dropout_p"),
    (_CatBatch, (2, 4, 8), _FLOAT, r"aten\.cat.*the batch dimension"),
    (_EmbeddingOfComputedIds, (2, 4), _FLOAT, r"conversion to torch\.int64"),
    (_EmbeddingOfShiftedIds, (2, 4), torch.int64, r"aten\.add\.Tensor.*integer \(token id\) input"),
    (_NumberOverTensor, (2, 4), _FLOAT, r"aten\.reciprocal.*a number divided by an activation"),
    (_BroadcastMatmul, (2, 5, 8), _FLOAT, r"aten\.matmul.*no broadcasting"),
    (_EncoderWithPaddingMask, (2, 5, 8), _FLOAT,  # a mask held by the model, not a bool input
     r"depends on the batch size"),
    (_encoder_with_wide_norm, (2, 5, 8), _FLOAT,
     r"aten\.layer_norm.*module 'norm' \(LayerNorm\): layer norm over \[5, 8\]"),
])
def test_unsupported_attention_and_sequence_ops(build, shape, dtype, match):
    model = build().eval()
    x = torch.randint(0, 9, shape) if dtype is torch.int64 else torch.rand(*shape, dtype=dtype)
    with pytest.raises(UnsupportedOperation, match=match) as info:
        compile(model, (x,), policy="threshold")
    assert "sparseprune.convert(model, example_inputs) still works" in str(info.value)
    assert UnsupportedOperation is sparseprune.UnsupportedOperation


def test_masks_held_by_the_model_are_constants(gen):
    """Bool and float attn_mask / src_mask buffers (the same in every sample) and SDPA's bool
    mask reach the attention op as constant masks."""
    x = _randn(gen, 2, 4, 8)
    for model, kind in ((_MHAWithMask(), "bool"), (_SDPAWithMask(), "bool"), (_LayerWithMask(), "additive")):
        model = model.eval()
        exe = compile(model, (x,), policy="threshold")
        _check(exe, model, x)
        _check(exe, model, _randn(gen, 3, 4, 8))
        (att,) = _ops(exe, "attention")
        assert att["mask_kind"] == kind


# --- convolution kernels: sparse or dense, by sparsity or by measurement -------------------------


def _cnn(gen, sparsity_first, sparsity_second):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for conv, sparsity in ((model[0], sparsity_first), (model[3], sparsity_second)):
            conv.weight[torch.rand(conv.weight.shape, generator=gen) < sparsity] = 0
        model[1].running_mean.uniform_(-1, 1, generator=gen)
        model[1].running_var.uniform_(0.5, 2, generator=gen)
    return model.eval()


def test_threshold_policy_runs_lightly_pruned_convs_dense(gen):
    model = _cnn(gen, 0.0, 0.9)
    x = _randn(gen, 2, 3, 13, 11)
    exe = compile(model, (x,), policy="threshold")
    _check(exe, model, x)
    kernels = {row["name"]: row["kernel"] for row in exe.metadata["layers"] if row["op"] == "conv2d"}
    assert kernels == {"0": "dense-conv", "3": "sparse-conv"}
    formats = [op.get("format", "sparse") for op in _ops(exe, "conv2d")]
    assert formats == ["dense", "sparse"]
    assert [row["format"] for row in exe.layer_table() if row["op"] == "conv2d"] == ["dense-conv", "sparse-conv"]


def test_measure_policy_times_every_conv_kernel(gen, tmp_path):
    model = _cnn(gen, 0.3, 0.95)
    x = _randn(gen, 1, 3, 16, 16)
    exe = compile(model, (x,), policy="measure")
    _check(exe, model, x)
    for row in exe.metadata["layers"]:
        if row["op"] == "conv2d":  # small layers: at most 64 k x k kernels, so at most 64 patterns
            assert row["kernel"] in ("dense-conv", "sparse-conv", "pattern-conv")
            assert row["reason"].startswith("measured ['dense-conv', 'pattern-conv', 'sparse-conv'] at [1]: ")
    exe.save(tmp_path / "m.safetensors")
    loaded = sparseprune.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded.run(x.numpy()), exe.run(x.numpy()))


class _Block(nn.Module):
    """A ResNet basic block with a strided 1x1 downsample shortcut, written either branch first."""

    def __init__(self, shortcut_first: bool):
        super().__init__()
        self.shortcut_first = shortcut_first
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        if self.shortcut_first:
            s = self.down(x)
            return torch.relu(s + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + self.down(x))


@pytest.mark.parametrize("shortcut_first", [False, True])
@pytest.mark.parametrize("policy", ["threshold", "measure"])
def test_residual_add_and_relu_fuse_into_a_convolution(shortcut_first, policy, gen):
    model = _Block(shortcut_first).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand(m.weight.shape, generator=gen) < 0.8] = 0
    x = _randn(gen, 2, 4, 9, 9)
    exe = compile(model, (x,), policy=policy)
    _check(exe, model, x)
    _check(exe, model, _randn(gen, 3, 4, 9, 9))
    ops = exe.spec["ops"]
    assert "add" not in _ops(exe)
    fused = [o for o in ops if "residual" in o]
    assert len(fused) == 1 and fused[0]["activation"] == "relu"
    # the fused conv reads a residual some earlier op wrote (whichever branch ran last is fused)
    writer = {o["out"]: i for i, o in enumerate(ops)}
    assert writer[fused[0]["residual"]] < ops.index(fused[0])


def test_pattern_kernel_is_a_candidate_only_with_few_patterns(gen):
    many = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).eval()  # 1024 random 50% kernels
    few = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).eval()
    with torch.no_grad():
        many[0].weight[torch.rand(many[0].weight.shape, generator=gen) < 0.5] = 0
        keep = torch.zeros(3, 3, dtype=torch.bool)
        keep[1, :] = True  # one pattern: the middle row of every kernel
        few[0].weight.mul_(keep)
    x = _randn(gen, 1, 32, 10, 10)
    for model, has_pattern in ((many, False), (few, True)):
        exe = compile(model, (x,), policy="measure")
        _check(exe, model, x)
        reason = exe.metadata["layers"][0]["reason"]
        assert ("pattern-conv" in reason) == has_pattern, reason
    # the pattern kernel as such, whatever the timing chose: the same op with the sparse arrays
    from sparseprune import formats

    spec = exe.spec
    op = spec["ops"][0]
    op["format"] = "pattern"
    row_ptr, taps, values = formats.conv_arrays(few[0].weight.detach().numpy())
    arrays = {f"{op['weight']}.row_ptr": np.asarray(row_ptr, np.int64), f"{op['weight']}.taps": np.asarray(taps, np.int32),
              f"{op['weight']}.values": np.asarray(values, np.float32),
              f"{op['weight']}.bias": few[0].bias.detach().numpy().copy()}
    forced = sparseprune.runtime.Executable.from_spec(spec, arrays)
    assert forced.layer_table()[0]["format"] == "pattern-conv"
    _assert_close(forced.run(x.numpy()), _torch(few, x))


# --- model constants: folded tensors, parameters broadcast into activations -----------------------


class _EmbeddingsAndConstants(nn.Module):
    """Token + position embeddings (positions from torch.arange), a learned scale and shift, a
    class token expanded over the batch: what a BERT / ViT front end does with constants."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.pos = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.scale = nn.Parameter(torch.randn(16))
        self.shift = nn.Parameter(torch.randn(1, 1, 16))
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        n = ids.size(1)
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        x = self.norm(x) * self.scale - self.shift / 2 + 0.5 * self.scale
        x = torch.cat([self.cls.expand(ids.size(0), -1, -1), x], dim=1)
        return self.head(x - x / self.scale.abs().add(1.0))


def test_constants_fold_and_broadcast_into_activations(gen, tmp_path):
    model = _EmbeddingsAndConstants().eval()
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    exe = compile(model, (ids,), policy="threshold")
    _check(exe, model, ids)
    _check(exe, model, torch.randint(0, 50, (5, 9), generator=gen))  # any batch: constants are per sample
    kinds = _ops(exe)
    assert kinds.count("embedding") == 1  # the position lookup was folded into a constant
    assert "constant" in kinds and "matmul" not in kinds
    exe.save(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(sparseprune.load(tmp_path / "m.safetensors").run(ids.numpy()), exe.run(ids.numpy()))


class _ConstantOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.per_sample = nn.Parameter(torch.randn(2, 5, 4))  # one value per sample of a batch of 2

    def forward(self, x):
        return x + self.per_sample


class _ConstantOverActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.c / x


@pytest.mark.parametrize("model, shape, match", [
    (_ConstantOverActivation(), (2, 4), r"a constant divided by an activation"),
    (_ConstantOverBatch(), (2, 5, 4), r"depends on the batch size"),
])
def test_constants_that_cannot_be_per_sample_are_refused(model, shape, match, gen):
    with pytest.raises(UnsupportedOperation, match=match):
        compile(model.eval(), (_randn(gen, *shape),))


# --- slicing: getitem, chunk, split, unbind, narrow, select ----------------------------------------


class _Slicer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (fx can unpack a chunk, not loop over it)
        q, k, v = q.view(b, n, 2, 8).transpose(1, 2), k.view(b, n, 2, 8).transpose(1, 2), v.view(b, n, 2, 8).transpose(1, 2)
        y = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, e))
        first = y[:, 0]
        strided = y[:, 1:, ::2]
        tail = torch.split(y, [3, n - 3], dim=1)[1].narrow(2, 4, 5)
        picked = y.unbind(1)[2] + y.select(1, -1) + y[..., -1, :]
        halves = torch.chunk(y, 2, dim=2)[1] * y.split(8, dim=-1)[0]
        return first, strided, tail, picked, halves


def test_slicing_ops(gen):
    model = _Slicer().eval()
    x = _randn(gen, 2, 6, 16)
    exe = compile(model, (x,), policy="threshold")
    got = exe.run(x.numpy())
    want = _torch(model, x)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        _assert_close(g, w)
    x3 = _randn(gen, 3, 6, 16)
    for g, w in zip(exe.run(x3.numpy()), _torch(model, x3)):
        _assert_close(g, w)
    assert "slice" in _ops(exe)


class _Index(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return torch.relu(x)[self.index]


@pytest.mark.parametrize("index, match", [
    ((0,), r"(slices|indexes) the batch dimension"),
    ((slice(None), torch.tensor([0, 2])), r"advanced indexing"),
    ((slice(None), slice(3, 3)), r"an empty slice"),
])
def test_unsupported_indexing_is_refused(index, match, gen):
    with pytest.raises(UnsupportedOperation, match=match):
        compile(_Index(index).eval(), (_randn(gen, 2, 5, 4),))


# --- whole small models, as users write them ---------------------------------------------------------


class _TinyViT(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


class _TinyBert(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.tok, self.pos, self.typ = nn.Embedding(100, d), nn.Embedding(64, d), nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 64, batch_first=True, activation="gelu"),
                                             2, enable_nested_tensor=False)
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 3)

    def forward(self, ids, types):
        x = self.tok(ids) + self.pos(torch.arange(ids.size(1), device=ids.device)) + self.typ(types)
        x = self.encoder(self.norm(x))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_small_vit_and_bert_compile_whole(name, gen, tmp_path):
    torch.manual_seed(0)
    if name == "vit":
        model = _TinyViT().eval()
        inputs = (_randn(gen, 2, 3, 16, 16),)
    else:
        model = _TinyBert().eval()
        inputs = (torch.randint(0, 100, (2, 12), generator=gen), torch.randint(0, 2, (2, 12), generator=gen))
    for m in model.modules():  # 80% of every projection gone, as a pruned model would be
        if isinstance(m, nn.Linear):
            _magnitude_prune(m, "weight", 0.8)
        if isinstance(m, nn.MultiheadAttention):
            _magnitude_prune(m, "in_proj_weight", 0.8)
    exe = compile(model, inputs)
    want = _torch(model, *inputs)
    _assert_close(exe.run(*[x.numpy() for x in inputs]), want)
    exe.save(tmp_path / "m.safetensors")
    loaded = sparseprune.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded.run(*[x.numpy() for x in inputs]), exe.run(*[x.numpy() for x in inputs]))
    assert _ops(exe).count("attention") == 2


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (stride 1 or 2), 1x1 project, shortcut."""

    def __init__(self, c=8, expand=4, stride=1):
        super().__init__()
        h = c * expand
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.stride == 1 else y


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("policy", ["threshold", "measure"])
def test_depthwise_layers_get_the_depthwise_kernel(stride, policy, gen):
    model = _InvertedResidual(stride=stride).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
    x = _randn(gen, 2, 8, 15, 14)
    exe = compile(model, (x,), policy=policy)
    _check(exe, model, x)
    layers = {row["name"]: row for row in exe.metadata["layers"]}
    depthwise = layers["body.3"]
    if policy == "threshold":
        assert depthwise["kernel"] == "depthwise-conv"
    else:
        assert "'depthwise-conv'" in depthwise["reason"]
        assert "depthwise-conv" not in layers["body.0"]["reason"]  # a 1x1 with groups 1 is not depthwise


# --- attention padding masks ---------------------------------------------------------------------


class _MaskedEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


class _MaskedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, padding):
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def _padding(gen, batch, n):
    lengths = torch.randint(1, n + 1, (batch,), generator=gen)
    return torch.arange(n)[None, :] >= lengths[:, None]  # True = padding, at least one real token


@pytest.mark.parametrize("which", ["layer", "layer_norm_first", "encoder", "mha"])
def test_padding_masks(which, gen, tmp_path):
    torch.manual_seed(0)
    if which == "mha":
        model = _MaskedMHA().eval()
        d = 16
    else:
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=which.endswith("norm_first"))
        model = _MaskedEncoder(layer if which != "encoder" else
                               nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
        d = 16
    x, pad = _randn(gen, 3, 9, d), _padding(gen, 3, 9)
    exe = compile(model, (x, pad))
    assert exe.input_dtypes == ("float32", "bool")
    assert all(op["mask_kind"] == "bool" for op in _ops(exe, "attention"))
    _assert_close(exe.run(x.numpy(), pad.numpy()), _torch(model, x, pad))
    x2, pad2 = _randn(gen, 5, 9, d), _padding(gen, 5, 9)  # other masks, other batch
    _assert_close(exe.run(x2.numpy(), pad2.numpy()), _torch(model, x2, pad2))
    exe.save(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(sparseprune.load(tmp_path / "m.safetensors").run(x.numpy(), pad.numpy()),
                                  exe.run(x.numpy(), pad.numpy()))


class _FloatMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, padding):
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


class _MaskAsData(nn.Module):
    def forward(self, x, padding):
        return x + padding


def test_float_padding_mask_and_nested_tensor_refusal(gen):
    x = _randn(gen, 2, 5, 8)
    model = _FloatMask().eval()  # a float key_padding_mask input: added to the scores
    fmask = torch.zeros(2, 5).masked_fill(_padding(gen, 2, 5), float("-inf"))
    exe = compile(model, (x, fmask))
    assert [op["mask_kind"] for op in _ops(exe, "attention")] == ["additive"]
    fmask2 = torch.randn(3, 5, generator=gen)
    x2 = _randn(gen, 3, 5, 8)
    _assert_close(exe.run(x2.numpy(), fmask2.numpy()), _torch(model, x2, fmask2))
    # A bool input used as data is 0/1, as torch promotes it (the ATen lowering runs it).
    data = torch.rand(2, 5, 8, generator=gen) > 0.5
    exe = compile(_MaskAsData().eval(), (x, data))
    np.testing.assert_allclose(exe.run(x.numpy(), data.numpy()), (x + data).numpy(), rtol=1e-6)
    nested = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                   enable_nested_tensor=True).eval()
    if getattr(nested, "use_nested_tensor", False):
        with pytest.raises(UnsupportedOperation, match="enable_nested_tensor=False"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own nested-tensor prototype warning while compile runs it
            compile(_MaskedEncoder(nested).eval(), (x, _padding(gen, 2, 5)))


# --- torch's attention modules: masks, causal hints, all-padding rows ------------------------------


def _assert_close_nan(got, ref):
    """Equal NaN positions (a query with no key left), close elsewhere."""
    ref = ref.detach().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    _assert_close(np.nan_to_num(got), np.nan_to_num(ref))


class _MaskedAttention(nn.Module):
    """MultiheadAttention with a key padding mask input and an (L, L) attn_mask buffer."""

    def __init__(self, float_masks, cross=False, heads=2, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, heads, batch_first=True)
        self.float_masks, self.cross, self.need_weights = float_masks, cross, need_weights
        causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        self.register_buffer("mask", torch.zeros(5, 5).masked_fill(causal, float("-inf")) if float_masks
                             else causal)

    def forward(self, x, padding):
        kv = x * 1.0 if self.cross else x  # another tensor: torch's slow path
        return self.attn(x, kv, kv, key_padding_mask=padding, attn_mask=self.mask, need_weights=self.need_weights)[0]


def _as_mask(padding, float_masks):
    return torch.zeros(padding.shape).masked_fill(padding, float("-inf")) if float_masks else padding


@pytest.mark.parametrize("float_masks", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_mha_padding_and_attn_mask_combined(float_masks, cross, gen):
    torch.manual_seed(0)
    model = _MaskedAttention(float_masks, cross).eval()
    x, pad = _randn(gen, 3, 5, 8), _as_mask(_padding(gen, 3, 5), float_masks)
    exe = compile(model, (x, pad), policy="threshold")
    (att,) = _ops(exe, "attention")
    assert att["mask_kind"] == ("additive" if float_masks else "bool") and att["causal"] is False
    for batch in (3, 2):
        xb, padb = _randn(gen, batch, 5, 8), _as_mask(_padding(gen, batch, 5), float_masks)
        _assert_close(exe.run(xb.numpy(), padb.numpy()), _torch(model, xb, padb))


class _CausalEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mask", torch.triu(torch.ones(6, 6, dtype=torch.bool), 1))

    def forward(self, x, padding=None):
        if isinstance(self.encoder, nn.TransformerEncoder):
            return self.encoder(x, mask=self.mask, src_key_padding_mask=padding, is_causal=True)
        return self.encoder(x, src_mask=self.mask, src_key_padding_mask=padding, is_causal=True)


@pytest.mark.parametrize("with_padding", [False, True], ids=["causal", "causal_and_padding"])
@pytest.mark.parametrize("heads", [2, 1], ids=["fused", "sdpa"])
@pytest.mark.parametrize("which", ["layer", "layer_norm_first", "encoder"])
def test_is_causal_through_encoder_layers(which, heads, with_padding, gen):
    torch.manual_seed(0)
    layer = _encoder_layer(d=8, heads=heads, ff=16, norm_first=which.endswith("norm_first"))
    encoder = layer if which != "encoder" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = _CausalEncoder(encoder).eval()
    x = _randn(gen, 2, 6, 8)
    inputs = (x, _padding(gen, 2, 6)) if with_padding else (x,)
    exe = compile(model, inputs, policy="threshold")
    # torch's slow path (odd heads) lets the hint replace the mask unless a padding mask must be
    # merged into it; its fused kernel (even heads) always applies the mask
    hinted = heads == 1 and not with_padding
    for att in _ops(exe, "attention"):
        assert att["causal"] is hinted and ("mask" in att) is not hinted
    xb = _randn(gen, 3, 6, 8)
    more = (xb, _padding(gen, 3, 6)) if with_padding else (xb,)
    _assert_close(exe.run(*[t.numpy() for t in more]), _torch(model, *more))


@pytest.mark.parametrize("which", ["mha_self", "mha_cross", "mha_odd_heads", "mha_weights", "layer", "encoder"])
def test_all_padding_rows_match_torch(which, gen):
    """A sample whose keys are all padding: NaN where torch's fused/inference path or its
    need_weights path gives NaN, zeros where its SDPA path does (compile's own check runs on it)."""
    torch.manual_seed(0)
    if which.startswith("mha"):
        heads = 1 if which == "mha_odd_heads" else 2
        model = _MaskedAttention(False, cross=which in ("mha_cross", "mha_weights"), heads=heads,
                                 need_weights=which == "mha_weights").eval()
        model.mask.zero_()  # no causal mask: padding only
    else:
        layer = _encoder_layer(d=8, heads=2, ff=16)
        model = _MaskedEncoder(layer if which == "layer" else
                               nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x, pad = _randn(gen, 3, 5, 8), _padding(gen, 3, 5)
    pad[1] = True
    with torch.no_grad():
        ref = model(x, pad)
    assert bool(torch.isnan(ref).any()) is (which not in ("mha_cross", "mha_odd_heads"))
    exe = compile(model, (x, pad), policy="threshold")
    _assert_close_nan(exe.run(x.numpy(), pad.numpy()), ref)


def test_encoder_layer_with_tanh_gelu_runs_as_torch_does(gen):
    """torch's fused encoder kernel runs exact GELU for any nn.GELU: the executable does the same."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.GELU(approximate="tanh"),
                                       batch_first=True).eval()
    x = _randn(gen, 2, 5, 8)
    exe = compile(layer, (x,), policy="threshold")
    _check(exe, layer, _randn(gen, 3, 5, 8))
    assert [o.get("activation") for o in _ops(exe, "linear") if o["name"] == "linear1"] == ["gelu"]
