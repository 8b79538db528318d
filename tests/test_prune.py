"""sparseprune.prune: amounts, criteria, invariants of the reparametrisation, interop with torch."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import sparseprune
from sparseprune import prune as sp
from sparseprune.nn import SparseLinear


def randn(rng, *shape, scale=1.0):
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def linear(rng, n_in, n_out, bias=True, scale=1.0):
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(randn(rng, n_out, n_in, scale=scale))
        if bias:
            layer.bias.copy_(randn(rng, n_out))
    return layer


def conv(rng, c_in, c_out, k=3):
    layer = nn.Conv2d(c_in, c_out, k)
    with torch.no_grad():
        layer.weight.copy_(randn(rng, c_out, c_in, k, k))
    return layer


def mask_of(module, name="weight"):
    return getattr(module, name + "_mask")


def n_pruned(module, name="weight"):
    return int((mask_of(module, name) == 0).sum())


def snapshot(model):
    """Everything pruning could change: parameter/buffer names and values, hooks."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(path, list(m._forward_pre_hooks.values())) for path, m in model.named_modules()],
    )


def assert_unchanged(model, before):
    state, hooks = before
    now_state, now_hooks = snapshot(model)
    assert now_state.keys() == state.keys()
    for k in state:
        assert torch.equal(now_state[k], state[k]), k
    assert [(p, [id(h) for h in hs]) for p, hs in now_hooks] == [(p, [id(h) for h in hs]) for p, hs in hooks]


# ------------------------------------------------------------------------------------------
# amount


BAD_AMOUNTS = [
    (-1, ValueError),
    (-0.1, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    (True, TypeError),
    ("0.5", TypeError),
    (None, TypeError),
    (torch.tensor(0.5), TypeError),
]


@pytest.mark.parametrize("amount, error", BAD_AMOUNTS + [(10_000, ValueError)])
@pytest.mark.parametrize("how", ["magnitude", "random", "block", "global"])
def test_bad_amount_raises_naming_it_and_leaves_model_unchanged(rng, how, amount, error):
    model = nn.Sequential(linear(rng, 8, 6), nn.ReLU(), linear(rng, 6, 4))
    sp.magnitude(model[0], 0.25)  # a model already pruned once must not change either
    before = snapshot(model)
    calls = {
        "magnitude": lambda: sp.magnitude(model[0], amount),
        "random": lambda: sp.random_unstructured(model[2], amount, generator=0),
        "block": lambda: sp.block_magnitude(model[2], amount, block=(2, 1)),
        "global": lambda: sp.global_magnitude(model, amount),
    }
    with pytest.raises(error, match="amount"):
        calls[how]()
    assert_unchanged(model, before)


def test_amount_to_count_fraction_and_count():
    assert sp.amount_to_count(0.5, 10) == 5
    assert sp.amount_to_count(1.0, 10) == 10
    assert sp.amount_to_count(0.0, 10) == 0
    assert sp.amount_to_count(1, 10) == 1  # an int is a count, even 1
    assert sp.amount_to_count(np.int64(3), 10) == 3
    assert sp.amount_to_count(np.float32(0.25), 8) == 2
    assert sp.amount_to_count(10, 10) == 10
    with pytest.raises(ValueError, match="amount"):
        sp.amount_to_count(11, 10)


def test_amount_zero_installs_all_ones_mask(rng):
    layer = linear(rng, 5, 3)
    w = layer.weight.detach().clone()
    sp.magnitude(layer, 0.0)
    assert sp.is_pruned(layer) and torch_prune.is_pruned(layer)
    assert torch.equal(mask_of(layer), torch.ones(3, 5))
    assert torch.equal(layer.weight, w) and torch.equal(layer.weight_orig, w)


# ------------------------------------------------------------------------------------------
# magnitude: counts, criterion, ties, total target


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.3, 0.5, 0.999, 1.0, 0, 1, 17, 77])
def test_magnitude_prunes_exact_count_of_smallest(rng, amount):
    layer = linear(rng, 11, 7)
    w = layer.weight.detach().clone()
    sp.magnitude(layer, amount)
    expected = amount if isinstance(amount, int) else round(amount * 77)
    assert n_pruned(layer) == expected
    pruned = mask_of(layer) == 0
    if 0 < expected < 77:
        assert w.abs()[pruned].max() <= w.abs()[~pruned].min()
    assert torch.equal(layer.weight, w * mask_of(layer))


def test_magnitude_matches_torch_l1_unstructured(rng):
    ours = linear(rng, 20, 10)
    theirs = copy.deepcopy(ours)
    sp.magnitude(ours, 0.37)
    torch_prune.l1_unstructured(theirs, "weight", 0.37)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_ties_are_broken_by_flat_index_deterministically():
    layers = [nn.Linear(4, 3, bias=False) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.fill_(0.5)
        sp.magnitude(layer, 5)
    expected = torch.ones(12)
    expected[:5] = 0
    for layer in layers:
        assert torch.equal(layer.weight_mask.reshape(-1), expected)


def test_amount_is_total_target_not_share_of_remaining(rng):
    layer = linear(rng, 10, 10)
    sp.magnitude(layer, 0.5)
    first = mask_of(layer).clone()
    sp.magnitude(layer, 0.8)
    assert n_pruned(layer) == 80
    assert torch.all(mask_of(layer) <= first)  # only ever removes more
    second = mask_of(layer).clone()
    sp.magnitude(layer, 0.5)  # already past the target: nothing changes, nothing comes back
    assert torch.equal(mask_of(layer), second)


def test_entries_pruned_earlier_stay_pruned_even_if_original_grows(rng):
    layer = linear(rng, 10, 10)
    sp.magnitude(layer, 0.3)
    pruned = mask_of(layer) == 0
    with torch.no_grad():
        layer.weight_orig[pruned] = 100.0  # e.g. training moved them; they must not come back
    sp.magnitude(layer, 0.6)
    assert torch.all(mask_of(layer)[pruned] == 0)
    assert n_pruned(layer) == 60
    # the 30 new ones are the smallest of the surviving entries
    w = layer.weight_orig.detach()
    new = (mask_of(layer) == 0) & ~pruned
    kept = mask_of(layer) != 0
    assert int(new.sum()) == 30
    assert w.abs()[new].max() <= w.abs()[kept].min()


def test_conv2d_unstructured(rng):
    layer = conv(rng, 3, 4)
    w = layer.weight.detach().clone()
    sp.magnitude(layer, 0.75)
    assert n_pruned(layer) == round(0.75 * w.numel())
    pruned = mask_of(layer) == 0
    assert w.abs()[pruned].max() <= w.abs()[~pruned].min()
    x = randn(np.random.default_rng(1), 2, 3, 6, 6)
    expected = nn.functional.conv2d(x, w * mask_of(layer), layer.bias)
    assert torch.allclose(layer(x), expected)


# ------------------------------------------------------------------------------------------
# invariants of the reparametrisation


@pytest.mark.parametrize("prune_fn", [
    lambda m: sp.magnitude(m, 0.6),
    lambda m: sp.random_unstructured(m, 0.6, generator=3),
    lambda m: sp.block_magnitude(m, 0.5, block=(4, 1)),
])
def test_weight_is_orig_times_mask_and_gradients_vanish_where_pruned(rng, prune_fn):
    layer = linear(rng, 12, 8)
    prune_fn(layer)
    mask = mask_of(layer)
    assert isinstance(layer.weight_orig, nn.Parameter) and "weight" not in layer._parameters
    x = randn(rng, 5, 12)
    layer(x).square().sum().backward()
    assert torch.equal(layer.weight, layer.weight_orig * mask)
    grad = layer.weight_orig.grad
    assert torch.all(grad[mask == 0] == 0)
    assert torch.any(grad[mask != 0] != 0)
    with torch.no_grad():  # an optimizer step changes weight_orig; the forward re-masks it
        layer.weight_orig -= 0.1 * grad + 0.5
    layer(x)
    assert torch.all(layer.weight[mask == 0] == 0)
    assert torch.equal(layer.weight, layer.weight_orig * mask)


def test_missing_parameter_raises_naming_it(rng):
    layer = linear(rng, 4, 3, bias=False)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="'bias'"):
        sp.magnitude(layer, 0.5, name="bias")
    with pytest.raises(ValueError, match="'nope'"):
        sp.random_unstructured(layer, 0.5, name="nope")
    with pytest.raises(ValueError, match="'nope'"):
        sp.global_magnitude([(layer, "nope")], 0.5)
    with pytest.raises(TypeError, match="module"):
        sp.magnitude(layer.weight, 0.5)
    assert_unchanged(layer, before)


def test_prunes_other_parameters_too(rng):
    layer = linear(rng, 4, 6)
    sp.magnitude(layer, 2, name="bias")
    assert n_pruned(layer, "bias") == 2
    assert torch.equal(layer.bias, layer.bias_orig * layer.bias_mask)
    assert not hasattr(layer, "weight_mask")


# ------------------------------------------------------------------------------------------
# interop with torch.nn.utils.prune


def test_torch_understands_sparseprune_masks(rng):
    layer = linear(rng, 6, 5)
    sp.magnitude(layer, 0.4)
    sp.magnitude(layer, 0.6)  # twice: torch keeps a PruningContainer
    assert torch_prune.is_pruned(layer)
    masked = (layer.weight_orig * layer.weight_mask).detach().clone()
    torch_prune.remove(layer, "weight")
    assert not torch_prune.is_pruned(layer)
    assert isinstance(layer._parameters["weight"], nn.Parameter)
    assert torch.equal(layer.weight, masked) and int((layer.weight == 0).sum()) == 18


def test_torch_pruned_module_can_be_pruned_further(rng):
    layer = linear(rng, 10, 10)
    torch_prune.l1_unstructured(layer, "weight", amount=0.3)
    torch_zeros = layer.weight_mask == 0
    sp.random_unstructured(layer, 0.7, generator=0)
    assert n_pruned(layer) == 70
    assert torch.all(mask_of(layer)[torch_zeros] == 0)
    sp.block_magnitude(layer, 0.5, block=(1, 2))
    assert torch.all(mask_of(layer)[torch_zeros] == 0)
    # a pruned module, after torch pruning it again, is still handled
    torch_prune.random_unstructured(layer, "weight", amount=5)
    before = mask_of(layer).clone()
    sp.magnitude(layer, 0.9)
    assert n_pruned(layer) == 90 and torch.all(mask_of(layer) <= before)
    assert torch.equal(layer.weight, layer.weight_orig * mask_of(layer))


def test_remove_makes_pruning_permanent_for_torch_and_sparseprune_masks(rng):
    model = nn.Sequential(linear(rng, 8, 8), nn.ReLU(), linear(rng, 8, 6), nn.ReLU(), linear(rng, 6, 3))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    sp.magnitude(model[2], 0.5)
    sp.magnitude(model[2], 0.7)
    sp.random_unstructured(model[4], 0.3, name="bias", generator=1)
    x = randn(rng, 4, 8)
    with torch.no_grad():
        expected = model(x)
    masks = {i: model[i].weight_mask.clone() for i in (0, 2)}
    origs = {i: model[i].weight_orig for i in (0, 2)}
    assert sp.remove(model) is model
    assert not sp.is_pruned(model)
    for i in (0, 2):
        params = dict(model[i].named_parameters())
        assert set(params) == {"weight", "bias"} and not list(model[i].buffers())
        assert model[i].weight is origs[i]  # the same Parameter: optimizers keep tracking it
        assert torch.equal(model[i].weight == 0, masks[i] == 0)
    assert int((model[4].bias == 0).sum()) == 1 and "bias_orig" not in dict(model[4].named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert sp.remove(model) is model  # nothing pruned: a no-op


def test_is_pruned_sees_submodules(rng):
    model = nn.Sequential(nn.Sequential(linear(rng, 3, 3)), linear(rng, 3, 2))
    assert not sp.is_pruned(model)
    sp.magnitude(model[0][0], 0.0)
    assert sp.is_pruned(model) and sp.is_pruned(model[0]) and not sp.is_pruned(model[1])


# ------------------------------------------------------------------------------------------
# global


def test_global_threshold_is_shared(rng):
    small, large = linear(rng, 20, 10), linear(rng, 20, 10, scale=10.0)
    model = nn.Sequential(small, nn.ReLU(), large)
    weights = [small.weight.detach().clone(), large.weight.detach().clone()]
    assert sp.global_magnitude(model, 0.5) is model
    assert n_pruned(small) + n_pruned(large) == 200
    assert n_pruned(large) < n_pruned(small)  # the layer with larger weights keeps more
    pruned = torch.cat([w.abs()[mask_of(m) == 0] for w, m in zip(weights, (small, large))])
    kept = torch.cat([w.abs()[mask_of(m) != 0] for w, m in zip(weights, (small, large))])
    assert pruned.max() <= kept.min()


def test_global_over_conv_and_linear_respects_layer_types_and_earlier_masks(rng):
    model = nn.Sequential(conv(rng, 2, 4), nn.ReLU(), nn.Flatten(), linear(rng, 4 * 4 * 4, 5))
    sp.magnitude(model[3], 0.3)  # 96 of 320: below the global target of 196 of 392
    earlier = mask_of(model[3]) == 0
    total = model[0].weight.numel() + model[3].weight.numel()
    sp.global_magnitude(model, 0.5, layer_types=(nn.Conv2d, nn.Linear))
    assert n_pruned(model[0]) + n_pruned(model[3]) == round(0.5 * total)
    assert torch.all(mask_of(model[3])[earlier] == 0)
    # default layer_types is (nn.Linear,): convolutions are left alone
    other = nn.Sequential(conv(rng, 2, 4), nn.ReLU(), nn.Flatten(), linear(rng, 64, 5))
    sp.global_magnitude(other, 0.5)
    assert not sp.is_pruned(other[0]) and n_pruned(other[3]) == 160
    assert model[0](randn(rng, 1, 2, 6, 6)).shape == (1, 4, 4, 4)


def test_global_with_explicit_pairs(rng):
    a, b = linear(rng, 6, 4), linear(rng, 6, 4)
    out = sp.global_magnitude([(a, "weight"), (b, "bias")], 10)
    assert out == [(a, "weight"), (b, "bias")]
    assert n_pruned(a) + n_pruned(b, "bias") == 10
    assert not hasattr(b, "weight_mask")


def test_global_errors_leave_everything_unchanged(rng):
    model = nn.Sequential(linear(rng, 4, 4), nn.ReLU(), linear(rng, 4, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer_types"):
        sp.global_magnitude(model, 0.5, layer_types=(nn.Conv2d,))
    with pytest.raises(ValueError, match="'bias2'"):  # the first pair is fine, the second is not
        sp.global_magnitude([(model[0], "weight"), (model[2], "bias2")], 0.5)
    with pytest.raises(ValueError, match="twice"):
        sp.global_magnitude([(model[0], "weight"), (model[0], "weight")], 0.5)
    with pytest.raises(ValueError, match="amount"):
        sp.global_magnitude([(model[0], "weight"), (model[2], "weight")], 25)
    with pytest.raises(TypeError, match="layer_types"):
        sp.global_magnitude(model, 0.5, layer_types="Linear")
    with pytest.raises(ValueError, match="blocks"):
        sp.prune_global([(model[0], "weight")], sp.BlockMagnitude((2, 1)), 0.5)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------
# block


def reference_blocks(shape, block):
    """Slices of every (possibly partial) block, by plain loops."""
    r, c = block
    return {
        (i, j): (slice(i * r, min((i + 1) * r, shape[0])), slice(j * c, min((j + 1) * c, shape[1])))
        for i in range(math.ceil(shape[0] / r))
        for j in range(math.ceil(shape[1] / c))
    }


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (8, 1), (2, 3)])
@pytest.mark.parametrize("shape", [(16, 12), (10, 7), (3, 2)])
@pytest.mark.parametrize("amount", [0.0, 0.5, 0.9, 1.0, 2])
def test_block_magnitude_zeros_whole_blocks_lowest_norm_first(rng, block, shape, amount):
    layer = linear(rng, shape[1], shape[0])
    w = layer.weight.detach().clone()
    blocks = reference_blocks(shape, block)
    n_blocks = len(blocks)
    if isinstance(amount, int) and amount > n_blocks:
        pytest.skip("more blocks than the matrix has")
    sp.block_magnitude(layer, amount, block=block)
    mask = mask_of(layer)
    dead, alive = [], []
    for sl in blocks.values():
        values = mask[sl]
        assert torch.all(values == values.reshape(-1)[0]), "a block is partly pruned"
        (dead if values.reshape(-1)[0] == 0 else alive).append(float(w[sl].norm()))
    expected = amount if isinstance(amount, int) else round(amount * n_blocks)
    assert len(dead) == expected
    if dead and alive:
        assert max(dead) <= min(alive) + 1e-6
    assert torch.equal(layer.weight, w * mask)


def test_block_shapes_by_reshape(rng):
    layer = linear(rng, 12, 16)
    sp.block_magnitude(layer, 0.75, block=(4, 1))
    blocks = mask_of(layer).reshape(4, 4, 12)  # [block row, row in block, col]
    assert torch.all(blocks.amax(dim=1) == blocks.amin(dim=1))
    assert int((blocks[:, 0, :] == 0).sum()) == 36
    layer = linear(rng, 12, 16)
    sp.block_magnitude(layer, 0.5, block=(1, 4))
    blocks = mask_of(layer).reshape(16, 3, 4)  # [row, block col, col in block]
    assert torch.all(blocks.amax(dim=2) == blocks.amin(dim=2))
    assert int((blocks[:, :, 0] == 0).sum()) == 24


def test_block_l2_matches_loops(rng):
    w = randn(rng, 10, 7)
    scores = sp.block_l2(w, (4, 3))
    assert scores.shape == (3, 3)
    for (i, j), sl in reference_blocks((10, 7), (4, 3)).items():
        assert math.isclose(float(scores[i, j]), float(w[sl].norm()), rel_tol=1e-5)


def test_block_total_target_and_earlier_unstructured_zeros(rng):
    layer = linear(rng, 8, 16)
    sp.magnitude(layer, 0.1)
    unstructured = mask_of(layer) == 0
    sp.block_magnitude(layer, 0.5, block=(4, 1))
    sp.block_magnitude(layer, 0.8, block=(4, 1))
    blocks = mask_of(layer).reshape(4, 4, 8)
    dead_blocks = int((blocks.amax(dim=1) == 0).sum())
    assert dead_blocks == round(0.8 * 32)
    assert torch.all(mask_of(layer)[unstructured] == 0)  # surviving blocks keep earlier zeros


def test_block_rejects_4d_weights_and_bad_blocks(rng):
    layer = conv(rng, 2, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="2-D"):
        sp.block_magnitude(layer, 0.5)
    assert_unchanged(layer, before)
    lin = linear(rng, 4, 4)
    before = snapshot(lin)
    for block, error in [((0, 1), ValueError), ((4,), TypeError), ((1.5, 1), TypeError), ("41", TypeError)]:
        with pytest.raises(error, match="block"):
            sp.block_magnitude(lin, 0.5, block=block)
    with pytest.raises(ValueError, match="amount"):
        sp.block_magnitude(lin, 5, block=(2, 2))  # 4 blocks only: an int amount counts blocks
    assert_unchanged(lin, before)


# ------------------------------------------------------------------------------------------
# random


def test_random_is_reproducible_by_seed_and_differs_across_seeds(rng):
    base = linear(rng, 16, 16)
    masks = {}
    for key, gen in [("a", 7), ("b", 7), ("c", 8), ("g", torch.Generator().manual_seed(7))]:
        layer = copy.deepcopy(base)
        sp.random_unstructured(layer, 0.5, generator=gen)
        assert n_pruned(layer) == 128
        masks[key] = mask_of(layer)
    assert torch.equal(masks["a"], masks["b"]) and torch.equal(masks["a"], masks["g"])
    assert not torch.equal(masks["a"], masks["c"])
    # generator=None draws from torch's global RNG
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        layer = copy.deepcopy(base)
        sp.random_unstructured(layer, 0.5)
        runs.append(mask_of(layer))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(TypeError, match="generator"):
        sp.random_unstructured(copy.deepcopy(base), 0.5, generator="seed")


def test_random_does_not_follow_magnitude(rng):
    layer = linear(rng, 20, 20)
    w = layer.weight.detach().clone()
    sp.random_unstructured(layer, 0.5, generator=0)
    pruned = mask_of(layer) == 0
    assert not w.abs()[pruned].max() <= w.abs()[~pruned].min()


# ------------------------------------------------------------------------------------------
# methods and importance as separate pieces


def test_custom_method_cannot_bring_entries_back(rng):
    class KeepEverything(sp.PruningMethod):
        def compute_mask(self, scores, mask, amount):
            return torch.ones_like(mask)

    layer = linear(rng, 5, 5)
    sp.magnitude(layer, 0.4)
    before = mask_of(layer).clone()
    sp.prune_parameter(layer, KeepEverything(), 0.0)
    assert torch.equal(mask_of(layer), before)


def test_importance_can_be_replaced(rng):
    layer = linear(rng, 4, 3)
    scores = torch.arange(12, dtype=torch.float32).flip(0).reshape(3, 4)  # last entries score lowest
    sp.prune_parameter(layer, sp.MagnitudeUnstructured(), 4, importance=scores)
    assert torch.equal(mask_of(layer).reshape(-1)[-4:], torch.zeros(4))
    assert n_pruned(layer) == 4
    other = linear(rng, 4, 3)
    sp.prune_parameter(other, sp.MagnitudeUnstructured(), 0.5, importance=lambda w: -w.abs())
    pruned = mask_of(other) == 0
    assert other.weight_orig.abs()[pruned].min() >= other.weight_orig.abs()[~pruned].max()


def test_compute_mask_directly():
    # An already-pruned entry counts towards the total even when its score is high.
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    new = sp.MagnitudeUnstructured().compute_mask(scores, mask, 0.6)  # 3 of 5; one already gone
    assert torch.equal(new, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(mask, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))  # input untouched
    bool_mask = sp.MagnitudeUnstructured().compute_mask(scores, mask != 0, 1)
    assert bool_mask.dtype == torch.bool and torch.equal(bool_mask, mask != 0)  # target already met
    # Blocks (1, 2) over 5 columns: the last block is partial.
    block = sp.BlockMagnitude((1, 2))
    assert torch.equal(
        block.compute_mask(torch.tensor([[2.0, 1.0, 3.0]]), torch.ones(1, 5), 1),
        torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]),
    )
    # The dead partial block (score 3) counts towards amount=2; one more block goes.
    assert torch.equal(
        block.compute_mask(torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]]), 2),
        torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]),
    )
    with pytest.raises(ValueError, match="scores"):
        block.compute_mask(torch.ones(1, 2), torch.ones(1, 5), 1)


# ------------------------------------------------------------------------------------------
# sparsity report and convert()


def test_sparsity_report(rng):
    model = nn.Sequential(conv(rng, 2, 3), nn.ReLU(), nn.Flatten(), linear(rng, 48, 10), nn.Linear(10, 2))
    sp.magnitude(model[0], 0.5)  # 54 entries -> 27 zeros
    sp.magnitude(model[3], 120)
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].weight[0, 0] = 1.0
    report = sp.sparsity(model)
    assert set(report) == {"0", "3", "4", "__global__"}
    assert report["0"] == 27 / 54 and report["3"] == 120 / 480 and report["4"] == 19 / 20
    assert report["__global__"] == (27 + 120 + 19) / (54 + 480 + 20)
    assert set(sp.sparsity(model, layer_types=nn.Linear)) == {"3", "4", "__global__"}
    with torch.no_grad():  # an optimizer step without a forward: the report uses orig * mask
        model[3].weight_orig.fill_(1.0)
    assert sp.sparsity(model)["3"] == 120 / 480
    assert sp.sparsity(model[3]) == {"Linear": 0.25, "__global__": 0.25}
    assert sp.sparsity(nn.ReLU()) == {"__global__": 0.0}


@pytest.mark.parametrize("permanent", [False, True])
def test_pruned_model_converts_to_same_outputs(rng, permanent):
    model = nn.Sequential(linear(rng, 32, 64), nn.ReLU(), linear(rng, 64, 16), nn.ReLU(), linear(rng, 16, 8))
    sp.magnitude(model[0], 0.8)
    sp.block_magnitude(model[2], 0.9, block=(4, 1))
    sp.global_magnitude([(model[4], "weight")], 0.75)
    if permanent:
        sp.remove(model)
    x = randn(rng, 5, 32)
    with torch.no_grad():
        expected = model(x)
        converted = sparseprune.convert(model, policy="threshold")
        got = converted(x)
    sparse = [m for m in converted.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3
    assert [round(m.sparsity, 2) for m in sparse] == [0.8, 0.9, 0.75]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
