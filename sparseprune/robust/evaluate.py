"""Clean and adversarial accuracy and latent vulnerability of a model on a test set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from sparseprune.robust.attacks import Attack, check_attack
from sparseprune.robust.vulnerability import vulnerability

ATTACK_BATCH = 512


@dataclass
class RobustnessReport:
    clean_accuracy: float
    adversarial_accuracy: float
    vulnerability: Dict[str, float]  # per latent layer
    mean_vulnerability: float
    x_adv: Tensor  # the adversarial test inputs (to score other models computing the same function)

    def to_dict(self) -> Dict[str, object]:
        return {"clean_accuracy": self.clean_accuracy, "adversarial_accuracy": self.adversarial_accuracy,
                "vulnerability": dict(self.vulnerability), "mean_vulnerability": self.mean_vulnerability}


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).float().mean())


def evaluate_robustness(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *,
                        layers: Optional[Sequence[str]] = None,
                        generator: Optional[torch.Generator] = None) -> RobustnessReport:
    """Attack every test input white-box (in batches), score clean and adversarial accuracy and the
    vulnerability of each latent layer. Eval mode; the model's mode is restored."""
    check_attack(attack)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError("x and y must be tensors holding the same number (> 0) of samples")
    was_training = model.training
    model.eval()
    try:
        x_adv = torch.cat([attack.perturb(model, x[s:s + ATTACK_BATCH], y[s:s + ATTACK_BATCH], generator=generator)
                           for s in range(0, x.shape[0], ATTACK_BATCH)])
        clean, adv = _accuracy(model, x, y), _accuracy(model, x_adv, y)
        vul = vulnerability(model, x, x_adv, layers)
    finally:
        model.train(was_training)
    return RobustnessReport(clean, adv, vul.per_layer, vul.mean, x_adv)
