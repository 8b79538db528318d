"""Structured pruning: filters, channels, units, kernels, patterns; global ranking; invariants; interop."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from sparseprune import prune as sp


def randn(rng, *shape, scale=1.0):
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def conv(rng, c_in, c_out, k=3, scale=1.0, groups=1, bias=True):
    layer = nn.Conv2d(c_in, c_out, k, groups=groups, bias=bias, padding=k // 2)
    with torch.no_grad():
        layer.weight.copy_(randn(rng, *layer.weight.shape, scale=scale))
        if bias:
            layer.bias.copy_(randn(rng, c_out))
    return layer


def linear(rng, n_in, n_out):
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(randn(rng, n_out, n_in))
        layer.bias.copy_(randn(rng, n_out))
    return layer


def bn(rng, n):
    norm = nn.BatchNorm2d(n)
    with torch.no_grad():
        norm.weight.copy_(randn(rng, n))
        norm.bias.copy_(randn(rng, n))
        norm.running_mean.copy_(randn(rng, n))
        norm.running_var.copy_(torch.rand(n) + 0.5)
    return norm.eval()


def dead_filters(module):
    """Bool per output: whole weight[o] masked."""
    return (module.weight_mask.reshape(module.weight_mask.shape[0], -1) == 0).all(dim=1)


def dead_kernels(module):
    return (module.weight_mask.flatten(2) == 0).all(dim=2)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(path, [id(h) for h in m._forward_pre_hooks.values()], set(vars(m))) for path, m in model.named_modules()],
    )


def assert_unchanged(model, before):
    state, hooks = before
    now_state, now_hooks = snapshot(model)
    assert now_state.keys() == state.keys()
    for k in state:
        assert torch.equal(now_state[k], state[k]), k
    assert now_hooks == hooks


def count(amount, total):
    return amount if isinstance(amount, int) else round(amount * total)


# ------------------------------------------------------------------------------------------
# filters


@pytest.mark.parametrize("importance", ["l1", "l2"])
@pytest.mark.parametrize("amount", [0.0, 0.25, 0.5, 0.9, 1.0, 0, 1, 5, 8])
def test_filters_zero_exact_count_of_whole_filters_lowest_norm_first(rng, importance, amount):
    layer = conv(rng, 3, 8)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert sp.filters(layer, amount, importance=importance) is layer
    dead = dead_filters(layer)
    assert int(dead.sum()) == count(amount, 8)
    # whole filters only: surviving filters keep every entry, pruned ones lose weight and bias
    assert torch.all(layer.weight_mask[~dead] == 1)
    assert torch.all(layer.weight[dead] == 0) and torch.all(layer.bias[dead] == 0)
    assert torch.equal(layer.bias_mask, (~dead).float())
    assert torch.equal(layer.bias[~dead], b[~dead])
    norms = w.flatten(1).norm(p=1 if importance == "l1" else 2, dim=1)
    if dead.any() and not dead.all():
        assert norms[dead].max() <= norms[~dead].min()


def test_l1_and_l2_rank_filters_differently():
    layer = nn.Conv2d(1, 2, 3, bias=False)
    with torch.no_grad():
        layer.weight[0] = 1.0  # nine entries of 1: L1 = 9, L2 = 3
        layer.weight[1] = 0.0
        layer.weight[1, 0, 1, 1] = 4.0  # one entry of 4: L1 = 4, L2 = 4
    l1, l2 = copy.deepcopy(layer), copy.deepcopy(layer)
    sp.filters(l1, 1, importance="l1")
    sp.filters(l2, 1, importance="l2")
    assert dead_filters(l1).tolist() == [False, True]
    assert dead_filters(l2).tolist() == [True, False]
    assert sp.filter_norm(layer.weight, "l1").tolist() == [9.0, 4.0]
    assert sp.filter_norm(layer.weight, "l2").tolist() == [3.0, 4.0]


def test_filters_by_batchnorm_gamma_mask_the_batchnorm_too(rng):
    layer, norm = conv(rng, 3, 6), bn(rng, 6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -0.01, 2.0, 0.02, -3.0, 0.1]))
    model = nn.Sequential(layer, norm)
    sp.filters(layer, 3, importance="bn", bn=norm)
    # |gamma| = .5 .01 2 .02 3 .1: channels 1, 3, 5 go, whatever the filter norms say
    assert dead_filters(layer).tolist() == [False, True, False, True, False, True]
    keep = torch.tensor([1.0, 0, 1, 0, 1, 0])
    assert torch.equal(norm.weight_mask, keep) and torch.equal(norm.bias_mask, keep)
    out = model(randn(rng, 2, 3, 5, 5))
    assert torch.all(out[:, [1, 3, 5]] == 0)  # the feature map is zero after the BatchNorm
    assert torch.all(out[:, [0, 2, 4]].abs().sum(dim=(2, 3)) > 0)
    # importance by norm, BatchNorm given: it is masked on the same channels
    other, other_bn = conv(rng, 3, 6), bn(rng, 6)
    sp.filters(other, 0.5, importance="l2", bn=other_bn)
    assert torch.equal(other_bn.weight_mask, (~dead_filters(other)).float())


def test_filters_bn_errors_name_bn(rng):
    layer = conv(rng, 3, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="bn"):
        sp.filters(layer, 0.5, importance="bn")
    with pytest.raises(ValueError, match="bn"):
        sp.filters(layer, 0.5, importance="bn", bn=nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="bn"):
        sp.filters(layer, 0.5, importance="bn", bn=nn.BatchNorm2d(4, affine=False))
    with pytest.raises(TypeError, match="bn"):
        sp.filters(layer, 0.5, importance="bn", bn=nn.BatchNorm1d(4))
    assert_unchanged(layer, before)


def test_filters_custom_scores_and_no_bias(rng):
    layer = conv(rng, 2, 5, bias=False)
    sp.filters(layer, 2, importance=torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0]))
    assert dead_filters(layer).tolist() == [False, True, False, True, False]
    assert not hasattr(layer, "bias_mask") and layer.bias is None
    other = conv(rng, 2, 5)
    sp.filters(other, 1, importance=lambda w: -w.flatten(1).abs().sum(1))  # the largest goes
    norms = other.weight_orig.detach().flatten(1).abs().sum(1)
    assert dead_filters(other).tolist() == (norms == norms.max()).tolist()


def test_grouped_and_depthwise_filters(rng):
    layer = conv(rng, 4, 8, groups=4)  # weight [8, 1, 3, 3]
    sp.filters(layer, 0.5)
    assert int(dead_filters(layer).sum()) == 4
    x = randn(rng, 1, 4, 6, 6)
    out = layer(x)
    assert torch.all(out[:, dead_filters(layer)] == 0)


# ------------------------------------------------------------------------------------------
# channels, units, kernels


def test_channels_zero_whole_input_channels(rng):
    layer = conv(rng, 6, 4)
    w = layer.weight.detach().clone()
    sp.channels(layer, 0.5)
    dead = (layer.weight_mask.transpose(0, 1).flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 3
    assert torch.all(layer.weight_mask[:, ~dead] == 1)
    norms = w.transpose(0, 1).flatten(1).abs().sum(1)
    assert norms[dead].max() <= norms[~dead].min()
    assert not hasattr(layer, "bias_mask")  # the outputs are all still there
    # the output no longer depends on the pruned inputs
    x = randn(rng, 1, 6, 5, 5)
    y = x.clone()
    y[:, dead] = 100.0
    assert torch.allclose(layer(x), layer(y))


@pytest.mark.parametrize("importance", ["l2", "l1"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 1.0, 4])
def test_units_zero_whole_rows_and_bias(rng, importance, amount):
    layer = linear(rng, 7, 10)
    w = layer.weight.detach().clone()
    sp.units(layer, amount, importance=importance)
    dead = (layer.weight_mask == 0).all(dim=1)
    assert int(dead.sum()) == count(amount, 10)
    assert torch.all(layer.weight_mask[~dead] == 1)
    assert torch.equal(layer.bias_mask, (~dead).float())
    norms = w.norm(p=2 if importance == "l2" else 1, dim=1)
    if dead.any() and not dead.all():
        assert norms[dead].max() <= norms[~dead].min()
    out = layer(randn(rng, 3, 7))
    assert torch.all(out[:, dead] == 0)


@pytest.mark.parametrize("importance", ["l2", "l1"])
@pytest.mark.parametrize("amount", [0.0, 0.4, 0.75, 1.0, 7])
def test_kernels_zero_whole_kernels_only(rng, importance, amount):
    layer = conv(rng, 4, 5)
    w = layer.weight.detach().clone()
    sp.kernels(layer, amount, importance=importance)
    mask = layer.weight_mask.flatten(2)
    assert torch.all(mask.amax(dim=2) == mask.amin(dim=2)), "a kernel is partly pruned"
    dead = dead_kernels(layer)
    assert int(dead.sum()) == count(amount, 20)
    norms = w.flatten(2).norm(p=2 if importance == "l2" else 1, dim=2)
    if dead.any() and not dead.all():
        assert norms[dead].max() <= norms[~dead].min()
    assert torch.allclose(sp.kernel_norm(w, importance), norms)
    assert not hasattr(layer, "bias_mask")


# ------------------------------------------------------------------------------------------
# global


def test_global_filters_normalise_per_layer_and_keep_one_filter_each(rng):
    model = nn.Sequential(conv(rng, 3, 8, scale=0.01), nn.ReLU(), conv(rng, 8, 8, scale=10.0), nn.ReLU(),
                          conv(rng, 8, 4))
    raw = copy.deepcopy(model)
    assert sp.global_filters(model, 0.5) is model
    dead = [dead_filters(model[i]) for i in (0, 2, 4)]
    assert sum(int(d.sum()) for d in dead) == 10
    # normalised by each layer's mean filter norm, scale does not decide: the tiny-weight layer
    # keeps several filters, the huge-weight one loses some
    assert 0 < int(dead[0].sum()) < 7 and int(dead[1].sum()) > 0
    for i, d in zip((0, 2, 4), dead):
        assert torch.equal(model[i].bias_mask, (~d).float())
    # raw scores (normalize=None): the layer with tiny weights goes first, but keeps one filter
    sp.global_filters(raw, 0.5, normalize=None)
    assert int(dead_filters(raw[0]).sum()) == 7 and int(dead_filters(raw[2]).sum()) == 0
    assert int(dead_filters(raw[4]).sum()) == 3


def test_global_filters_selected_by_normalised_threshold(rng):
    model = nn.Sequential(conv(rng, 3, 6), nn.ReLU(), conv(rng, 6, 6, scale=5.0))
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    sp.global_filters(model, 5, importance="l2")
    pruned, kept = [], []
    for w, i in zip(weights, (0, 2)):
        norms = w.flatten(1).norm(dim=1)
        norms = norms / norms.mean()
        pruned.append(norms[dead_filters(model[i])])
        kept.append(norms[~dead_filters(model[i])])
    assert torch.cat(pruned).numel() == 5
    assert torch.cat(pruned).max() <= torch.cat(kept).min()


@pytest.mark.parametrize("amount", [1.0, 18])
def test_global_filters_never_empty_a_layer(rng, amount):
    model = nn.Sequential(conv(rng, 3, 6), nn.ReLU(), conv(rng, 6, 8), nn.ReLU(), conv(rng, 8, 4))
    sp.global_filters(model, amount)
    assert [int((~dead_filters(model[i])).sum()) for i in (0, 2, 4)] == [1, 1, 1]
    sp.global_kernels(model, 1.0)
    assert [int((~dead_kernels(model[i])).sum()) for i in (0, 2, 4)] == [1, 1, 1]


def test_global_filters_bn_pairs_by_registration_order(rng):
    model = nn.Sequential(conv(rng, 3, 4), bn(rng, 4), nn.ReLU(), conv(rng, 4, 6), bn(rng, 6), nn.ReLU())
    pairs = sp.conv_bn_pairs(model)
    assert pairs == {model[0]: model[1], model[3]: model[4]}
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.001, 1.0, 1.0]))
        model[4].weight.copy_(torch.tensor([1.0, 1.0, 0.002, 1.0, 1.0, 0.003]))
    sp.global_filters(model, 3, importance="bn")
    assert dead_filters(model[0]).tolist() == [False, True, False, False]
    assert dead_filters(model[3]).tolist() == [False, False, True, False, False, True]
    assert torch.equal(model[4].bias_mask, torch.tensor([1.0, 1, 0, 1, 1, 0]))
    out = model(randn(rng, 1, 3, 5, 5))
    assert torch.all(out[:, [2, 5]] == 0)


def test_global_filters_bn_missing_or_explicit(rng):
    model = nn.Sequential(conv(rng, 3, 4), bn(rng, 4), conv(rng, 4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'2'"):  # the second conv has no BatchNorm after it
        sp.global_filters(model, 0.5, importance="bn")
    with pytest.raises(ValueError, match="layer_types"):
        sp.global_filters(model, 0.5, layer_types=(nn.Linear,))
    with pytest.raises(ValueError, match="layer_types"):
        sp.global_kernels(nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(TypeError, match="tensor"):
        sp.global_filters(model, 0.5, importance=torch.ones(4))
    with pytest.raises(ValueError, match="normalize"):
        sp.global_filters(model, 0.5, normalize="max")
    assert_unchanged(model, before)
    # an explicit mapping: its BatchNorms are masked with their conv, whatever the importance
    sp.global_filters(model, 0.5, importance="l2", bn={model[0]: model[1]})
    assert int(dead_filters(model[0]).sum()) + int(dead_filters(model[2]).sum()) == 4
    assert torch.equal(model[1].weight_mask, (~dead_filters(model[0])).float())
    assert not hasattr(model[2], "weight_orig") or hasattr(model[2], "bias_mask")


def test_global_kernels_exact_count_and_normalised_threshold(rng):
    model = nn.Sequential(conv(rng, 2, 3), nn.ReLU(), conv(rng, 3, 4, scale=3.0))
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    sp.global_kernels(model, 0.5)
    assert int(dead_kernels(model[0]).sum()) + int(dead_kernels(model[2]).sum()) == 9
    pruned, kept = [], []
    for w, i in zip(weights, (0, 2)):
        norms = w.flatten(2).norm(dim=2)
        norms = norms / norms.mean()
        pruned.append(norms[dead_kernels(model[i])])
        kept.append(norms[~dead_kernels(model[i])])
    assert torch.cat(pruned).max() <= torch.cat(kept).min()


def test_prune_global_structured_over_linear_units(rng):
    a, b = linear(rng, 5, 6), linear(rng, 6, 4)
    pairs = sp.prune_global_structured([(a, "weight"), (b, "weight")], sp.UnitPruning(), 0.5)
    assert pairs == [(a, "weight"), (b, "weight")]
    dead = [(m.weight_mask == 0).all(dim=1) for m in (a, b)]
    assert sum(int(d.sum()) for d in dead) == 5 and all(not d.all() for d in dead)
    assert not hasattr(a, "bias_mask")  # the generic function masks only what it is given
    with pytest.raises(TypeError, match="StructuredPruning"):
        sp.prune_global_structured([(a, "weight")], sp.MagnitudeUnstructured(), 0.5)


def test_global_keep_directly():
    alive = [torch.tensor([True, True, False]), torch.tensor([True, True])]
    scores = [torch.tensor([1.0, 3.0, 0.0]), torch.tensor([10.0, 30.0])]
    # normalised: [0.5, 1.5, -] and [0.5, 1.5]; the dead one counts; ties to the lower index
    keep = sp.global_keep(alive, scores, 2, "filters")
    assert [k.tolist() for k in keep] == [[False, True, False], [True, True]]
    keep = sp.global_keep(alive, scores, 2, "filters", normalize=None)
    assert [k.tolist() for k in keep] == [[False, True, False], [True, True]]
    keep = sp.global_keep(alive, scores, 5, "filters", normalize=None)  # capped: one each
    assert [k.tolist() for k in keep] == [[False, True, False], [False, True]]
    keep = sp.global_keep(alive, scores, 1.0, "filters", min_keep=0)
    assert [k.tolist() for k in keep] == [[False, False, False], [False, False]]


# ------------------------------------------------------------------------------------------
# patterns


def check_patterns(layer, w, n_patterns, pattern_size, connectivity):
    """Structure of a pattern-pruned layer with original weight `w` (no zeros in it)."""
    out, cin, kh, kw = w.shape
    record = layer.sparseprune_patterns
    assert isinstance(record, sp.PatternAssignment)
    assert record.kernel_size == (kh, kw) and record.assignment.shape == (out, cin)
    assert 1 <= record.n_patterns <= n_patterns
    assert torch.all(record.patterns.sum(dim=1) == pattern_size)
    nz = (layer.weight.detach() != 0).reshape(out, cin, kh * kw)
    kept = nz.any(dim=2)
    n_dropped = count(connectivity, out * cin)
    assert int((~kept).sum()) == n_dropped
    assert torch.equal(record.assignment >= 0, kept)
    assert torch.all(nz[kept].sum(dim=1) == pattern_size)
    for o, i in kept.nonzero().tolist():  # each kept kernel's positions are its pattern
        assert torch.equal(nz[o, i], record.patterns[record.assignment[o, i]])
    assert torch.equal(record.mask(), nz.reshape(w.shape))
    assert len({tuple(r) for r in nz[kept].int().tolist()}) <= n_patterns
    # each kernel's pattern is its best among the chosen ones
    energy = (w.reshape(out, cin, kh * kw).square() @ record.patterns.float().T)
    best = energy.max(dim=2).values
    got = energy.gather(2, record.assignment.clamp(min=0).unsqueeze(2)).squeeze(2)
    assert torch.allclose(got[kept], best[kept])
    # dropped kernels are the ones with the lowest kept norm
    if n_dropped and kept.any():
        assert best[~kept].max() <= best[kept].min() + 1e-6


@pytest.mark.parametrize("n_patterns, pattern_size, connectivity", [
    (4, 4, 0.0), (4, 4, 0.3), (1, 4, 0.0), (8, 2, 0.5), (6, 5, 10), (4, 9, 0.0),
])
def test_patterns_3x3(rng, n_patterns, pattern_size, connectivity):
    layer = conv(rng, 6, 8)
    w = layer.weight.detach().clone()
    assert sp.patterns(layer, n_patterns, pattern_size, connectivity) is layer
    check_patterns(layer, w, n_patterns, pattern_size, connectivity)
    assert not hasattr(layer, "bias_mask")


@pytest.mark.parametrize("k, groups", [(2, 1), (5, 1), (3, 4)])
def test_patterns_other_kernel_sizes_and_groups(rng, k, groups):
    layer = conv(rng, 4, 8, k=k, groups=groups)
    w = layer.weight.detach().clone()
    sp.patterns(layer, 3, 2, 0.25)
    check_patterns(layer, w, 3, 2, 0.25)


def test_patterns_are_the_most_nominated_sets():
    layer = nn.Conv2d(1, 5, 3, bias=False)
    corners = torch.tensor([[3.0, 0.1, 3.0], [0.1, 0.2, 0.1], [3.0, 0.1, 3.0]])
    cross = torch.tensor([[0.1, 3.0, 0.1], [3.0, 0.2, 3.0], [0.1, 3.0, 0.1]])
    with torch.no_grad():
        layer.weight[:3, 0] = corners
        layer.weight[3:, 0] = cross
        layer.weight[4, 0, 1, 1] = 3.5  # kernel 4 nominates {centre, 3 of the cross}: one vote
    sp.patterns(layer, n_patterns=2, pattern_size=4)
    record = layer.sparseprune_patterns
    corner_set = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    cross_set = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert torch.equal(record.patterns[0], corner_set)  # 3 votes
    assert torch.equal(record.patterns[1], cross_set)  # 1 vote, tied with kernel 4's set; sorts first
    assert record.assignment.squeeze(1).tolist() == [0, 0, 0, 1, 1]  # kernel 4 keeps the cross's 3+3+3+3
    assert record.counts().tolist() == [3, 2]


def test_patterns_respect_earlier_masks_and_only_remove_more(rng):
    layer = conv(rng, 4, 6)
    sp.magnitude(layer, 0.3)
    before = layer.weight_mask.clone()
    sp.patterns(layer, 4, 4, 0.2)
    assert torch.all(layer.weight_mask <= before)
    record = layer.sparseprune_patterns
    nz = layer.weight.detach().flatten(2) != 0
    kept = record.assignment >= 0
    assert torch.all(nz.sum(dim=2)[kept] <= 4)
    assert torch.all(nz[~kept] == 0)
    assert torch.all(~nz[kept] | record.patterns[record.assignment[kept]])  # subset of its pattern
    assert int((~nz.any(dim=2)).sum()) >= round(0.2 * 24)


def test_pattern_assignment_from_weight_recovers_and_merges(rng):
    layer = conv(rng, 6, 8)
    sp.patterns(layer, 4, 4, 0.25)
    record = layer.sparseprune_patterns
    found = sp.pattern_assignment_from_weight(layer.weight)
    assert found.n_patterns <= 4
    assert torch.equal(found.mask(), record.mask())
    assert torch.equal(found.assignment < 0, record.assignment < 0)
    # the same patterns, possibly in another order (most used first)
    assert {tuple(p) for p in found.patterns.int().tolist()} <= {tuple(p) for p in record.patterns.int().tolist()}
    assert torch.all(found.counts()[:-1] >= found.counts()[1:])
    assert torch.equal(sp.pattern_assignment_from_weight(layer.weight.detach().numpy()).assignment, found.assignment)
    # a stray zero inside a kernel makes a subset: merged into the superset, unless asked not to
    w = layer.weight.detach().clone()
    o, i = (found.assignment >= 0).nonzero()[0].tolist()
    w[o, i].view(-1)[found.patterns[found.assignment[o, i]].nonzero()[0]] = 0.0
    merged = sp.pattern_assignment_from_weight(w, max_patterns=4)
    assert merged.n_patterns == found.n_patterns and torch.equal(merged.assignment, found.assignment)
    exact = sp.pattern_assignment_from_weight(w, merge_subsets=False)
    assert exact.n_patterns == found.n_patterns + 1
    with pytest.raises(ValueError, match="max_patterns"):
        sp.pattern_assignment_from_weight(w, max_patterns=found.n_patterns, merge_subsets=False)
    empty = sp.pattern_assignment_from_weight(torch.zeros(2, 3, 3, 3))
    assert empty.n_patterns == 0 and torch.all(empty.assignment == -1)
    assert empty.mask().shape == (2, 3, 3, 3) and not empty.mask().any()
    with pytest.raises(ValueError, match="4-D"):
        sp.pattern_assignment_from_weight(torch.ones(3, 3))
    with pytest.raises(TypeError, match="weight"):
        sp.pattern_assignment_from_weight([[1.0]])


# ------------------------------------------------------------------------------------------
# errors: wrong layers, bad arguments, model unchanged


@pytest.mark.parametrize("call, error, match", [
    (lambda m: sp.filters(m["linear"], 0.5), ValueError, "conv is a Linear"),
    (lambda m: sp.kernels(m["linear"], 0.5), ValueError, "conv is a Linear"),
    (lambda m: sp.channels(m["grouped"], 0.5), ValueError, "groups"),
    (lambda m: sp.units(m["conv"], 0.5), ValueError, "linear is a Conv2d"),
    (lambda m: sp.patterns(m["pointwise"]), ValueError, "kernel_size"),
    (lambda m: sp.patterns(m["linear"]), ValueError, "conv is a Linear"),
    (lambda m: sp.patterns(m["conv"], pattern_size=10), ValueError, "pattern_size"),
    (lambda m: sp.patterns(m["conv"], pattern_size=0), ValueError, "pattern_size"),
    (lambda m: sp.patterns(m["conv"], n_patterns=2.0), TypeError, "n_patterns"),
    (lambda m: sp.patterns(m["conv"], connectivity=1.0), ValueError, "connectivity"),
    (lambda m: sp.patterns(m["conv"], connectivity=-0.5), ValueError, "connectivity"),
    (lambda m: sp.patterns(m["conv"], connectivity="0.5"), TypeError, "connectivity"),
    (lambda m: sp.patterns(m["conv"], connectivity=100), ValueError, "connectivity"),
    (lambda m: sp.patterns(m["conv"], connectivity=16), ValueError, "connectivity"),
    (lambda m: sp.filters(m["conv"], 0.5, importance="l3"), ValueError, "importance"),
    (lambda m: sp.units(m["linear"], 0.5, importance="bn"), ValueError, "importance"),
    (lambda m: sp.kernels(m["conv"], 0.5, importance=3), TypeError, "importance"),
    (lambda m: sp.filters(m["conv"], 0.5, importance=torch.ones(3)), ValueError, "scores"),
    (lambda m: sp.filters(m["conv"].weight, 0.5), TypeError, "conv"),
])
def test_misfit_layers_and_bad_arguments_raise_and_leave_model_unchanged(rng, call, error, match):
    model = nn.ModuleDict({
        "conv": conv(rng, 4, 4), "linear": linear(rng, 4, 4),
        "grouped": conv(rng, 4, 4, groups=2), "pointwise": conv(rng, 4, 4, k=1),
    })
    sp.filters(model["conv"], 1)  # already pruned once: must not change either
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("amount, error", [
    (-1, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError),
    ("0.5", TypeError), (None, TypeError), (100, ValueError),
])
@pytest.mark.parametrize("how", ["filters", "channels", "units", "kernels", "global_filters", "global_kernels"])
def test_bad_amount_raises_naming_it(rng, how, amount, error):
    model = nn.Sequential(conv(rng, 3, 4), bn(rng, 4), conv(rng, 4, 4), nn.Flatten(), linear(rng, 16, 4))
    before = snapshot(model)
    calls = {
        "filters": lambda: sp.filters(model[0], amount, importance="bn", bn=model[1]),
        "channels": lambda: sp.channels(model[2], amount),
        "units": lambda: sp.units(model[4], amount),
        "kernels": lambda: sp.kernels(model[2], amount),
        "global_filters": lambda: sp.global_filters(model, amount),
        "global_kernels": lambda: sp.global_kernels(model, amount),
    }
    with pytest.raises(error, match="amount"):
        calls[how]()
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------
# masks: total target, invariants, interop


def test_amount_is_total_target_and_masks_only_remove_more(rng):
    layer = conv(rng, 3, 10)
    sp.filters(layer, 0.3)
    first = dead_filters(layer).clone()
    with torch.no_grad():
        layer.weight_orig[first] = 100.0  # pruned filters must not come back
    sp.filters(layer, 0.6)
    assert int(dead_filters(layer).sum()) == 6 and torch.all(dead_filters(layer)[first])
    second = layer.weight_mask.clone()
    sp.filters(layer, 0.5)  # target met already: nothing changes
    assert torch.equal(layer.weight_mask, second)
    sp.kernels(layer, 0.8)  # kernels of pruned filters count towards the kernel target
    assert int(dead_kernels(layer).sum()) == 24
    assert torch.all(dead_kernels(layer)[dead_filters(layer)])


@pytest.mark.parametrize("prune_fn", [
    lambda m: sp.filters(m[0], 0.5),
    lambda m: sp.kernels(m[0], 0.5),
    lambda m: sp.channels(m[0], 1),
    lambda m: sp.patterns(m[0], 2, 3, 0.25),
    lambda m: sp.global_filters(m, 0.5),
])
def test_weight_is_orig_times_mask_and_gradients_vanish_where_pruned(rng, prune_fn):
    model = nn.Sequential(conv(rng, 3, 4), nn.ReLU(), conv(rng, 4, 4))
    prune_fn(model)
    layer = model[0]
    assert isinstance(layer.weight_orig, nn.Parameter) and "weight" not in layer._parameters
    model(randn(rng, 2, 3, 5, 5)).square().sum().backward()
    for name in ("weight", "bias"):
        if not hasattr(layer, name + "_mask"):
            continue
        mask, orig = getattr(layer, name + "_mask"), getattr(layer, name + "_orig")
        assert torch.equal(getattr(layer, name), orig * mask)
        assert torch.all(orig.grad[mask == 0] == 0)
        assert torch.any(orig.grad[mask != 0] != 0)


def test_masked_model_equals_hand_zeroed_model(rng):
    model = nn.Sequential(conv(rng, 3, 6), bn(rng, 6), nn.ReLU(), conv(rng, 6, 6), nn.ReLU(),
                          conv(rng, 6, 4), nn.Flatten(), linear(rng, 4 * 25, 5))
    hand = copy.deepcopy(model)
    sp.filters(model[0], 2, importance="bn", bn=model[1])
    sp.kernels(model[3], 0.5)
    sp.patterns(model[5], 3, 4)
    sp.units(model[7], 2)
    with torch.no_grad():
        for i, names in [(0, ("weight", "bias")), (1, ("weight", "bias")), (3, ("weight",)), (5, ("weight",)),
                         (7, ("weight", "bias"))]:
            for name in names:
                getattr(hand[i], name).mul_(getattr(model[i], name + "_mask"))
    x = randn(rng, 2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), hand(x))


def test_interop_with_torch_prune_remove_and_sparseprune_remove(rng):
    model = nn.Sequential(conv(rng, 3, 6), bn(rng, 6), nn.ReLU(), conv(rng, 6, 6), nn.Flatten(), linear(rng, 150, 4))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.2)  # torch first
    torch_zeros = model[0].weight_mask == 0
    sp.filters(model[0], 3, importance="bn", bn=model[1])
    assert torch.all(model[0].weight_mask[torch_zeros] == 0)
    sp.patterns(model[3], 4, 4)
    torch_prune.ln_structured(model[3], "weight", amount=2, n=2, dim=0)  # torch on top of ours
    sp.units(model[5], 1)
    x = randn(rng, 2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    zeros = {i: model[i].weight_mask == 0 for i in (0, 3, 5)}
    torch_prune.remove(model[3], "weight")
    assert "weight" in model[3]._parameters and torch.equal(model[3].weight == 0, zeros[3])
    assert sp.remove(model) is model and not sp.is_pruned(model)
    for i in (0, 5):
        assert set(dict(model[i].named_parameters())) == {"weight", "bias"}
        assert torch.equal(model[i].weight == 0, zeros[i])
    assert set(dict(model[1].named_parameters())) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    # the pattern structure survives remove(): the converter can read it from the weight
    assert sp.pattern_assignment_from_weight(model[3].weight).n_patterns <= 4


def test_structured_methods_with_prune_parameter_and_compute_mask():
    mask = torch.ones(3, 2, 2, 2)
    mask[1] = 0  # filter 1 already pruned: it counts towards the target
    new = sp.FilterPruning().compute_mask(torch.tensor([1.0, 0.0, 2.0]), mask, 2)
    assert (new.flatten(1) == 0).all(dim=1).tolist() == [True, True, False]
    assert torch.equal(mask[0], torch.ones(2, 2, 2))  # input untouched
    kscores = torch.tensor([[3.0, 1.0], [2.0, 4.0], [0.5, 5.0]])
    kmask = sp.KernelPruning("l1").compute_mask(kscores, torch.ones(3, 2, 1, 1), 0.5)
    assert kmask.reshape(3, 2).tolist() == [[1, 0], [0, 1], [0, 1]]  # 3 of 6: scores 0.5, 1, 2
    with pytest.raises(ValueError, match="scores"):
        sp.FilterPruning().compute_mask(torch.ones(2), mask, 1)
    with pytest.raises(ValueError, match="4-D"):
        sp.FilterPruning().compute_mask(torch.ones(3), torch.ones(3, 4), 1)
    layer = nn.Linear(3, 4)
    sp.prune_parameter(layer, sp.UnitPruning(), 2)  # the generic path masks only the weight
    assert int((layer.weight_mask == 0).all(dim=1).sum()) == 2 and not hasattr(layer, "bias_mask")
    with pytest.raises(ValueError, match="norm"):
        sp.FilterPruning("l0")
    assert repr(sp.PatternPruning(3, 2)) == "PatternPruning(n_patterns=3, pattern_size=2)"


def test_network_slimming_penalises_gamma_then_prunes_the_smallest_across_layers():
    from sparseprune.prune.slimming import batchnorm_l1, slim
    from sparseprune.train import train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    x, y = torch.randn(48, 1, 4, 4), torch.randint(0, 3, (48,))
    assert float(batchnorm_l1(model).detach()) == pytest.approx(14.0)  # gamma starts at 1
    plain = copy.deepcopy(model)
    train(plain, x, y, epochs=20, lr=1e-2, batch_size=16, seed=0, progress=False)
    train(model, x, y, epochs=20, lr=1e-2, batch_size=16, seed=0, progress=False,
          penalty=lambda m: 0.2 * batchnorm_l1(m))
    assert float(batchnorm_l1(model).detach()) < 0.7 * float(batchnorm_l1(plain).detach())  # the penalty pulled the scales down
    gammas = torch.cat([model[1].weight.detach().abs(), model[4].weight.detach().abs()])
    floored = copy.deepcopy(model)
    pruned = slim(model, 5)
    assert sum(pruned.values()) == 5
    alive = torch.cat([model[1].weight_mask, model[4].weight_mask]) != 0
    assert gammas[~alive].max() <= gammas[alive].min()  # one threshold across both layers
    assert int((model[0].weight_mask.sum(dim=(1, 2, 3)) != 0).sum()) == int(model[1].weight_mask.sum())
    pruned = slim(floored, 10, min_kept=0.2)  # 14 channels, at least 2 of each layer's
    assert sum(pruned.values()) == 10 and all(c.out_channels - n >= 2 for c, n in pruned.items())
    with pytest.raises(ValueError, match="BatchNorm"):
        slim(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5)
