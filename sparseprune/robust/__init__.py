"""Adversarial robustness: attacks, adversarial training objectives, latent vulnerability.

    PGD(eps, steps, step_size, random_start), FGSM(eps)   L-infinity attacks (pixels in [0, 1])
    RobustObjective(attack, adv_share, vs_weight, ...)    AT, AT+VS, ANP, ANP-VS, beta-Bernoulli
                                                          dropout: `sparseprune.train.train(..., objective=...)`
    vulnerability(model, x, x_adv)                        mean distortion of each latent feature
    evaluate_robustness(model, x, y, attack)              clean and adversarial accuracy, vulnerability

Beta-Bernoulli masks themselves are in `sparseprune.prune.bayesian`.
"""
from sparseprune.robust.attacks import FGSM, PGD, Attack
from sparseprune.robust.evaluate import RobustnessReport, evaluate_robustness
from sparseprune.robust.objective import RobustObjective
from sparseprune.robust.vulnerability import Vulnerability, latent_layers, vulnerability, vulnerability_loss

__all__ = ["FGSM", "PGD", "Attack", "RobustObjective", "RobustnessReport", "Vulnerability", "evaluate_robustness",
           "latent_layers", "vulnerability", "vulnerability_loss"]
