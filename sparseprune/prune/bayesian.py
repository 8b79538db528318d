"""Bayesian pruning with beta-Bernoulli dropout (Lee et al., "Adaptive network sparsification with
dependent variational beta-Bernoulli dropout"), the mask family of Adversarial Neural Pruning.

    add_beta_bernoulli(model)           wrap hidden layers in BetaBernoulliDropout: the output of
                                        unit/channel k is multiplied by a mask z_k
    beta_bernoulli_kl(model)            the KL term to add to the loss (divided by the number of
                                        training samples: `sparseprune.robust.RobustObjective`)
    keep_probabilities(model)           E[pi_k] per layer: the learned keep-probability of each unit
    prune_beta_bernoulli(model, threshold)  units with E[pi_k] < threshold are masked away, the
                                        others scaled by E[pi_k] (what the eval-mode model does);
                                        plain layers come back
    sparseprune.shrink.shrink(model, (x,))  delete the masked units for good

The model: pi_k ~ Beta(alpha, 1) a priori (alpha small: most units are expected to be off), and
the variational posterior of pi_k is a Kumaraswamy(a_k, b_k), close to a Beta but with a closed
form inverse CDF, so pi_k = (1 - u^(1/b))^(1/a) is reparametrised; z_k ~ Bernoulli(pi_k) is
relaxed into z_k = sigmoid((logit(u') + logit(pi_k)) / temperature) so gradients reach a and b.
One z per sample and unit in training; in eval mode z_k = E[pi_k], and units under the threshold
are zero (the strongest unit of a layer always stays, as in `remove_gates`).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseprune.prune.api import LayerTypes, check_layer_types
from sparseprune.prune.gates import GATEABLE, GatedLayer, _set_child, remove_gates
from sparseprune.prune.reparam import (_check_module, has_parameter, parameter_state, require_wrapper_layers,
                                       wrapper_layers)

EULER_GAMMA = 0.5772156649015329
# alpha of the Beta(alpha, 1) prior: Lee et al. and the ANP code use 1e-4.
DEFAULT_ALPHA = 1e-4
# Relaxed Bernoulli temperature: 0.1 in Lee et al. (near-binary samples, still differentiable).
DEFAULT_TEMPERATURE = 0.1
# E[pi] below this prunes a unit (the ANP code's 1e-3).
DEFAULT_THRESHOLD = 1e-3
# keep-probability E[pi] at the start, with b = 1 (then E[pi] = a / (1 + a)).
DEFAULT_INIT_KEEP = 0.5
# softplus inputs are clamped so a, b stay positive and finite (the ANP code's ranges)
RAW_MIN, RAW_B_MAX = -10.0, 50.0
_PI_EPS = 1e-6


def _check_fraction(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{arg} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_positive(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{arg} must be a finite number > 0, got {value!r}")
    return float(value)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class BetaBernoulliDropout(nn.Module):
    """`layer`'s output times a learned beta-Bernoulli mask per output unit/channel.

    Parameters `a_raw`, `b_raw` (one per unit) give the Kumaraswamy posterior's a = softplus(a_raw),
    b = softplus(b_raw). Training mode samples a relaxed Bernoulli mask per sample and unit; eval
    mode multiplies by E[pi] with units under `threshold` set to zero (deterministic).
    """

    def __init__(self, layer: nn.Module, *, alpha: float = DEFAULT_ALPHA, init_keep: float = DEFAULT_INIT_KEEP,
                 temperature: float = DEFAULT_TEMPERATURE, threshold: float = DEFAULT_THRESHOLD) -> None:
        if not isinstance(layer, GATEABLE):
            names = ", ".join(t.__name__ for t in GATEABLE)
            raise ValueError(f"layer must be one of {names}, got {type(layer).__name__}")
        super().__init__()
        self.alpha = _check_positive(alpha, "alpha")
        self.temperature = _check_positive(temperature, "temperature")
        self.threshold = _check_fraction(threshold, "threshold")
        init_keep = _check_fraction(init_keep, "init_keep")
        self.layer = layer
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        weight = parameter_state(layer, "weight")[0]
        a0 = _inverse_softplus(init_keep / (1.0 - init_keep))  # b = 1: E[pi] = a / (1 + a)
        b0 = _inverse_softplus(1.0)
        self.a_raw = nn.Parameter(torch.full((width,), a0, dtype=weight.dtype, device=weight.device))
        self.b_raw = nn.Parameter(torch.full((width,), b0, dtype=weight.dtype, device=weight.device))

    @property
    def a(self) -> Tensor:
        return F.softplus(self.a_raw.clamp(min=RAW_MIN))

    @property
    def b(self) -> Tensor:
        return F.softplus(self.b_raw.clamp(RAW_MIN, RAW_B_MAX))

    def expected_keep(self) -> Tensor:
        """E[pi] of each unit under Kumaraswamy(a, b): b * B(1 + 1/a, b)."""
        a, b = self.a, self.b
        return torch.exp(torch.log(b) + torch.lgamma(1 + 1 / a) + torch.lgamma(b) - torch.lgamma(1 + 1 / a + b))

    def kl(self) -> Tensor:
        """KL(Kumaraswamy(a, b) || Beta(alpha, 1)) summed over the units (closed form, Nalisnick &
        Smyth; the series term of a general Beta(alpha, beta) prior vanishes for beta = 1)."""
        a, b, alpha = self.a, self.b, self.alpha
        per_unit = ((1 - alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1 / b)
                    + torch.log(a * b / alpha) - (b - 1) / b)
        return per_unit.sum()

    def kept(self) -> Tensor:
        """Bool per unit: E[pi] >= threshold (the strongest unit always)."""
        keep_p = self.expected_keep().detach()
        keep = keep_p >= self.threshold
        keep[int(torch.argmax(keep_p))] = True
        return keep

    def mask(self, n: int) -> Tensor:
        """[n, units] masks: relaxed Bernoulli samples in training, thresholded E[pi] in eval."""
        if not self.training:
            keep_p = self.expected_keep()
            return (keep_p * self.kept().to(keep_p.dtype)).expand(n, -1)
        a, b = self.a, self.b
        u = torch.rand_like(a).clamp(_PI_EPS, 1 - _PI_EPS)
        pi = (1 - u.pow(1 / b)).pow(1 / a).clamp(_PI_EPS, 1 - _PI_EPS)
        u2 = torch.rand((n,) + tuple(a.shape), dtype=a.dtype, device=a.device).clamp(_PI_EPS, 1 - _PI_EPS)
        return torch.sigmoid((torch.logit(u2) + torch.logit(pi)) / self.temperature)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        z = self.mask(out.shape[0])
        if self.channel_dim == -1:
            return out * z.reshape((z.shape[0],) + (1,) * (out.dim() - 2) + (-1,))
        return out * z.reshape(z.shape + (1,) * (out.dim() - 2))

    def extra_repr(self) -> str:
        return f"units={self.a_raw.numel()}, alpha={self.alpha:g}, threshold={self.threshold:g}"


def beta_bernoulli_layers(model: nn.Module) -> List[Tuple[str, BetaBernoulliDropout]]:
    """(qualified name, BetaBernoulliDropout) for every wrapped layer of the model."""
    return wrapper_layers(model, BetaBernoulliDropout)


def _require(model: nn.Module) -> List[Tuple[str, BetaBernoulliDropout]]:
    return require_wrapper_layers(model, BetaBernoulliDropout, "add_beta_bernoulli")


def add_beta_bernoulli(
    model: nn.Module,
    layer_types: LayerTypes = (nn.Conv2d, nn.Linear),
    *,
    exclude: Union[str, Sequence[str]] = "last",
    alpha: float = DEFAULT_ALPHA,
    init_keep: float = DEFAULT_INIT_KEEP,
    temperature: float = DEFAULT_TEMPERATURE,
    threshold: float = DEFAULT_THRESHOLD,
) -> nn.Module:
    """Wrap every `layer_types` layer of `model` (except `exclude`: "last" = the output layer, or
    a sequence of qualified names) in a BetaBernoulliDropout; in place, returns the model.

    Raises ValueError naming the argument for bad values (thresholds and init_keep must be in
    (0, 1)) and when no layer is left to wrap ("model has no prunable units"); the model is left
    unchanged then.
    """
    model = _check_module(model, "model")
    types = check_layer_types(layer_types)
    bad = [t.__name__ for t in types if not issubclass(t, GATEABLE)]
    if bad:
        raise ValueError(f"layer_types holds {', '.join(bad)}; only nn.Linear and nn.Conv1d/2d/3d have units")
    _check_positive(alpha, "alpha")
    _check_positive(temperature, "temperature")
    _check_fraction(threshold, "threshold")
    _check_fraction(init_keep, "init_keep")
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, types) and has_parameter(m, "weight")]
    inside = {id(m) for _, w in beta_bernoulli_layers(model) for m in w.modules()}
    if exclude == "last":
        skip = {candidates[-1][0]} if candidates else set()
    elif isinstance(exclude, str) or not isinstance(exclude, Sequence):
        raise TypeError(f"exclude must be 'last' or a sequence of module names, got {exclude!r}")
    else:
        known = {name for name, _ in model.named_modules()}
        unknown = [e for e in exclude if e not in known]
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are no submodules of the model")
        skip = set(exclude)
    chosen = [(name, m) for name, m in candidates if id(m) not in inside and name not in skip and name != ""]
    if not chosen:
        raise ValueError(f"model ({type(model).__name__}) has no prunable units: no {', '.join(t.__name__ for t in types)} "
                         "layer left to wrap (the output layer is excluded)")
    for name, layer in chosen:
        _set_child(model, name, BetaBernoulliDropout(layer, alpha=alpha, init_keep=init_keep,
                                                     temperature=temperature, threshold=threshold))
    return model


def beta_bernoulli_kl(model: nn.Module) -> Tensor:
    """Sum of the KL terms of every BetaBernoulliDropout layer (differentiable)."""
    return torch.stack([m.kl() for _, m in _require(model)]).sum()


def keep_probabilities(model: nn.Module) -> Dict[str, Tensor]:
    """{layer name: E[pi] per unit} (detached)."""
    return {name: m.expected_keep().detach() for name, m in _require(model)}


def units_kept(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """{layer name: (units kept at the layer's threshold, units)}."""
    return {name: (int(m.kept().sum()), int(m.a_raw.numel())) for name, m in _require(model)}


def prune_beta_bernoulli(model: nn.Module, threshold: float = None) -> nn.Module:
    """Replace every BetaBernoulliDropout by its plain layer, computing what the eval-mode model did.

    Units with E[pi] < threshold (default: each layer's own) get masks on their weight rows and
    bias (so `sparseprune.shrink.shrink` deletes them); the others are scaled by E[pi]. In place;
    returns the model. A threshold outside (0, 1) raises ValueError and changes nothing.
    """
    model = _check_module(model, "model")
    if threshold is not None:
        threshold = _check_fraction(threshold, "threshold")
    wrapped = _require(model)
    with torch.no_grad():
        for name, m in wrapped:
            gated = GatedLayer(m.layer)
            gated.gate.copy_(m.expected_keep())
            gated.gate.requires_grad_(False)
            if threshold is not None:
                m.threshold = threshold
            # remove_gates keeps |gate| >= threshold plus the strongest: the same rule as kept()
            remove_gates(gated, threshold=m.threshold)
            _set_child(model, name, m.layer)
    return model
