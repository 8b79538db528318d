"""Depth pruning (layer-wise neurons, whole layers/blocks), random-mask ensembles and learned channel gates.

Models are tiny MLPs and CNNs; the gate tests train a 64-128-128-10 MLP on 600 digits for a second.
"""
import copy

import pytest
import torch
from torch import nn

import sparseprune
from sparseprune.data import load_digits_split
from sparseprune.nn import SparseConv2d, SparseLinear
from sparseprune.prune import (
    GatedLayer,
    RandomMaskEnsemble,
    add_channel_gates,
    gate_l1_penalty,
    gated_layers,
    is_pruned,
    layerwise_neuron_prune,
    remove_gates,
    remove_layers,
    single_random_mask,
    train_with_gate_penalty,
)
from sparseprune.shrink import shrink
from sparseprune.train import evaluate_accuracy, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split(seed=0)
    return split.x_train[:600], split.y_train[:600], split.x_test[:300], split.y_test[:300]


def mlp(*widths, act=nn.ReLU):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def dead_rows(linear):
    """Indices of the output units whose weight row and bias are all zero (effective values)."""
    w, b = linear.weight.detach(), linear.bias.detach()
    return {int(i) for i in ((w == 0).all(dim=1) & (b == 0)).nonzero().flatten()}


def linear_shapes(model):
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# ---------------------------------------------------------------------------------------------
# Layer-wise neuron pruning


def test_layerwise_prunes_exact_counts_in_order_and_shrinks():
    model = mlp(20, 16, 12, 4)
    x = torch.randn(64, 20)
    calls = []
    layerwise_neuron_prune(model, 0.25, x, train_fn=lambda m, step: calls.append((step.layer, step.name, step.next_name)))
    assert calls == [(0, "0", "2"), (1, "2", "4")]  # input to output, one hidden layer at a time
    assert len(dead_rows(model[0])) == 4 and len(dead_rows(model[2])) == 3
    assert dead_rows(model[4]) == set()  # the output layer is never pruned
    report = model.sparseprune_layerwise_report
    assert [(s.n_units, s.n_pruned, len(s.pruned)) for s in report] == [(16, 4, 4), (12, 3, 3)]
    assert set(report[0].pruned) == dead_rows(model[0]) and set(report[1].pruned) == dead_rows(model[2])
    assert all(s.loss_before is None for s in report)  # no targets, no loss

    small = shrink(model, (x,))
    assert linear_shapes(small) == [(12, 20), (9, 12), (4, 9)]
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_layerwise_scores_are_the_next_layer_reconstruction_error_and_slide():
    model = mlp(10, 8, 6, 3)
    x = torch.randn(50, 10)
    reference = copy.deepcopy(model)
    layerwise_neuron_prune(model, [3, 2], x)
    report = model.sparseprune_layerwise_report

    with torch.no_grad():
        a = torch.relu(reference[0](x))
        expected = (a ** 2).mean(0) * (reference[2].weight ** 2).sum(0)
        torch.testing.assert_close(report[0].scores, expected)
        lowest = set(torch.argsort(expected)[:3].tolist())
        assert set(report[0].pruned) == lowest
        # the window slides on the pruned model: layer 2's statistics see layer 0's neurons gone
        keep = torch.ones(8)
        keep[list(lowest)] = 0
        a0 = torch.relu(reference[0](x)) * keep
        a1 = torch.relu(reference[2](a0))
        expected1 = (a1 ** 2).mean(0) * (reference[4].weight ** 2).sum(0)
        torch.testing.assert_close(report[1].scores, expected1)
        assert set(report[1].pruned) == set(torch.argsort(expected1)[:2].tolist())


def test_layerwise_prunes_neurons_the_next_layer_ignores_first():
    model = mlp(10, 8, 6, 3)
    with torch.no_grad():
        model[2].weight[:, [1, 6]] = 0  # neurons 1 and 6 of the first hidden layer reach nothing
    layerwise_neuron_prune(model, [2, 0], torch.randn(40, 10))
    assert dead_rows(model[0]) == {1, 6}
    assert dead_rows(model[2]) == set()
    assert model.sparseprune_layerwise_report[0].scores[[1, 6]].tolist() == [0.0, 0.0]


def test_layerwise_with_a_nonzero_pruned_value_still_shrinks():
    """Sigmoid(0) = 0.5: a pruned neuron carries a constant, which shrink folds into the next bias."""
    model = mlp(10, 8, 6, 3, act=nn.Sigmoid)
    x = torch.randn(40, 10)
    layerwise_neuron_prune(model, 0.5, x)
    small = shrink(model, (x,))
    assert linear_shapes(small) == [(4, 10), (3, 4), (3, 3)]
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_layerwise_loss_criterion_and_retraining_keep_masks(digits):
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = mlp(64, 32, 32, 10)
    train(model, x, y, epochs=5, lr=1e-2, progress=False)
    seen = []

    def retrain(m, step):
        sub = m[step.start:step.stop + 1]
        assert isinstance(sub[0], nn.Linear) and sub[0] is m[step.start] and sub[-1] is m[step.stop]
        train(m, x, y, epochs=2, lr=1e-3, progress=False)
        seen.append(step.layer)

    with pytest.raises(ValueError, match="data"):
        layerwise_neuron_prune(model, 0.5, x, criterion="loss")  # the loss needs the labels
    assert not is_pruned(model)
    layerwise_neuron_prune(model, 0.5, (x, y), criterion="loss", train_fn=retrain)
    assert seen == [0, 1]
    assert len(dead_rows(model[0])) == 16 and len(dead_rows(model[2])) == 16  # retraining kept the zeros
    report = model.sparseprune_layerwise_report
    assert report[0].loss_before is not None and report[1].loss_after is not None
    assert report[1].loss_before == report[0].loss_after
    assert evaluate_accuracy(model, x, y) > 0.8


@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Linear(4, 4), "nn.Sequential"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "two nn.Linear"),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), "'1' .BatchNorm1d"),
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 2)), "'2' takes 6 inputs"),
    ],
)
def test_layerwise_refuses_non_mlps(model, match):
    saved = state(model)
    with pytest.raises(ValueError, match=match):
        layerwise_neuron_prune(model, 0.5, torch.randn(5, 4))
    assert same_state(model, saved) and not is_pruned(model)


def test_layerwise_bad_amount_leaves_model_unchanged():
    model = mlp(10, 8, 6, 3)
    saved = state(model)
    with pytest.raises(ValueError, match="amount=7"):
        layerwise_neuron_prune(model, 7, torch.randn(5, 10))  # the second hidden layer has 6 units
    with pytest.raises(ValueError, match="amount holds 3 values"):
        layerwise_neuron_prune(model, [1, 1, 1], torch.randn(5, 10))
    with pytest.raises(ValueError, match="amount"):
        layerwise_neuron_prune(model, 1.5, torch.randn(5, 10))
    assert same_state(model, saved) and not is_pruned(model)


# ---------------------------------------------------------------------------------------------
# Removing whole layers and blocks


def test_remove_layers_drops_the_identity_like_mlp_layer():
    model = mlp(10, 16, 16, 16, 4)
    with torch.no_grad():
        model[4].weight.copy_(torch.eye(16))  # after a ReLU, Linear(eye) + ReLU is the identity
        model[4].bias.zero_()
    x = torch.randn(80, 10)
    with torch.no_grad():
        target = model(x)
    saved = state(model)
    # the loss: how far the outputs move from the input model's (so every real change costs)
    smaller, report = remove_layers(model, 1, (x, target), loss_fn=nn.functional.mse_loss)
    assert set(report.increases) == {"2+3", "4+5"}  # square Linear + activation pairs only
    assert report.removed == ["4+5"]
    assert abs(report.increases["4+5"]) < 1e-6 and report.increases["2+3"] > 1e-3
    assert isinstance(smaller[4], nn.Identity) and isinstance(smaller[5], nn.Identity)
    assert isinstance(model[4], nn.Linear) and same_state(model, saved)  # input untouched
    torch.testing.assert_close(smaller(x), model(x))
    assert report.final_loss == pytest.approx(report.base_loss, abs=1e-6)


class Block(nn.Module):
    """relu(x + conv2(relu(conv1(x)))), or with a 1x1 strided shortcut when it downsamples."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.conv2(torch.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 8), Block(8, 8), Block(8, 16, stride=2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_remove_layers_ranks_residual_blocks_and_re_ranks():
    model = TinyResNet()
    with torch.no_grad():
        model.blocks[1].conv2.weight.zero_()  # block 1 only passes relu(x) = x through
        model.blocks[1].conv2.bias.zero_()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        target = model(x)
    smaller, report = remove_layers(model, 2, (x, target), loss_fn=nn.functional.mse_loss)
    # the downsampling block changes the shape: not a candidate
    assert set(report.rounds[0]) == {"blocks.0", "blocks.1", "blocks.2"}
    assert report.removed[0] == "blocks.1" and abs(report.rounds[0]["blocks.1"]) < 1e-6
    assert set(report.rounds[1]) == {"blocks.0", "blocks.2"}  # re-ranked on the smaller model
    second = min(report.rounds[1], key=report.rounds[1].get)
    assert report.removed == ["blocks.1", second] and len(report.losses) == 2
    assert isinstance(smaller.blocks[1], nn.Identity) and isinstance(smaller.blocks[int(second[-1])], nn.Identity)
    assert isinstance(model.blocks[1], Block)
    assert smaller(x).shape == (16, 5)


def test_remove_layers_candidates_and_errors():
    model = mlp(10, 16, 16, 16, 4)
    x = torch.randn(30, 10)
    y = torch.randint(0, 4, (30,))
    saved = state(model)
    _, report = remove_layers(model, 0, (x, y))  # n=0 measures only
    assert report.removed == [] and len(report.rounds) == 1 and set(report.increases) == {"2+3", "4+5"}
    _, report = remove_layers(model, 1, (x, y), candidates=["2+3"])
    assert report.removed == ["2+3"]
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    _, cnn_report = remove_layers(cnn, 1, (torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])))
    assert list(cnn_report.increases) == ["2+3+4"] and cnn_report.removed == ["2+3+4"]  # pooling ends a layer
    with pytest.raises(ValueError, match="n=3"):
        remove_layers(model, 3, (x, y))
    with pytest.raises(ValueError, match="n must be"):
        remove_layers(model, -1, (x, y))
    with pytest.raises(ValueError, match="candidates entry '0\\+1'"):
        remove_layers(model, 1, (x, y), candidates=["0+1"])  # 10 -> 16: not shape-preserving
    with pytest.raises(ValueError, match="candidates names 'nope'"):
        remove_layers(model, 1, (x, y), candidates=["nope"])
    with pytest.raises(ValueError, match="data"):
        remove_layers(model, 1, x)
    assert same_state(model, saved)


# ---------------------------------------------------------------------------------------------
# Random-mask ensembles


def masks(model):
    return [m.weight_mask for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_ensemble_is_the_mean_of_independent_sparse_members():
    model = mlp(20, 32, 32, 32, 4)
    ens = RandomMaskEnsemble(model, 3, 0.6, seed=5)
    assert not is_pruned(model) and len(ens.members) == 3
    x = torch.randn(7, 20)
    outs = torch.stack([member(x) for member in ens.members])
    torch.testing.assert_close(ens(x), outs.mean(0))
    torch.testing.assert_close(ens.member_outputs(x), outs)
    for member in ens.members:
        for mask in masks(member):
            assert int((mask == 0).sum()) == round(0.6 * mask.numel())  # the requested sparsity, per layer
        assert not torch.equal(masks(member)[1], masks(member)[2])  # same-shape layers, different masks
    for i in range(3):
        for j in range(i + 1, 3):
            assert all(not torch.equal(a, b) for a, b in zip(masks(ens.members[i]), masks(ens.members[j])))
    # member i is the single random mask with seed + i
    single = single_random_mask(model, 0.6, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(masks(single), masks(ens.members[1])))
    torch.testing.assert_close(single(x), ens.members[1](x))


def test_ensemble_fine_tunes_with_masks_in_force(digits):
    x, y, _, _ = digits
    ens = RandomMaskEnsemble(mlp(64, 32, 10), 2, 0.5)
    before = [m.weight_orig.clone() for m in ens.modules() if isinstance(m, nn.Linear)]
    train(ens, x, y, epochs=2, lr=1e-2, progress=False)
    layers = [m for m in ens.modules() if isinstance(m, nn.Linear)]
    assert any(not torch.equal(b, m.weight_orig) for b, m in zip(before, layers))
    for m in layers:
        assert torch.all(m.weight[m.weight_mask == 0] == 0)
    ens.make_permanent()
    assert not is_pruned(ens) and all(isinstance(m.weight, nn.Parameter) for m in layers)


def test_ensemble_converts_member_by_member():
    mlp_ens = RandomMaskEnsemble(mlp(20, 32, 32, 4), 2, 0.8)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    cnn_ens = RandomMaskEnsemble(cnn, 2, 0.8, seed=3)
    for ens, x, kind in ((mlp_ens, torch.randn(5, 20), SparseLinear), (cnn_ens, torch.randn(2, 3, 8, 8), SparseConv2d)):
        converted = sparseprune.convert(ens, policy="threshold")
        assert isinstance(converted, RandomMaskEnsemble)
        for member in converted.members:
            assert any(isinstance(m, kind) for m in member.modules())
        assert all(c.path.startswith("members.") for c in converted.sparseprune_report.layers)
        assert len(converted.sparseprune_report.converted) >= 2
        with torch.no_grad():
            torch.testing.assert_close(converted(x), ens(x), rtol=1e-4, atol=1e-5)


def test_ensemble_errors_leave_the_model_unchanged():
    model = mlp(4, 6, 2)
    saved = state(model)
    with pytest.raises(ValueError, match="k must be"):
        RandomMaskEnsemble(model, 0, 0.5)
    with pytest.raises(ValueError, match="amount"):
        RandomMaskEnsemble(model, 2, 1.5)
    with pytest.raises(ValueError, match="amount=20"):
        RandomMaskEnsemble(model, 2, 20)  # the second layer has 12 weights
    with pytest.raises(ValueError, match="layer_types"):
        single_random_mask(model, 0.5, layer_types=(nn.Conv2d,))
    with pytest.raises(ValueError, match="seed"):
        single_random_mask(model, 0.5, seed=-1)
    assert same_state(model, saved) and not is_pruned(model)


# ---------------------------------------------------------------------------------------------
# Learned channel gates


def test_gates_wrap_layers_without_changing_outputs():
    model = mlp(64, 128, 128, 10)
    x = torch.randn(4, 64)
    expected = model(x)
    assert add_channel_gates(model) is model
    assert isinstance(model[0], GatedLayer) and isinstance(model[2], GatedLayer)
    assert isinstance(model[4], nn.Linear)  # exclude="last": the logits are not gated
    assert [name for name, _ in gated_layers(model)] == ["0", "2"]
    torch.testing.assert_close(model(x), expected)
    penalty = gate_l1_penalty(model)
    assert penalty.requires_grad and float(penalty.detach()) == 256.0
    add_channel_gates(model)  # already gated layers are skipped
    assert [name for name, _ in gated_layers(model)] == ["0", "2"]
    everything = add_channel_gates(mlp(4, 3, 2), exclude=())
    assert len(list(gated_layers(everything))) == 2


def test_remove_gates_folds_conv_and_linear_gates_exactly():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 36, 8), nn.ReLU(), nn.Linear(8, 3))
    add_channel_gates(model)
    assert [name for name, _ in gated_layers(model)] == ["0", "2", "5"]
    with torch.no_grad():
        for _, g in gated_layers(model):
            g.gate.copy_(torch.randn_like(g.gate))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    plain = remove_gates(model, threshold=0.0)
    assert not list(gated_layers(plain)) and isinstance(plain[0], nn.Conv2d) and not is_pruned(plain)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_gate_penalty_training_remove_and_shrink(digits):
    x, y, xt, yt = digits
    torch.manual_seed(0)
    baseline = add_channel_gates(mlp(64, 128, 128, 10))
    train_with_gate_penalty(baseline, x, y, l1=0.0, epochs=10, lr=1e-2, progress=False)
    assert all(int((g.gate.abs() < 1e-2).sum()) == 0 for _, g in gated_layers(baseline))

    torch.manual_seed(0)
    gated = add_channel_gates(mlp(64, 128, 128, 10))
    losses = train_with_gate_penalty(gated, x, y, l1=1e-2, epochs=30, lr=1e-2, progress=False)
    assert len(losses) == 30 and losses[-1] < losses[0]
    alive = [int((g.gate.detach().abs() >= 1e-2).sum()) for _, g in gated_layers(gated)]
    assert all(10 <= 128 - n for n in alive), alive  # the penalty closed a good share of the gates
    gated_acc = evaluate_accuracy(gated, xt, yt)
    assert gated_acc > 0.85
    with torch.no_grad():
        expected = gated(xt)

    folded = remove_gates(copy.deepcopy(gated), threshold=0.0)
    with torch.no_grad():
        torch.testing.assert_close(folded(xt), expected, rtol=1e-4, atol=1e-4)

    pruned = remove_gates(copy.deepcopy(gated))  # threshold 1e-2
    assert [len(dead_rows(pruned[i])) for i in (0, 2)] == [128 - n for n in alive]
    small = shrink(pruned, (x,))
    assert linear_shapes(small) == [(alive[0], 64), (alive[1], alive[0]), (10, alive[1])]
    with torch.no_grad():
        out = small(xt)
        torch.testing.assert_close(out, pruned(xt), rtol=1e-4, atol=1e-4)
        assert (out - expected).abs().max() < 0.05  # only channels gated below 1e-2 went
    assert (out.argmax(1) == expected.argmax(1)).float().mean() > 0.98
    assert evaluate_accuracy(small, xt, yt) >= gated_acc - 0.02

    half = shrink(remove_gates(copy.deepcopy(gated), keep_fraction=0.5), (x,))
    assert linear_shapes(half) == [(64, 64), (64, 64), (10, 64)]


def test_gate_errors_leave_the_model_unchanged():
    plain = mlp(4, 6, 2)
    with pytest.raises(ValueError, match="no GatedLayer"):
        gate_l1_penalty(plain)
    with pytest.raises(ValueError, match="no GatedLayer"):
        remove_gates(plain)
    with pytest.raises(ValueError, match="layer_types"):
        add_channel_gates(plain, layer_types=(nn.BatchNorm2d,))
    with pytest.raises(ValueError, match="exclude"):
        add_channel_gates(plain, exclude=["nope"])
    assert not list(gated_layers(plain))

    model = add_channel_gates(mlp(4, 6, 2))
    saved = state(model)
    with pytest.raises(ValueError, match="not both"):
        remove_gates(model, 0.1, keep_fraction=0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        remove_gates(model, keep_fraction=0.0)
    with pytest.raises(ValueError, match="threshold"):
        remove_gates(model, -1.0)
    with pytest.raises(ValueError, match="l1"):
        train_with_gate_penalty(model, torch.randn(3, 4), torch.tensor([0, 1, 0]), l1=-1, epochs=1, lr=1e-2)
    assert isinstance(model[0], GatedLayer) and same_state(model, saved)
