"""White-box L-infinity attacks: FGSM (one signed-gradient step) and PGD (Madry et al.: random start,
`steps` signed-gradient steps of `step_size`, each projected back into the eps-ball and the valid
pixel range).

An attack is a small frozen config with a `perturb(model, x, y)` method; its arguments are
checked when it is made (eps < 0, steps < 1, a step size <= 0 raise ValueError naming them).
The model runs in eval mode while the attack computes its gradients (deterministic masks and
BatchNorm statistics, nothing updated) and gets its mode back; only the input's gradient is
computed, so the model's `.grad`s are untouched.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Bounds = Optional[Tuple[float, float]]
PIXEL_RANGE = (0.0, 1.0)
# PGD's default step: 2.5 * eps / steps (Madry et al.), so the walk can cross the ball and back
DEFAULT_STEP_FACTOR = 2.5


def _check_real(value: object, arg: str, *, minimum: float, strict: bool) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ValueError(f"{arg} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _check_bounds(bounds: object) -> Bounds:
    if bounds is None:
        return None
    if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in bounds) or not bounds[0] < bounds[1]):
        raise ValueError(f"bounds must be None or (low, high) with low < high, got {bounds!r}")
    return (float(bounds[0]), float(bounds[1]))


def _check_inputs(model: object, x: object, y: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a 1-D tensor of {x.shape[0]} labels, got {getattr(y, 'shape', y)!r}")


def _clip(x_adv: Tensor, x: Tensor, eps: float, bounds: Bounds) -> Tensor:
    x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    return x_adv if bounds is None else x_adv.clamp(*bounds)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


class _EvalMode:
    """Eval mode and gradients on for the attack; the model's mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.grad = torch.is_grad_enabled()
        self.model.eval()
        torch.set_grad_enabled(True)

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)
        torch.set_grad_enabled(self.grad)


@dataclass(frozen=True)
class FGSM:
    """x + eps * sign(grad_x loss), clipped to `bounds` (default the pixel range [0, 1])."""

    eps: float
    bounds: Bounds = PIXEL_RANGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", _check_real(self.eps, "eps", minimum=0.0, strict=False))
        object.__setattr__(self, "bounds", _check_bounds(self.bounds))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        _check_inputs(model, x, y)
        with _EvalMode(model):
            g = _input_gradient(model, x, y)
        return _clip(x.detach() + self.eps * g.sign(), x.detach(), self.eps, self.bounds)


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent in the L-infinity ball of radius `eps` around x.

    `steps` signed-gradient steps of `step_size` (default 2.5 * eps / steps) from a uniform random
    start in the ball (`random_start`, drawn from `generator` when given), each step projected
    back into the ball and `bounds` (default [0, 1]; None: no range).
    """

    eps: float
    steps: int = 10
    step_size: Optional[float] = None
    random_start: bool = True
    bounds: Bounds = PIXEL_RANGE

    def __post_init__(self) -> None:
        eps = _check_real(self.eps, "eps", minimum=0.0, strict=False)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        step = DEFAULT_STEP_FACTOR * eps / int(self.steps) if self.step_size is None else self.step_size
        step = _check_real(step, "step_size", minimum=0.0, strict=eps > 0)
        if not isinstance(self.random_start, bool):
            raise TypeError(f"random_start must be a bool, got {self.random_start!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "step_size", step)
        object.__setattr__(self, "bounds", _check_bounds(self.bounds))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        _check_inputs(model, x, y)
        x = x.detach()
        x_adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_adv = _clip(x + (2 * noise - 1) * self.eps, x, self.eps, self.bounds)
        with _EvalMode(model):
            for _ in range(self.steps):
                g = _input_gradient(model, x_adv, y)
                x_adv = _clip(x_adv + self.step_size * g.sign(), x, self.eps, self.bounds)
        return x_adv


Attack = Union[FGSM, PGD]
ATTACKS = (FGSM, PGD)


def check_attack(attack: object, arg: str = "attack") -> Attack:
    if not isinstance(attack, ATTACKS):
        raise TypeError(f"{arg} must be a sparseprune.robust FGSM or PGD, got {type(attack).__name__}")
    return attack
