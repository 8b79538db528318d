"""sparseprune.prune.saliency: Hessian diagonals (exact, Hutchinson, Fisher), OBD, pruning at init (SNIP)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune
from sparseprune import prune as sp
from sparseprune.data import load_digits_split
from sparseprune.nn import SparseLinear
from sparseprune.prune import saliency


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split(seed=0)
    return split.x_train[:256], split.y_train[:256]


def t(rng, *shape, scale=1.0):
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def linear(rng, n_in, n_out, bias=True):
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(t(rng, n_out, n_in, scale=0.5))
        if bias:
            layer.bias.copy_(t(rng, n_out, scale=0.1))
    return layer


def mlp(rng, sizes=(6, 5, 3), act=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(act())
        layers.append(linear(rng, a, b))
    return nn.Sequential(*layers)


def classification_batch(rng, n, n_in, n_classes):
    return t(rng, n, n_in), torch.from_numpy(rng.integers(0, n_classes, n))


def weight_mask(module):
    return module.weight_mask


def zeros(module):
    return int((module.weight_mask == 0).sum())


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(path, list(m._forward_pre_hooks.values())) for path, m in model.named_modules()],
        model.training,
        [(p.requires_grad, p.grad) for p in model.parameters()],
    )


def assert_unchanged(model, before):
    state, hooks, training, grads = before
    now_state, now_hooks, now_training, now_grads = snapshot(model)
    assert now_state.keys() == state.keys()
    for k in state:
        assert torch.equal(now_state[k], state[k]), k
    assert [(p, [id(h) for h in hs]) for p, hs in now_hooks] == [(p, [id(h) for h in hs]) for p, hs in hooks]
    assert now_training == training
    assert [(r, g is None) for r, g in now_grads] == [(r, g is None) for r, g in grads]


# ------------------------------------------------------------------------------------------
# Hessian diagonal on a quadratic loss: y = W x + b, L = mean over samples and outputs of (y - t)^2.
#   d2L / dW[o,i]^2 = 2 * mean_n(x[n,i]^2) / n_out,   d2L / db[o]^2 = 2 / n_out.


def quadratic_problem(rng, n=40, n_in=5, n_out=3):
    layer = linear(rng, n_in, n_out)
    x = t(rng, n, n_in) * torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0])[:n_in]
    target = t(rng, n, n_out)
    return layer, x, target


def closed_form(x, n_out):
    w = (2.0 * x.square().mean(dim=0) / n_out).expand(n_out, x.shape[1])
    b = torch.full((n_out,), 2.0 / n_out)
    return w, b


def full_hessian(layer, x, target):
    """The whole Hessian over (W, b) flattened, by torch.autograd.functional."""
    n_w = layer.weight.numel()

    def loss(theta):
        w = theta[:n_w].reshape(layer.weight.shape)
        return F.mse_loss(x @ w.T + theta[n_w:], target)

    theta = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    return torch.autograd.functional.hessian(loss, theta)


def test_exact_matches_closed_form_with_uneven_batches(rng):
    layer, x, target = quadratic_problem(rng)
    batches = [(x[:13], target[:13]), (x[13:], target[13:])]  # weighted by size: the mean over all 40
    diag = sp.hessian_diagonal(layer, F.mse_loss, batches, method="exact")
    w, b = closed_form(x, 3)
    assert set(diag) == {layer.weight, layer.bias}
    assert torch.allclose(diag[layer.weight], w, rtol=1e-5, atol=1e-7)
    assert torch.allclose(diag[layer.bias], b, rtol=1e-5)
    assert torch.allclose(torch.cat([w.reshape(-1), b]), full_hessian(layer, x, target).diagonal(), rtol=1e-5)


def test_exact_matches_autograd_hessian_on_an_mlp(rng):
    model = mlp(rng)
    x, y = classification_batch(rng, 20, 6, 3)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss(*values):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, values)), (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in params))
    diag = sp.hessian_diagonal(model, F.cross_entropy, (x, y), method="exact")
    for k, p in enumerate(params):
        expected = blocks[k][k].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape)
        assert torch.allclose(diag[p], expected, rtol=1e-4, atol=1e-6), names[k]


def test_hutchinson_is_close_within_its_standard_error(rng):
    layer, x, target = quadratic_problem(rng)
    n_samples = 2000
    diag = sp.hessian_diagonal(layer, F.mse_loss, (x, target), n_samples=n_samples, generator=0)
    h = full_hessian(layer, x, target)
    exact = h.diagonal()
    # z_i (Hz)_i = H_ii + sum_{j != i} H_ij z_i z_j: variance sum_{j != i} H_ij^2 per probe
    std = ((h.square().sum(dim=1) - exact.square()) / n_samples).sqrt()
    got = torch.cat([diag[layer.weight].reshape(-1), diag[layer.bias]])
    assert ((got - exact).abs() <= 5 * std + 1e-6).all()
    assert (std > 0).any()  # the off-diagonal terms really make it an estimate
    again = sp.hessian_diagonal(layer, F.mse_loss, (x, target), n_samples=n_samples, generator=0)
    assert all(torch.equal(diag[p], again[p]) for p in diag)


def test_fisher_matches_mean_squared_per_sample_gradients(rng):
    layer, x, target = quadratic_problem(rng, n_out=2)
    diag = sp.hessian_diagonal(layer, F.mse_loss, [(x[:7], target[:7]), (x[7:], target[7:])], method="fisher")
    residual = (x @ layer.weight.detach().T + layer.bias.detach() - target) * (2.0 / 2)  # dL_n / dy = 2 r / n_out
    expected_w = (residual[:, :, None] * x[:, None, :]).square().mean(dim=0)
    assert diag[layer.weight].shape == layer.weight.shape
    assert (diag[layer.weight] >= 0).all() and (diag[layer.bias] >= 0).all()
    assert torch.allclose(diag[layer.weight], expected_w, rtol=1e-4, atol=1e-7)
    assert torch.allclose(diag[layer.bias], residual.square().mean(dim=0), rtol=1e-4)


def test_fisher_vmap_and_loop_agree_on_a_pruned_model(rng):
    model = mlp(rng)
    sp.magnitude(model[0], 0.5)
    x, y = classification_batch(rng, 9, 6, 3)
    params = list(model.parameters())
    with saliency._measuring(model, params):
        fast = saliency._fisher_vmap(model, F.cross_entropy, x, y, params)
        slow = saliency._fisher_loop(model, F.cross_entropy, x, y, params)
    for f, s in zip(fast, slow):
        assert torch.allclose(f, s, rtol=1e-5, atol=1e-8)
    diag = sp.hessian_diagonal(model, F.cross_entropy, (x, y), method="fisher")
    assert (diag[model[0].weight_orig][model[0].weight_mask == 0] == 0).all()
    # the pruned layer's computed weight is a plain tensor again, and the model still runs
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)
    model(x)


class _Square(torch.autograd.Function):
    """x * x without torch.func support (no setup_context): per-sample gradients fall back to a loop."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_fallbacks_give_the_same_diagonals(rng, monkeypatch):
    first, last = linear(rng, 4, 3), linear(rng, 3, 2)
    custom = nn.Sequential(first, _Lambda(_Square.apply), last)
    plain = nn.Sequential(first, _Lambda(lambda x: x * x), last)
    x, y = classification_batch(rng, 7, 4, 2)
    expected = {m: sp.hessian_diagonal(plain, F.cross_entropy, (x, y), method=m, generator=0)
                for m in ("exact", "hutchinson", "fisher")}
    got = sp.hessian_diagonal(custom, F.cross_entropy, (x, y), method="fisher")  # per-sample loop
    assert all(torch.allclose(got[p], expected["fisher"][p], atol=1e-7) for p in got)

    grad = torch.autograd.grad

    def unbatched_only(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatched_only)
    for m in ("exact", "hutchinson"):  # one Hessian-vector product at a time, same probes
        got = sp.hessian_diagonal(plain, F.cross_entropy, (x, y), method=m, generator=0)
        assert all(torch.allclose(got[p], expected[m][p], atol=1e-6) for p in got), m


def test_hessian_of_masked_entries_is_zero_and_model_untouched(rng):
    model = mlp(rng)
    sp.magnitude(model[2], 6)
    model.train()
    model[2].bias.requires_grad_(False)
    x, y = classification_batch(rng, 12, 6, 3)
    before = snapshot(model)
    for method in ("exact", "hutchinson", "fisher"):
        diag = sp.hessian_diagonal(model, F.cross_entropy, (x, y), method=method, generator=1)
        assert (diag[model[2].weight_orig][model[2].weight_mask == 0] == 0).all(), method
        assert diag[model[2].bias].abs().sum() > 0  # measured although frozen
        assert_unchanged(model, before)
    with torch.no_grad():  # works inside no_grad too
        sp.hessian_diagonal(model, F.cross_entropy, (x, y), method="exact", params=[model[0].bias])


def test_hessian_diagonal_checks_its_arguments(rng):
    model = mlp(rng)
    x, y = classification_batch(rng, 8, 6, 3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="method"):
        sp.hessian_diagonal(model, F.cross_entropy, (x, y), method="newton")
    with pytest.raises(ValueError, match="n_samples"):
        sp.hessian_diagonal(model, F.cross_entropy, (x, y), n_samples=0)
    with pytest.raises(ValueError, match="params"):
        sp.hessian_diagonal(model, F.cross_entropy, (x, y), params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="batches"):
        sp.hessian_diagonal(model, F.cross_entropy, [])
    with pytest.raises(TypeError, match="batches"):
        sp.hessian_diagonal(model, F.cross_entropy, [x])
    with pytest.raises(ValueError, match="scalar"):
        sp.hessian_diagonal(model, nn.CrossEntropyLoss(reduction="none"), (x, y), method="fisher")
    assert_unchanged(model, before)
    big = nn.Linear(200, 101)
    with pytest.raises(ValueError, match="hutchinson"):
        sp.hessian_diagonal(big, F.cross_entropy, classification_batch(rng, 4, 200, 101), method="exact")
    diag = sp.hessian_diagonal(big, F.cross_entropy, classification_batch(rng, 4, 200, 101), method="exact",
                               params=[big.bias])
    assert list(diag) == [big.bias]


# ------------------------------------------------------------------------------------------
# Optimal Brain Damage


def test_obd_saliency_function():
    w = torch.tensor([1.0, -2.0, 0.0])
    h = torch.tensor([4.0, 0.5, 3.0])
    assert torch.equal(sp.obd_saliency(w, h), torch.tensor([2.0, 1.0, 0.0]))
    assert torch.equal(sp.connection_sensitivity(w, -h), torch.tensor([4.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        sp.obd_saliency(w, h[:2])


def test_obd_prefers_low_curvature_where_magnitude_disagrees(rng):
    # one output, four inputs: large weights on nearly constant-zero inputs (tiny curvature)
    signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=(64, 4)).astype(np.float32))
    x = signs * torch.tensor([0.01, 0.1, 1.0, 10.0])  # mean x_i^2 = scale_i^2 exactly
    target = t(rng, 64, 1)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, 0.2, 0.1]]))
    by_magnitude = sp.magnitude(copy.deepcopy(layer), 2)
    assert weight_mask(by_magnitude).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # Hutchinson's noise on the tiny h_00 comes from the large off-diagonal terms: many probes
    for hessian, n_samples in (("exact", 1), ("fisher", 1), ("hutchinson", 4000)):
        pruned = sp.obd(copy.deepcopy(layer), 2, (x, target), loss_fn=F.mse_loss, hessian=hessian,
                        n_samples=n_samples, generator=0)
        # saliency = mean(x^2) w^2 = [1e-4, 2.5e-3, 0.04, 1]
        assert weight_mask(pruned).tolist() == [[0.0, 0.0, 1.0, 1.0]], hessian


@pytest.mark.parametrize("hessian", ["exact", "hutchinson", "fisher"])
def test_obd_global_prunes_the_lowest_saliency_across_layers(rng, hessian):
    model = mlp(rng, (6, 8, 3))
    x, y = classification_batch(rng, 30, 6, 3)
    reference = copy.deepcopy(model)
    diag = sp.hessian_diagonal(reference, F.cross_entropy, (x, y), method=hessian, generator=5,
                               params=[reference[0].weight, reference[2].weight])
    sal = torch.cat([sp.obd_saliency(m.weight, diag[m.weight]).reshape(-1) for m in (reference[0], reference[2])])
    result = sp.obd(model, 30, (x, y), hessian=hessian, generator=5)
    assert result is model
    keep = torch.cat([model[0].weight_mask.reshape(-1), model[2].weight_mask.reshape(-1)])
    assert int((keep == 0).sum()) == 30
    assert torch.equal(keep == 0, torch.zeros_like(keep, dtype=torch.bool).index_fill(
        0, torch.sort(sal, stable=True).indices[:30], True))
    assert not hasattr(model[0], "bias_mask")  # only weights are masked


def test_obd_per_layer_keeps_earlier_masks(rng):
    model = mlp(rng, (6, 8, 3))
    sp.magnitude(model[0], 10)
    before = model[0].weight_mask.clone()
    x, y = classification_batch(rng, 30, 6, 3)
    batches = ((x[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10))  # a one-shot iterable
    sp.obd(model, 0.5, batches, hessian="exact", global_=False)
    assert zeros(model[0]) == 24 and zeros(model[2]) == 12
    assert (model[0].weight_mask <= before).all()  # only removes more
    sp.obd(model, 0.75, (x, y), layer_types=nn.Linear, hessian="fisher", global_=False)
    assert zeros(model[0]) == 36 and zeros(model[2]) == 18
    assert sp.sparsity(model)["__global__"] == 0.75


def test_obd_errors_leave_the_model_unchanged(rng):
    model = mlp(rng, (6, 8, 3))
    sp.magnitude(model[0], 5)
    x, y = classification_batch(rng, 10, 6, 3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="amount"):
        sp.obd(model, 1.5, (x, y))
    with pytest.raises(TypeError, match="amount"):
        sp.obd(model, "half", (x, y))
    with pytest.raises(ValueError, match="hessian"):
        sp.obd(model, 0.5, (x, y), hessian="newton")
    with pytest.raises(ValueError, match="amount"):
        sp.obd(model, 73, (x, y))  # 72 weights
    with pytest.raises(ValueError, match="amount"):
        sp.obd(model, 40, (x, y), global_=False)  # fits layer 0 (48), not layer 2 (24): neither pruned
    with pytest.raises(ValueError, match="data"):
        sp.obd(model, 0.5, [])
    with pytest.raises(ValueError, match="nothing to prune"):
        sp.obd(nn.Sequential(nn.ReLU()), 0.5, (x, y))
    with pytest.raises(ValueError, match="hessian='hutchinson'"):
        sp.obd(nn.Sequential(nn.Linear(200, 101)), 0.5, classification_batch(rng, 4, 200, 101), hessian="exact")
    with pytest.raises(ValueError, match="nothing to prune"):
        sp.obd(model, 0.5, (x, y), layer_types=nn.Conv2d)
    assert_unchanged(model, before)


def test_obd_on_a_conv_net(rng):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x, y = classification_batch(rng, 8, 64, 4)
    sp.obd(model, 0.6, (x.reshape(8, 1, 8, 8), y), hessian="hutchinson", generator=0)
    assert sp.sparsity(model)["__global__"] == pytest.approx(round(0.6 * (27 + 432)) / (27 + 432))


# ------------------------------------------------------------------------------------------
# Pruning at initialisation


def test_snip_scores_are_gradient_times_weight(rng, digits):
    x, y = digits
    model = mlp(rng, (64, 16, 10), act=nn.ReLU)
    scores = sp.snip_scores(model, (x, y))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [model[0].weight, model[2].weight])
    assert list(scores) == [model[0], model[2]]
    for m, g in zip((model[0], model[2]), grads):
        assert torch.allclose(scores[m], (g * m.weight).abs(), rtol=1e-5, atol=1e-9)


def test_snip_prunes_the_requested_count_deterministically(rng, digits):
    x, y = digits
    model = mlp(rng, (64, 32, 10), act=nn.ReLU)
    twin = copy.deepcopy(model)
    scores = sp.snip_scores(model, [(x[:128], y[:128]), (x[128:], y[128:])])
    sp.at_init(model, 0.9, "snip", data=(x, y))
    sp.at_init(twin, 0.9, method="snip", data=[(x[:128], y[:128]), (x[128:], y[128:])], seed=7)
    total = 64 * 32 + 32 * 10
    assert sp.sparsity(model)["__global__"] == round(0.9 * total) / total
    assert torch.equal(model[0].weight_mask, twin[0].weight_mask)
    assert torch.equal(model[2].weight_mask, twin[2].weight_mask)
    flat = torch.cat([scores[model[0]].reshape(-1), scores[model[2]].reshape(-1)])
    threshold = torch.sort(flat).values[round(0.9 * total)]
    kept = torch.cat([model[0].weight_mask.reshape(-1), model[2].weight_mask.reshape(-1)]) != 0
    assert (flat[kept] >= threshold).all() and (flat[~kept] <= threshold).all()


def test_at_init_random_is_reproducible_with_seed(rng):
    model = mlp(rng, (16, 12, 4))
    a, b, c = (sp.at_init(copy.deepcopy(model), 0.5, seed=s) for s in (3, 3, 4))
    assert torch.equal(a[0].weight_mask, b[0].weight_mask) and torch.equal(a[2].weight_mask, b[2].weight_mask)
    assert not torch.equal(a[0].weight_mask, c[0].weight_mask)
    assert sp.sparsity(a)["__global__"] == 0.5
    per_layer = sp.at_init(copy.deepcopy(model), 0.25, "random", seed=torch.Generator().manual_seed(1), global_=False)
    assert zeros(per_layer[0]) == 48 and zeros(per_layer[2]) == 12


def test_at_init_magnitude_is_global_magnitude(rng):
    model = mlp(rng, (16, 12, 4))
    ours = sp.at_init(copy.deepcopy(model), 0.6, "magnitude")
    theirs = sp.global_magnitude(copy.deepcopy(model), 0.6)
    assert torch.equal(ours[0].weight_mask, theirs[0].weight_mask)
    assert torch.equal(ours[2].weight_mask, theirs[2].weight_mask)


def test_at_init_errors_leave_the_model_unchanged(rng, digits):
    x, y = digits
    model = mlp(rng, (64, 8, 10))
    before = snapshot(model)
    with pytest.raises(ValueError, match="data"):
        sp.at_init(model, 0.5, "snip")
    with pytest.raises(ValueError, match="method"):
        sp.at_init(model, 0.5, "lottery", data=(x, y))
    with pytest.raises(ValueError, match="amount"):
        sp.at_init(model, -1, "random")
    with pytest.raises(TypeError, match="seed"):
        sp.at_init(model, 0.5, "random", seed="abc")
    with pytest.raises(TypeError, match="global_"):
        sp.at_init(model, 0.5, "random", global_=1)
    with pytest.raises(ValueError, match="nothing to prune"):
        sp.at_init(nn.Sequential(nn.Flatten()), 0.5)
    with pytest.raises(TypeError, match="data"):
        sp.at_init(model, 0.5, "snip", data=x)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------
# Interop: remove() and convert()


@pytest.mark.parametrize("how", ["obd", "snip"])
@pytest.mark.parametrize("permanent", [False, True])
def test_pruned_models_remove_and_convert(rng, digits, how, permanent):
    x, y = digits
    model = mlp(rng, (64, 48, 10), act=nn.ReLU)
    if how == "obd":
        sp.obd(model, 0.9, (x, y), hessian="fisher", global_=False)
    else:
        sp.at_init(model, 0.9, "snip", data=(x, y), global_=False)
    if permanent:
        sp.remove(model)
        assert not sp.is_pruned(model) and isinstance(model[0].weight, nn.Parameter)
    with torch.no_grad():
        expected = model(x[:5])
        converted = sparseprune.convert(model, policy="threshold")
        got = converted(x[:5])
    sparse = [m for m in converted.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 2
    assert [round(m.sparsity, 2) for m in sparse] == [0.9, 0.9]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ issue 14: faithful methods
def test_obd_defaults_to_a_nonnegative_curvature_and_keeps_the_signed_estimate_by_name(rng, digits):
    x, y = digits
    model = mlp(rng, (64, 16, 10), act=nn.ReLU)
    default = sp.obd(copy.deepcopy(model), 0.5, (x, y))
    fisher = sp.obd(copy.deepcopy(model), 0.5, (x, y), hessian="fisher")
    for a, b in zip((default[0], default[2]), (fisher[0], fisher[2])):
        assert torch.equal(a.weight_mask, b.weight_mask)
    diag = sp.hessian_diagonal(model, F.cross_entropy, (x, y), method="hutchinson", n_samples=2, generator=0)
    assert any((d < 0).any() for d in diag.values())  # the signed estimate, available by name
    signed = sp.obd(copy.deepcopy(model), 0.5, (x, y), hessian="hutchinson", n_samples=2, generator=0)
    assert not torch.equal(signed[0].weight_mask, default[0].weight_mask)


@pytest.mark.parametrize("probes", [0, -3])
def test_obd_probes_below_one_are_refused(rng, digits, probes):
    x, y = digits
    with pytest.raises(ValueError, match="n_samples"):
        sp.obd(mlp(rng, (64, 16, 10)), 0.5, (x, y), hessian="hutchinson", n_samples=probes)


def test_snip_scores_with_batchnorm_in_training_mode_and_restores_its_statistics(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    x = t(rng, 32, 1, 8, 8, scale=3.0) + 5.0  # far from the initial running mean 0, var 1
    y = torch.from_numpy(rng.integers(0, 3, 32))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = sp.snip_scores(model, (x, y))
    twin = copy.deepcopy(model).train()
    loss = F.cross_entropy(twin(x), y)  # batch statistics, as training will normalise
    grads = torch.autograd.grad(loss, [twin[0].weight, twin[4].weight])
    for m, g, w in zip((model[0], model[4]), grads, (twin[0].weight, twin[4].weight)):
        assert torch.allclose(scores[m], (g * w).abs(), rtol=1e-4, atol=1e-7)
    assert not model.training and not model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics and the batch count restored


def test_global_rankings_warn_on_layer_collapse_and_keep_min_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 768))
    with pytest.warns(UserWarning, match=r"removes every entry of 2\.weight"):
        sp.global_magnitude(copy.deepcopy(model), 0.9)
    floored = sp.global_magnitude(copy.deepcopy(model), 0.9, min_kept=0.02)
    kept = [float((m.weight_mask != 0).float().mean()) for m in (floored[0], floored[2])]
    assert kept[1] == pytest.approx(0.02, abs=1e-6) and sum(kept) == pytest.approx(0.2, abs=1e-5)


def test_at_init_and_obd_take_min_kept(rng, digits):
    x, y = digits
    small = mlp(rng, (64, 16, 10), act=nn.ReLU)
    with torch.no_grad():
        small[2].weight.mul_(1e-3)  # the classifier's weights rank last
    with pytest.warns(UserWarning, match="layer collapse"):
        sp.at_init(copy.deepcopy(small), 0.85, "magnitude")
    floored = sp.at_init(copy.deepcopy(small), 0.85, "magnitude", min_kept=0.1)
    assert int(floored[2].weight_mask.sum()) == 16
    floored = sp.obd(copy.deepcopy(small), 0.85, (x, y), min_kept=0.1)
    assert int(floored[2].weight_mask.sum()) >= 16


@pytest.mark.parametrize("min_kept", [-0.1, 1.0, 1.5, float("nan")])
def test_min_kept_outside_zero_one_is_refused(rng, digits, min_kept):
    x, y = digits
    model = mlp(rng, (64, 16, 10))
    for call in (lambda: sp.global_magnitude(model, 0.5, min_kept=min_kept),
                 lambda: sp.at_init(model, 0.5, "random", min_kept=min_kept),
                 lambda: sp.obd(model, 0.5, (x, y), min_kept=min_kept)):
        with pytest.raises(ValueError, match="min_kept"):
            call()
    assert not sp.is_pruned(model[0])
    with pytest.raises(ValueError, match="min_kept"):  # floors that keep more than the amount leaves
        sp.global_magnitude(model, 0.95, min_kept=0.5)
