"""Adversarial attacks, beta-Bernoulli dropout, vulnerability, the robust objective and
`sparseprune compare --robust` in a tiny configuration.

Models are small MLPs on digits (pixels in [0, 1]); everything runs on one thread.
"""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseprune.data import load_digits_split
from sparseprune.prune.bayesian import (
    BetaBernoulliDropout,
    add_beta_bernoulli,
    beta_bernoulli_kl,
    keep_probabilities,
    prune_beta_bernoulli,
    units_kept,
)
from sparseprune.robust import FGSM, PGD, RobustObjective, evaluate_robustness, vulnerability, vulnerability_loss
from sparseprune.robust.vulnerability import capture
from sparseprune.shrink import shrink
from sparseprune.train import evaluate_accuracy, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def mlp(*widths):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = mlp(64, 64, 10)
    with torch.random.fork_rng():
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        train(model, digits.x_train, digits.y_train, epochs=8, lr=3e-3, seed=0, progress=False)
        torch.set_num_threads(prev)
    return model.eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("attack", [FGSM(0.1), PGD(0.1, steps=5), PGD(0.2, steps=3, random_start=False)])
def test_attacks_stay_in_the_ball_and_the_pixel_range_and_raise_the_loss(trained, digits, attack):
    x, y = digits.x_test[:200], digits.y_test[:200]
    grads_before = [p.grad for p in trained.parameters()]
    x_adv = attack.perturb(trained, x, y, generator=torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= attack.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) > 0.5 * attack.eps  # it moved
    with torch.no_grad():
        assert F.cross_entropy(trained(x_adv), y) > F.cross_entropy(trained(x), y) + 0.1
    assert [p.grad for p in trained.parameters()] == grads_before  # only the input's gradient was taken
    assert not trained.training


def test_pgd_beats_fgsm_and_random_start_is_seeded(trained, digits):
    x, y = digits.x_test, digits.y_test
    pgd = PGD(0.15, steps=10)
    assert pgd.step_size == pytest.approx(2.5 * 0.15 / 10)
    a = pgd.perturb(trained, x, y, generator=torch.Generator().manual_seed(3))
    b = pgd.perturb(trained, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert evaluate_accuracy(trained, a, y) <= evaluate_accuracy(trained, FGSM(0.15).perturb(trained, x, y), y)
    assert torch.equal(PGD(0.0, steps=2).perturb(trained, x, y), x)  # eps 0: nothing moves


@pytest.mark.parametrize("make,arg", [
    (lambda: PGD(-0.1), "eps"), (lambda: FGSM(-1e-3), "eps"), (lambda: PGD(float("nan")), "eps"),
    (lambda: PGD(0.1, steps=0), "steps"), (lambda: PGD(0.1, steps=2.5), "steps"),
    (lambda: PGD(0.1, step_size=0.0), "step_size"), (lambda: PGD(0.1, bounds=(1.0, 0.0)), "bounds"),
    (lambda: RobustObjective(PGD(0.1), adv_share=1.5), "adv_share"),
    (lambda: RobustObjective(PGD(0.1), vs_weight=-1), "vs_weight"),
    (lambda: RobustObjective(vs_weight=1.0), "vs_weight"),
])
def test_bad_attack_and_objective_arguments_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


# --------------------------------------------------------------------------- beta-Bernoulli
def test_kl_and_keep_probability_match_monte_carlo():
    layer = BetaBernoulliDropout(nn.Linear(3, 4), alpha=0.5)
    with torch.no_grad():
        layer.a_raw.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
        layer.b_raw.copy_(torch.tensor([0.5, 1.5, -0.5, 0.0]))
    a, b = layer.a.detach().double(), layer.b.detach().double()
    u = torch.rand(400_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    pi = (1 - u.pow(1 / b)).pow(1 / a)  # Kumaraswamy(a, b) samples
    assert torch.allclose(layer.expected_keep().detach().double(), pi.mean(dim=0), atol=3e-3)
    # KL(q || Beta(alpha, 1)) = E_q[log q(pi) - log p(pi)]
    log_q = torch.log(a * b) + (a - 1) * torch.log(pi) + (b - 1) * torch.log1p(-pi.pow(a))
    log_p = math.log(0.5) + (0.5 - 1) * torch.log(pi)
    mc = (log_q - log_p).mean(dim=0).sum()
    assert layer.kl().item() == pytest.approx(mc.item(), rel=2e-2)


def test_keep_probability_starts_at_init_keep_and_masks_sample_per_sample():
    model = add_beta_bernoulli(mlp(8, 6, 5, 3), init_keep=0.8, threshold=0.01)
    probs = keep_probabilities(model)
    assert list(probs) == ["0", "2"] and all(torch.allclose(p, torch.full_like(p, 0.8)) for p in probs.values())
    bb = model[0]
    assert bb.mask(7).shape == (7, 6)
    # one pi per unit and forward (shared by the batch), one z per sample and unit
    z = torch.cat([bb.mask(20).detach() for _ in range(300)])
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    assert float(z.mean()) == pytest.approx(0.8, abs=0.03)  # E[z] = E[pi]
    assert float(((z > 0.05) & (z < 0.95)).float().mean()) < 0.2  # temperature 0.1: nearly binary
    bb.eval()
    assert torch.allclose(bb.mask(2).detach(), torch.full((2, 6), 0.8))
    assert beta_bernoulli_kl(model).requires_grad


def _bb_model_with_dead_units():
    torch.manual_seed(0)
    model = add_beta_bernoulli(mlp(8, 6, 5, 3), threshold=0.05)
    with torch.no_grad():
        model[0].a_raw[[1, 4]] = -9.0  # E[pi] ~ 1e-4: under the threshold
        model[2].a_raw[0] = -9.0
        model[2].a_raw[3] = 2.0
    return model.eval()


def test_pruning_then_shrink_computes_what_the_eval_model_computed():
    model = _bb_model_with_dead_units()
    x = torch.rand(16, 8)
    with torch.no_grad():
        want = model(x)
    assert units_kept(model) == {"0": (4, 6), "2": (4, 5)}
    prune_beta_bernoulli(model)
    assert not any(isinstance(m, BetaBernoulliDropout) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-6)
    small = shrink(model, (x,))
    assert [m.out_features for m in small.modules() if isinstance(m, nn.Linear)] == [4, 4, 3]
    with torch.no_grad():
        assert torch.allclose(small(x), want, atol=1e-5)


def test_bad_beta_bernoulli_input_raises_and_leaves_the_model_unchanged():
    lone = nn.Sequential(nn.Linear(4, 2))
    saved = state(lone)
    with pytest.raises(ValueError, match="no prunable units"):
        add_beta_bernoulli(lone)
    assert same_state(lone, saved) and isinstance(lone[0], nn.Linear)
    model = mlp(4, 3, 2)
    saved = state(model)
    for kwargs in ({"threshold": 0.0}, {"threshold": 1.0}, {"threshold": -0.5}, {"init_keep": 1.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            add_beta_bernoulli(model, **kwargs)
        assert same_state(model, saved) and isinstance(model[0], nn.Linear)
    bb = _bb_model_with_dead_units()
    saved = state(bb)
    for threshold in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="threshold"):
            prune_beta_bernoulli(bb, threshold)
        assert same_state(bb, saved) and isinstance(bb[0], BetaBernoulliDropout)
    with pytest.raises(ValueError, match="add_beta_bernoulli"):
        prune_beta_bernoulli(mlp(4, 3, 2))


# ------------------------------------------------------------------------------ vulnerability
def test_vulnerability_matches_a_hand_computation():
    model = mlp(2, 3, 2)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]))
        model[2].bias.zero_()
    x = torch.tensor([[0.5, 0.2], [0.1, 0.4]])
    x_adv = torch.tensor([[0.6, 0.1], [0.1, 0.6]])
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    h, h_adv = relu(x.numpy() @ w.T), relu(x_adv.numpy() @ w.T)
    per_feature = np.abs(h - h_adv).mean(axis=0)
    v = vulnerability(model, x, x_adv)
    assert list(v.per_layer) == ["1"]  # the only activation module
    assert np.allclose(v.per_feature["1"].numpy(), per_feature)
    assert v.per_layer["1"] == pytest.approx(per_feature.mean())
    assert v.mean == pytest.approx(per_feature.mean())
    with capture(model) as clean:
        model(x)
    with capture(model) as adv:
        model(x_adv)
    assert vulnerability_loss(clean, adv).item() == pytest.approx(per_feature.mean())


def test_evaluate_robustness_reports_clean_and_adversarial_accuracy(trained, digits):
    report = evaluate_robustness(trained, digits.x_test, digits.y_test, PGD(0.2, steps=10),
                                 generator=torch.Generator().manual_seed(0))
    assert report.clean_accuracy == pytest.approx(evaluate_accuracy(trained, digits.x_test, digits.y_test))
    assert report.adversarial_accuracy < report.clean_accuracy - 0.3
    assert set(report.vulnerability) == {"1"} and report.mean_vulnerability > 0


# ---------------------------------------------------------------------------------- objective
def test_anp_masks_learn_on_the_adversarial_loss_and_the_kl_weights_on_the_mix():
    torch.manual_seed(0)
    model = add_beta_bernoulli(mlp(8, 6, 3))
    model.train()
    x, y = torch.rand(12, 8), torch.randint(0, 3, (12,))
    attack = PGD(0.1, steps=2, random_start=False)  # deterministic
    objective = RobustObjective(attack, adv_share=0.5)
    torch.manual_seed(5)
    objective.backward(model, x, y, n_train=100)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    x_adv = attack.perturb(model, x, y)
    torch.manual_seed(5)  # the same mask samples: clean pass, then adversarial pass
    ce_clean, ce_adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    kl = beta_bernoulli_kl(model) / 100
    masks = [model[0].a_raw, model[0].b_raw]
    weights = [p for p in model.parameters() if all(p is not m for m in masks)]
    want_w = torch.autograd.grad(0.5 * ce_clean + 0.5 * ce_adv, weights, retain_graph=True)
    want_m = torch.autograd.grad(ce_adv + kl, masks)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, g in list(zip(weights, want_w)) + list(zip(masks, want_m)):
        assert torch.allclose(got[names[id(p)]], g, atol=1e-6), names[id(p)]


def test_train_objective_argument(digits):
    model = mlp(64, 16, 10)
    with pytest.raises(TypeError, match="objective"):
        train(model, digits.x_train, digits.y_train, epochs=1, lr=1e-3, progress=False, objective="pgd")
    losses = train(model, digits.x_train[:128], digits.y_train[:128], epochs=2, lr=1e-3, progress=False,
                   objective=FGSM(0.1))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_adversarial_training_raises_pgd_accuracy_far_above_standard(digits):
    """The qualitative result of the issue, small: a 64-64-10 MLP, 8 epochs, eps 0.2."""
    attack = PGD(0.2, steps=10)
    acc = {}
    for name, objective in (("standard", None), ("at", RobustObjective(PGD(0.2, steps=3), adv_share=2 / 3))):
        torch.manual_seed(0)
        model = mlp(64, 64, 10)
        train(model, digits.x_train, digits.y_train, epochs=8, lr=3e-3, seed=0, progress=False, objective=objective)
        report = evaluate_robustness(model, digits.x_test, digits.y_test, attack,
                                     generator=torch.Generator().manual_seed(0))
        acc[name] = (report.clean_accuracy, report.adversarial_accuracy)
    assert acc["standard"][1] < 0.15 and acc["at"][1] > acc["standard"][1] + 0.25, acc
    assert acc["at"][0] > 0.85, acc


# --------------------------------------------------------------------------- compare --robust
def test_compare_robust_cli_tiny(tmp_path, capsys):
    import sparseprune.cli as cli
    from sparseprune.experiments import robust

    out = tmp_path / "robust"
    status = cli.main(["compare", "--robust", "--quick", "--models", "mlp", "--dense-epochs", "1", "--seed", "1",
                       "--out", str(out), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "anp-vs" in printed and "PGD acc" in printed
    record = json.loads((out / "robust.json").read_text())
    rows = {r["network"]: r for r in record["rows"]}
    assert set(rows) == set(robust.NETWORKS)
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in ("clean_acc", "pgd_acc", "fgsm_acc", "units_share"):
            assert 0.0 <= r[key] <= 1.0
        assert r["max_abs_diff"] < 1e-3 and r["timing"]["256"]["speedup"] > 0
        assert set(r["vulnerability"]) == {"1", "3"}
    assert rows["standard"]["units_share"] == 1.0 and rows["anp-vs"]["deploy"] == "shrink+convert"
    for name in ("robust.csv", "robust_table.txt", "robust_pgd_vs_speedup.png"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(ValueError, match="threshold"):
        robust.run_robust(config=robust.QUICK.with_(threshold=1.0), progress=False)
    with pytest.raises(ValueError, match="eps"):
        robust.run_robust(config=robust.QUICK.with_(eps=-0.1), progress=False)
    args = argparse.Namespace(quick=True, models=None, dense_epochs=None)
    assert robust.config_from_args(args) == robust.QUICK
