"""The training objective of adversarial training, vulnerability suppression and (adversarial)
beta-Bernoulli pruning, one step at a time, for `sparseprune.train.train(objective=...)`.

Per mini-batch (x, y), with x' = attack(x) when there is an attack:
  weights:  (1 - adv_share) * CE(x) + adv_share * CE(x') + vs_weight * VS(x, x')
  masks:    CE(x') + kl_weight * KL / n_train         (ANP: the masks learn on the adversarial loss)
            or the weights' loss + kl_weight * KL / n_train  (no attack, or masks_on="same")
where the masks are the a, b parameters of `sparseprune.prune.bayesian.BetaBernoulliDropout`
layers (none: plain adversarial training) and KL / n_train is the per-sample share of the
variational bound's KL term. The paper's combinations:

    standard        RobustObjective()                                  (or no objective)
    AT              RobustObjective(PGD(eps))
    AT + VS         RobustObjective(PGD(eps), vs_weight=...)
    beta-Bernoulli  RobustObjective() on a model with add_beta_bernoulli
    ANP             RobustObjective(PGD(eps)) on a model with add_beta_bernoulli
    ANP-VS          RobustObjective(PGD(eps), vs_weight=...) on a model with add_beta_bernoulli
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseprune.prune.bayesian import beta_bernoulli_layers
from sparseprune.robust.attacks import ATTACKS, Attack, check_attack
from sparseprune.robust.vulnerability import capture, latent_layers, vulnerability_loss

MASKS_ON = ("adversarial", "same")
# The masks' parameters move through a softplus from their start to where KL and loss balance; at
# the weights' learning rate they barely move in a short run (the ANP code uses 10x for them).
DEFAULT_MASK_LR_SCALE = 10.0


def _check_weight(value: object, arg: str, upper: Optional[float] = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0
    if not ok or (upper is not None and value > upper):
        bound = f"in [0, {upper:g}]" if upper is not None else ">= 0"
        raise ValueError(f"{arg} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RobustObjective:
    attack: Optional[Attack] = None
    adv_share: float = 1.0  # share of the adversarial cross-entropy in the weights' loss
    vs_weight: float = 0.0  # lambda of the vulnerability suppression loss
    kl_weight: float = 1.0  # scale of KL / n_train (beta-Bernoulli layers only)
    masks_on: str = "adversarial"
    mask_lr_scale: float = DEFAULT_MASK_LR_SCALE

    def __post_init__(self) -> None:
        if self.attack is not None:
            check_attack(self.attack)
        _check_weight(self.adv_share, "adv_share", upper=1.0)
        _check_weight(self.vs_weight, "vs_weight")
        _check_weight(self.kl_weight, "kl_weight")
        if self.masks_on not in MASKS_ON:
            raise ValueError(f"masks_on must be one of {MASKS_ON}, got {self.masks_on!r}")
        if not (_check_weight(self.mask_lr_scale, "mask_lr_scale") > 0):
            raise ValueError(f"mask_lr_scale must be > 0, got {self.mask_lr_scale!r}")
        if self.attack is None and self.vs_weight > 0:
            raise ValueError("vs_weight > 0 needs an attack (the VS loss compares clean and adversarial features)")

    def check_model(self, model: nn.Module) -> None:
        """Raise before training when the objective cannot run on `model`."""
        if self.vs_weight > 0:
            latent_layers(model)

    @staticmethod
    def mask_parameters(model: nn.Module) -> List[nn.Parameter]:
        return [p for _, m in beta_bernoulli_layers(model) for p in (m.a_raw, m.b_raw) if p.requires_grad]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> List[Dict[str, Any]]:
        """Optimizer groups: the weights at `lr` with `weight_decay`; mask parameters (if any) at
        lr * mask_lr_scale without decay (their prior is the KL term)."""
        masks = self.mask_parameters(model)
        ids = {id(p) for p in masks}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay}] if weights else []
        if masks:
            groups.append({"params": masks, "lr": lr * self.mask_lr_scale, "weight_decay": 0.0})
        return groups

    def backward(self, model: nn.Module, x: Tensor, y: Tensor, *, n_train: int,
                 generator: Optional[torch.Generator] = None) -> float:
        """Compute this batch's losses and leave their gradients in `.grad`; returns the weights'
        loss (plus the KL share) as a float. `model` is in train mode."""
        masks = self.mask_parameters(model)
        kl = None
        if masks:
            kl = torch.stack([m.kl() for _, m in beta_bernoulli_layers(model)]).sum() * (self.kl_weight / n_train)
        if self.attack is None:
            loss = F.cross_entropy(model(x), y)
            total = loss if kl is None else loss + kl
            total.backward()
            return total.item()
        x_adv = self.attack.perturb(model, x, y, generator=generator)
        vs = None
        need_clean = self.adv_share < 1.0 or self.vs_weight > 0
        if self.vs_weight > 0:
            with capture(model) as clean_feats:
                clean_logits = model(x)
            with capture(model) as adv_feats:
                adv_logits = model(x_adv)
            vs = vulnerability_loss(clean_feats, adv_feats)
        else:
            clean_logits = model(x) if need_clean else None
            adv_logits = model(x_adv)
        ce_adv = F.cross_entropy(adv_logits, y)
        loss = self.adv_share * ce_adv
        if clean_logits is not None and self.adv_share < 1.0:
            loss = loss + (1.0 - self.adv_share) * F.cross_entropy(clean_logits, y)
        if vs is not None:
            loss = loss + self.vs_weight * vs
        if kl is None or self.masks_on == "same":
            total = loss if kl is None else loss + kl
            total.backward()
            return total.item()
        # ANP: the weights follow the mixed loss, the masks the adversarial loss and the KL
        mask_ids = {id(p) for p in masks}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in mask_ids]
        mask_loss = ce_adv + kl
        g_w = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        g_m = torch.autograd.grad(mask_loss, masks, allow_unused=True)
        for params, grads in ((weights, g_w), (masks, g_m)):
            for p, g in zip(params, grads):
                if g is None:
                    continue
                p.grad = g if p.grad is None else p.grad + g
        return (loss + kl).item()


def as_objective(value: object) -> Optional[RobustObjective]:
    """`train`'s objective argument: None, a RobustObjective, or an attack (plain adversarial training)."""
    if value is None or isinstance(value, RobustObjective):
        return value
    if isinstance(value, ATTACKS):
        return RobustObjective(attack=value)
    raise TypeError(f"objective must be None, a RobustObjective or an attack (FGSM, PGD), got {type(value).__name__}")
