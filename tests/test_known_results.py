"""The methods of `sparseprune compare` held to what the literature found, on the bundled digits.

Each test runs the registry's own runners (`ModelRun.prune`: the code path of every compare row,
without conversion and timing) on one seeded split, with training on one thread, so the numbers
are deterministic on a machine; the margins are wide (the measured gap is given beside each
check) so that they survive torch versions. Every comparison is at an equal training budget.
The whole module takes about 20 s on one core.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune.prune as sp
from sparseprune.data import load_digits_split
from sparseprune.experiments.config import FULL, Budget
from sparseprune.experiments.registry import all_methods
from sparseprune.experiments.runner import ModelRun
from sparseprune.train import evaluate_accuracy, train

SEED = 1
DENSE_EPOCHS = 15  # the MLP reaches 98.4% on this split


def _run(budget: int, dense=None) -> ModelRun:
    cfg = FULL.with_(models=("mlp",), budgets={"mlp": Budget(DENSE_EPOCHS, 2e-3, budget, 1e-3)})
    run = ModelRun("mlp", load_digits_split(seed=SEED), cfg, SEED, 1)
    if dense is None:
        run.fit_dense()
    else:
        run.dense, run.dense_acc = dense.dense, dense.dense_acc
    return run


@pytest.fixture(scope="module")
def short():
    """The compare MLP, trained dense; 2 epochs of training after pruning."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _run(2)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def longer(short):
    """The same dense MLP; 6 epochs after pruning (compare's default budget)."""
    return _run(6, dense=short)


def accuracy(run: ModelRun, key: str, level: float) -> float:
    method = {m.key: m for m in all_methods()}[key]
    outcome, epochs = run.prune(method, level)
    assert epochs == (0 if method.schedule == "one-shot" else run.config.budget("mlp").finetune_epochs)
    return run.accuracy(outcome.model)


def test_informed_methods_beat_random_by_20_points_at_90_percent(short):
    random_ft = accuracy(short, "random/one-shot+ft", 0.9)  # 41.6%
    assert accuracy(short, "magnitude/one-shot+ft", 0.9) >= random_ft + 0.20  # 80.6%
    assert accuracy(short, "obd/one-shot+ft", 0.9) >= random_ft + 0.20  # 96.0%
    # without any training: OBD 76.8%, random 10.5% (chance)
    assert accuracy(short, "obd/one-shot", 0.9) >= accuracy(short, "random/one-shot", 0.9) + 0.20


def test_snip_beats_random_at_init(short):
    assert accuracy(short, "snip-at-init/at-init", 0.9) >= accuracy(short, "random-at-init/at-init", 0.9)  # 79.5 vs 37.0


def test_gradual_beats_one_shot_at_the_same_budget(short):
    assert accuracy(short, "magnitude/gradual", 0.9) >= accuracy(short, "magnitude/one-shot+ft", 0.9)  # 89.8 vs 80.6


def test_iterative_beats_one_shot_at_95_percent_with_the_same_budget(longer):
    # magnitude 87.1% vs 67.0%; OBD 95.8% vs 92.0%
    assert accuracy(longer, "magnitude/iterative", 0.95) >= accuracy(longer, "magnitude/one-shot+ft", 0.95)
    assert accuracy(longer, "obd/iterative", 0.95) >= accuracy(longer, "obd/one-shot+ft", 0.95)


def test_obd_with_the_exact_diagonal_beats_magnitude_at_70_percent(one_torch_thread):
    data = load_digits_split(seed=SEED)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))  # 1184 weights: exact is cheap
    train(model, data.x_train, data.y_train, epochs=40, lr=1e-2, seed=SEED, progress=False)
    batches = (data.x_train, data.y_train)
    obd = sp.obd(_copy(model), 0.7, batches, loss_fn=F.cross_entropy, hessian="exact")
    magnitude = sp.global_magnitude(_copy(model), 0.7)
    acc_obd = evaluate_accuracy(obd, data.x_test, data.y_test)
    acc_magnitude = evaluate_accuracy(magnitude, data.x_test, data.y_test)
    assert acc_obd >= acc_magnitude, (acc_obd, acc_magnitude)  # 91.1% vs 72.2%


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
