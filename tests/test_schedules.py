"""Pruning schedules: the polynomial schedule, GradualPruner as a training callback, iterative and
one-shot pruning, and train()'s callbacks. Tiny MLPs on a few hundred digits, one torch thread."""
import math

import pytest
import torch
from torch import nn

from sparseprune.data import load_digits_split
from sparseprune.prune import magnitude, random_unstructured, sparsity
from sparseprune.schedules import (
    GradualPruner,
    IterativeResult,
    PruneEvent,
    iterative_prune,
    magnitude_prune_fn,
    one_shot,
    polynomial_sparsity,
    round_targets,
)
from sparseprune.train import evaluate_accuracy, train

N_TRAIN = 300
BATCH = 30  # 10 optimizer steps per epoch
HIDDEN = 32  # weights 32x64 and 10x32: 2048 and 320 entries, so 0.75 is an exact count in each


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split(seed=0)
    return split.x_train[:N_TRAIN], split.y_train[:N_TRAIN], split.x_test[:200], split.y_test[:200]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def _fit(model, x, y, epochs=2, **kwargs):
    return train(model, x, y, epochs=epochs, lr=1e-2, batch_size=BATCH, seed=1, progress=False, **kwargs)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _effective(layer):
    """weight_orig * weight_mask (current even between an optimizer step and the next forward)."""
    if hasattr(layer, "weight_mask"):
        return (layer.weight_orig * layer.weight_mask).detach()
    return layer.weight.detach()


# ------------------------------------------------------------------------ polynomial_sparsity
def _poly(step, **kw):
    args = dict(initial=0.1, final=0.9, begin_step=10, end_step=50)
    args.update(kw)
    return polynomial_sparsity(step, **args)


def test_polynomial_starts_at_initial_and_ends_exactly_at_final():
    assert _poly(10) == 0.1
    assert _poly(50) == 0.9
    assert polynomial_sparsity(7, final=0.9, begin_step=7, end_step=20) == 0.0  # initial defaults to 0


def test_polynomial_clamps_outside_begin_end():
    assert _poly(0) == _poly(9) == _poly(-5) == 0.1
    assert _poly(51) == _poly(10_000) == 0.9


def test_polynomial_is_monotone_and_stays_in_range():
    values = [_poly(t / 2) for t in range(0, 121)]  # fractional steps too
    assert values == sorted(values)
    assert all(0.1 <= v <= 0.9 for v in values)
    diffs = [b - a for a, b in zip([_poly(t) for t in range(10, 51)], [_poly(t) for t in range(11, 51)])]
    assert all(d > 0 for d in diffs)
    assert diffs == sorted(diffs, reverse=True)  # fast first, slow at the end (concave)


def test_polynomial_has_the_cubic_shape():
    # halfway: s_f + (s_i - s_f) / 2**3
    assert _poly(30) == pytest.approx(0.9 - 0.8 / 8)
    assert _poly(20) == pytest.approx(0.9 - 0.8 * 0.75 ** 3)
    assert _poly(30, power=1) == pytest.approx(0.5)
    assert _poly(30, power=2) == pytest.approx(0.9 - 0.8 / 4)


def test_polynomial_begin_equal_end_jumps_at_once():
    assert polynomial_sparsity(4, final=0.5, begin_step=5, end_step=5) == 0.0
    assert polynomial_sparsity(5, final=0.5, begin_step=5, end_step=5) == 0.5


@pytest.mark.parametrize("kwargs,name", [
    (dict(final=1.5), "final"),
    (dict(final=float("nan")), "final"),
    (dict(final=True), "final"),
    (dict(initial=-0.1), "initial"),
    (dict(initial=0.95), "initial"),  # above final: masks cannot shrink
    (dict(begin_step=-1), "begin_step"),
    (dict(begin_step=2.5), "begin_step"),
    (dict(end_step=5), "end_step"),  # before begin_step
    (dict(power=0), "power"),
    (dict(power=float("inf")), "power"),
])
def test_polynomial_rejects_bad_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _poly(20, **kwargs)


@pytest.mark.parametrize("step", [float("nan"), "3", None])
def test_polynomial_rejects_bad_step(step):
    with pytest.raises(ValueError, match="step"):
        _poly(step)


# ------------------------------------------------------------------------------ GradualPruner
def test_gradual_pruner_in_train_reaches_final_with_masks_only_growing(digits):
    x, y, _, _ = digits
    model = _mlp()
    pruner = GradualPruner(model, 0.75, begin_step=0, end_step=20, frequency=5)
    snapshots = []  # (step, zero pattern of each layer) after every optimizer step

    def on_step(step):
        pruned = pruner.step(step)
        snapshots.append((step, pruned, [_effective(layer) == 0 for layer in _linears(model)]))

    losses = _fit(model, x, y, epochs=4, on_step=on_step)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert [s for s, _, _ in snapshots] == list(range(40))
    assert [s for s, p, _ in snapshots if p] == [0, 5, 10, 15, 20]
    assert pruner.done and pruner.next_step is None
    # history: steps, the schedule's targets, and the measured sparsity after each pruning
    assert all(isinstance(e, PruneEvent) for e in pruner.history)
    assert [e.step for e in pruner.history] == [0, 5, 10, 15, 20]
    expected = [polynomial_sparsity(t, final=0.75, begin_step=0, end_step=20) for t in (0, 5, 10, 15, 20)]
    assert [e.target for e in pruner.history] == expected
    assert pruner.history[-1].target == 0.75
    for e in pruner.history:
        assert e.sparsity == pytest.approx(e.target, abs=1e-3)
    # a pruned weight never comes back: the zero pattern only grows, step after step
    for (_, _, before), (_, _, after) in zip(snapshots, snapshots[1:]):
        for b, a in zip(before, after):
            assert torch.all(a[b])
    # exactly the final sparsity in every layer, masks in force after the last optimizer steps
    model(x[:1])
    for layer in _linears(model):
        assert int((layer.weight_mask == 0).sum()) == 0.75 * layer.weight.numel()
        assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)
        assert torch.all(layer.weight[layer.weight_mask == 0] == 0)
    assert sparsity(model)["__global__"] == 0.75
    assert 0.0 <= evaluate_accuracy(model, x, y) <= 1.0


def test_gradual_pruner_prunes_at_end_step_off_the_frequency_grid():
    model = _mlp()
    pruner = GradualPruner(model, 0.5, begin_step=2, end_step=13, frequency=5)
    pruned = [t for t in range(20) if pruner.step(t)]
    assert pruned == [2, 7, 12, 13]
    assert pruner.history[-1].target == 0.5
    assert pruner.history[0].target == 0.0


def test_gradual_pruner_skipped_steps_and_own_counter():
    model = _mlp()
    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=100, frequency=10)
    assert pruner.step(35)  # late: prunes to the schedule's value at 35, next due at 40
    assert pruner.next_step == 40
    assert not pruner.step(20)  # going backwards does nothing
    assert pruner.step(1000)  # far past the end: straight to final
    assert pruner.done and [e.target for e in pruner.history] == [pruner.target(35), 0.5]
    counting = GradualPruner(_mlp(), 0.5, begin_step=1, end_step=3, frequency=1)
    assert [counting() for _ in range(5)] == [False, True, True, True, False]
    assert [e.step for e in counting.history] == [1, 2, 3]


def test_gradual_pruner_per_epoch_with_on_epoch(digits):
    x, y, _, _ = digits
    model = _mlp()
    pruner = GradualPruner(model, 0.75, begin_step=0, end_step=2, frequency=1, global_=True)
    _fit(model, x, y, epochs=3, on_epoch=pruner.step)
    assert [e.step for e in pruner.history] == [0, 1, 2]
    # global: one threshold, so the layers differ but the total is exact
    assert sparsity(model)["__global__"] == 0.75
    per_layer = [float((layer.weight_mask == 0).float().mean()) for layer in _linears(model)]
    assert per_layer[0] != per_layer[1]


def test_gradual_pruner_custom_prune_fn_and_layer_types():
    model = _mlp()
    calls = []

    def prune_fn(m, amount):
        calls.append(amount)
        random_unstructured(m[0], amount, generator=0)

    pruner = GradualPruner(model, 0.5, begin_step=0, end_step=4, frequency=2, prune_fn=prune_fn)
    for t in range(5):
        pruner.step(t)
    assert calls == [0.0, pruner.target(2), 0.5]
    assert float((model[0].weight_mask == 0).float().mean()) == 0.5
    assert not hasattr(model[2], "weight_mask")


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(frequency=0), ValueError, "frequency"),
    (dict(frequency=2.0), ValueError, "frequency"),
    (dict(end_step=-1), ValueError, "end_step"),
    (dict(begin_step=-1), ValueError, "begin_step"),
    (dict(final_sparsity=1.5), ValueError, "final_sparsity"),
    (dict(initial=0.8), ValueError, "initial"),
    (dict(power=-1), ValueError, "power"),
    (dict(prune_fn=lambda m, a: None, global_=True), ValueError, "prune_fn"),
    (dict(prune_fn="magnitude"), TypeError, "prune_fn"),
    (dict(layer_types=nn.Conv2d), ValueError, "layer_types"),  # the MLP has none
    (dict(layer_types="Linear"), TypeError, "layer_types"),
])
def test_gradual_pruner_rejects_bad_arguments_naming_them(kwargs, error, name):
    args = dict(final_sparsity=0.5, begin_step=0, end_step=10)
    args.update(kwargs)
    model = _mlp()
    with pytest.raises(error, match=name):
        GradualPruner(model, **args)
    assert not hasattr(model[0], "weight_mask")  # nothing touched
    with pytest.raises(ValueError, match="global_step"):
        GradualPruner(model, 0.5, begin_step=0, end_step=10).step(float("nan"))


# ---------------------------------------------------------------------------- iterative_prune
def test_round_targets_geometric_and_linear():
    geo = round_targets(0.9, 3, "geometric")
    assert geo == pytest.approx([0.536, 0.785, 0.9], abs=1e-3)
    assert geo[-1] == 0.9
    densities = [1.0] + [1.0 - t for t in geo]
    ratios = [b / a for a, b in zip(densities, densities[1:])]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)  # the same share of survivors each round
    assert round_targets(0.9, 3, "linear") == pytest.approx([0.3, 0.6, 0.9])
    assert round_targets(0.9, 3, "linear")[-1] == 0.9
    assert round_targets(0.7, 1) == [0.7]
    assert round_targets(1.0, 2) == [1.0, 1.0]
    assert round_targets(0.0, 2) == [0.0, 0.0]


def test_iterative_prune_loop_records_and_keeps_masks_during_finetuning(digits):
    x, y, x_te, y_te = digits
    model = _mlp()
    _fit(model, x, y, epochs=5)
    calls = []

    def train_fn(m):
        calls.append(sparsity(m)["__global__"])  # the round's pruning is done before fine-tuning
        _fit(m, x, y, epochs=2)
        for layer in _linears(m):  # masks stay in force through training
            assert torch.equal(_effective(layer), (layer.weight_orig * layer.weight_mask).detach())
            assert torch.all(_effective(layer)[layer.weight_mask == 0] == 0)

    def eval_fn(m):
        return evaluate_accuracy(m, x_te, y_te)

    result = iterative_prune(model, 0.9, rounds=3, train_fn=train_fn, eval_fn=eval_fn, progress=False)
    assert isinstance(result, IterativeResult)
    assert len(calls) == 3
    assert result.schedule == "geometric" and result.final_sparsity == 0.9
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.targets == round_targets(0.9, 3)
    assert calls == pytest.approx(result.targets, abs=2e-3)
    for r in result.rounds:
        assert r.sparsity == pytest.approx(r.target, abs=2e-3)
        assert r.sparsity_finetuned == r.sparsity  # fine-tuning brings no weight back
        assert 0.0 <= r.acc_pruned <= 1.0 and 0.0 <= r.acc_finetuned <= 1.0
    assert result.final_accuracy == result.rounds[-1].acc_finetuned
    # fine-tuning wins back part of what the last round of pruning cost (0.42 -> 0.60 here)
    assert result.rounds[-1].acc_finetuned > result.rounds[-1].acc_pruned
    model(x[:1])
    for layer in _linears(model):
        assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)
    record = result.to_dict()
    assert record["rounds"][0]["target"] == result.targets[0]


def test_iterative_prune_linear_schedule_and_no_eval(digits):
    x, y, _, _ = digits
    model = _mlp()
    n = []
    result = iterative_prune(model, 0.75, rounds=3, schedule="linear", progress=False,
                             train_fn=lambda m: n.append(_fit(m, x, y, epochs=1)))
    assert len(n) == 3
    assert result.targets == pytest.approx([0.25, 0.5, 0.75])
    assert result.sparsities[-1] == 0.75
    assert all(r.acc_pruned is None and r.acc_finetuned is None for r in result.rounds)
    assert result.final_accuracy is None


def test_iterative_prune_without_training_and_progress_bar(capsys):
    model = _mlp()
    result = iterative_prune(model, 0.5, rounds=2, train_fn=None, progress=True, eval_fn=lambda m: 0.5)
    assert [r.sparsity_finetuned for r in result.rounds] == [None, None]
    assert result.final_accuracy == 0.5
    assert "prune rounds" in capsys.readouterr().err
    iterative_prune(_mlp(), 0.5, rounds=2, train_fn=None, progress=False)
    assert capsys.readouterr().err == ""


def test_iterative_prune_respects_earlier_masks():
    # a model already sparser than the first round's target keeps its mask; nothing comes back
    model = _mlp()
    magnitude(model[0], 0.6)
    before = model[0].weight_mask.clone()
    result = iterative_prune(model, 0.75, rounds=3, schedule="linear", train_fn=None, progress=False)
    assert torch.all(model[0].weight_mask[before == 0] == 0)
    assert result.sparsities[-1] == 0.75


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(rounds=0), ValueError, "rounds"),
    (dict(rounds=2.0), ValueError, "rounds"),
    (dict(schedule="cubic"), ValueError, "schedule"),
    (dict(final_sparsity=1.5), ValueError, "final_sparsity"),
    (dict(final_sparsity=-0.5), ValueError, "final_sparsity"),
    (dict(train_fn=3), TypeError, "train_fn"),
    (dict(eval_fn="accuracy"), TypeError, "eval_fn"),
    (dict(prune_fn=lambda m, a: None, global_=True), ValueError, "prune_fn"),
])
def test_iterative_prune_rejects_bad_arguments_before_pruning(kwargs, error, name):
    args = dict(final_sparsity=0.5, rounds=2, train_fn=lambda m: None, progress=False)
    args.update(kwargs)
    model = _mlp()
    with pytest.raises(error, match=name):
        iterative_prune(model, **args)
    assert not hasattr(model[0], "weight_mask")


def test_iterative_prune_checks_eval_fn_result():
    with pytest.raises(TypeError, match="eval_fn"):
        iterative_prune(_mlp(), 0.5, rounds=1, train_fn=None, eval_fn=lambda m: "high", progress=False)


# ---------------------------------------------------------------------------------- one_shot
def test_one_shot_prunes_once_and_optionally_finetunes(digits):
    x, y, x_te, y_te = digits
    model = _mlp()
    result = one_shot(model, 0.75)
    assert result.schedule == "one-shot" and result.targets == [0.75] and result.sparsities == [0.75]
    assert result.rounds[0].sparsity_finetuned is None

    calls = []
    tuned = _mlp()
    result = one_shot(tuned, 0.75, global_=True, train_fn=lambda m: calls.append(_fit(m, x, y, epochs=1)),
                      eval_fn=lambda m: evaluate_accuracy(m, x_te, y_te))
    assert len(calls) == 1
    assert result.rounds[0].sparsity == result.rounds[0].sparsity_finetuned == 0.75
    assert result.rounds[0].acc_finetuned is not None
    with pytest.raises(ValueError, match="sparsity"):
        one_shot(_mlp(), 2.0)


def test_magnitude_prune_fn_matches_the_one_liner():
    a, b = _mlp(), _mlp()
    magnitude_prune_fn()(a, 0.6)
    for layer in _linears(b):
        magnitude(layer, 0.6)
    for la, lb in zip(_linears(a), _linears(b)):
        assert torch.equal(la.weight_mask, lb.weight_mask)


# ------------------------------------------------------------------------- train() callbacks
def test_train_callbacks_see_every_step_and_epoch_and_change_nothing(digits):
    x, y, _, _ = digits
    plain = _mlp()
    losses_plain = _fit(plain, x, y, epochs=3)
    steps, epochs = [], []
    hooked = _mlp()
    losses_hooked = _fit(hooked, x, y, epochs=3, on_step=steps.append, on_epoch=epochs.append)
    assert losses_hooked == losses_plain
    for p, q in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(p, q)
    assert steps == list(range(3 * math.ceil(N_TRAIN / BATCH)))
    assert epochs == [0, 1, 2]


def test_train_rejects_non_callable_callbacks(digits):
    x, y, _, _ = digits
    with pytest.raises(TypeError, match="on_step"):
        _fit(_mlp(), x, y, on_step=3)
    with pytest.raises(TypeError, match="on_epoch"):
        _fit(_mlp(), x, y, on_epoch="each")
