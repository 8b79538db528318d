"""Pruning schedules: how much to prune, and when, while a model trains.

The policy side of pruning ("how much, when"), kept apart from importance (how entries are
scored) and from the methods that turn scores into masks (`sparseprune.prune`). Every schedule
here drives a `prune_fn(model, amount)` whose `amount` is the TOTAL target sparsity of the model
at that moment (a float in [0, 1]); since masks only ever remove more, calling it with a rising
target grows the masks and never brings a pruned weight back.

  * `polynomial_sparsity`: the gradual schedule of Zhu & Gupta (2017, "To prune, or not to
    prune"), s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3, fast at first, slow at the end;
  * `GradualPruner`: a training callback that follows it, e.g.
    `train(model, x, y, ..., on_step=GradualPruner(model, 0.9, begin_step=0, end_step=500).step)`;
  * `iterative_prune`: prune, fine-tune, repeat (Han et al. 2015), with geometric or linear
    round targets;
  * `one_shot`: prune once (and optionally fine-tune once), with the same result type.

The default `prune_fn` is L1 magnitude on the weight of every nn.Linear and nn.Conv2d, per layer
(`sparseprune.prune.magnitude`) or with one threshold across them (`global_=True`,
`sparseprune.prune.global_magnitude`); `magnitude_prune_fn` builds it for other layer types.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from torch import nn
from tqdm import tqdm

from sparseprune.prune import global_magnitude, magnitude, sparsity
from sparseprune.prune.api import LayerTypes, check_layer_types
from sparseprune.prune.reparam import has_parameter
from sparseprune.prune.stats import GLOBAL_KEY

PruneFn = Callable[[nn.Module, float], Any]  # prune_fn(model, total target sparsity) -> ignored
TrainFn = Callable[[nn.Module], Any]  # train_fn(model) -> ignored; fine-tunes in place
EvalFn = Callable[[nn.Module], float]  # eval_fn(model) -> a score (e.g. accuracy)

DEFAULT_LAYER_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv2d)
SCHEDULES = ("geometric", "linear")
ZHU_GUPTA_POWER = 3  # the exponent of Zhu & Gupta (2017)


# ---------------------------------------------------------------------------------- checks
def _real(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{arg} must be a finite number, got {value!r}")
    return float(value)


def _fraction(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{arg} must be a sparsity in [0, 1], got {value!r}")  # also rejects nan
    return float(value)


def _int(value: object, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _callable(fn: object, arg: str, optional: bool = True) -> Any:
    if fn is None and optional:
        return None
    if not callable(fn):
        kind = "a callable or None" if optional else "a callable"
        raise TypeError(f"{arg} must be {kind}, got {type(fn).__name__}")
    return fn


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class _Polynomial:
    """Checked arguments of the polynomial schedule."""

    initial: float
    final: float
    begin_step: int
    end_step: int
    power: float

    @classmethod
    def check(cls, initial: object, final: object, begin_step: object, end_step: object, power: object,
              final_arg: str = "final") -> "_Polynomial":
        i = _fraction(initial, "initial")
        f = _fraction(final, final_arg)
        if i > f:
            raise ValueError(f"initial ({i}) must be <= {final_arg} ({f}): masks only grow")
        begin = _int(begin_step, "begin_step", 0)
        end = _int(end_step, "end_step", 0)
        if end < begin:
            raise ValueError(f"end_step ({end}) must be >= begin_step ({begin})")
        p = _real(power, "power")
        if p <= 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        return cls(i, f, begin, end, p)

    def at(self, step: float) -> float:
        if step < self.begin_step:
            return self.initial
        if step >= self.end_step:  # also the begin_step == end_step case: all at once
            return self.final
        left = 1.0 - (step - self.begin_step) / (self.end_step - self.begin_step)
        value = self.final + (self.initial - self.final) * left ** self.power
        return min(max(value, self.initial), self.final)  # rounding never leaves [initial, final]


def polynomial_sparsity(
    step: float,
    *,
    initial: float = 0.0,
    final: float,
    begin_step: int,
    end_step: int,
    power: float = ZHU_GUPTA_POWER,
) -> float:
    """Target sparsity at training step `step` under Zhu & Gupta's gradual schedule.

    s(t) = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** power
    for t in [begin_step, end_step]; `initial` before begin_step and exactly `final` from
    end_step on. With begin_step == end_step the whole way is taken at begin_step. power=3 prunes
    fast while there are many redundant weights and slowly near the end; power=1 is a straight
    line. `step` may be fractional (e.g. epochs). Raises ValueError naming the bad argument.
    """
    sched = _Polynomial.check(initial, final, begin_step, end_step, power)
    return sched.at(_real(step, "step"))


# ------------------------------------------------------------------------------- prune_fn
def magnitude_prune_fn(layer_types: LayerTypes = DEFAULT_LAYER_TYPES, *, global_: bool = False) -> PruneFn:
    """The default `prune_fn(model, amount)`: L1 magnitude on the weight of every module of
    `layer_types`, each layer to `amount` (per layer) or all of them together to `amount` with
    one threshold (`global_=True`). Raises ValueError when the model has no such layer."""
    types = check_layer_types(layer_types)
    if not isinstance(global_, bool):
        raise TypeError(f"global_ must be a bool, got {type(global_).__name__}")

    def prune_fn(model: nn.Module, amount: float) -> nn.Module:
        layers = _layers(model, types)
        if global_:
            global_magnitude(model, float(amount), layer_types=types)
        else:
            for layer in layers:
                magnitude(layer, float(amount))
        return model

    return prune_fn


def _layers(model: nn.Module, types: Tuple[type, ...]) -> List[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, types) and has_parameter(m, "weight")]
    if not layers:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"the model has no module of layer_types ({kinds}) with a weight to prune")
    return layers


def _resolve_prune_fn(model: nn.Module, prune_fn: object, global_: object, layer_types: object):
    """(prune_fn, layer types measured): the default is checked against the model up front, so
    a model without prunable layers fails before any training."""
    types = check_layer_types(layer_types)
    if not isinstance(global_, bool):
        raise TypeError(f"global_ must be a bool, got {type(global_).__name__}")
    if prune_fn is not None:
        if global_:
            raise ValueError("global_=True selects the default global magnitude prune_fn; "
                             "pass either prune_fn or global_=True, not both")
        return _callable(prune_fn, "prune_fn"), types
    _layers(model, types)
    return magnitude_prune_fn(types, global_=global_), types


def _measured(model: nn.Module, types: Tuple[type, ...]) -> float:
    return sparsity(model, types)[GLOBAL_KEY]


# --------------------------------------------------------------------------- GradualPruner
class PruneEvent(NamedTuple):
    """One pruning step of a GradualPruner."""

    step: float  # the training step it ran at
    target: float  # the schedule's sparsity there
    sparsity: float  # measured afterwards: zeros / entries over the pruned layer types


class GradualPruner:
    """Training callback that prunes gradually along `polynomial_sparsity` (Zhu & Gupta 2017).

    Call `step(global_step)` after every optimizer step (`train(..., on_step=pruner.step)`), or
    after every epoch with begin/end/frequency counted in epochs (`on_epoch=pruner.step`). It
    prunes at begin_step, every `frequency` steps after it, and at end_step (even when end_step
    is off that grid), each time calling `prune_fn(model, s(t))`; from end_step on the model is
    at exactly `final_sparsity` and nothing more happens. A call that skips scheduled steps
    prunes to the schedule's value at the step it is given. Steps before begin_step, between
    scheduled steps or going backwards do nothing. `step()` without an argument counts its own
    calls (0, 1, 2, ...). Returns whether it pruned.

    Masks only grow (the prune functions take total targets and keep old masks), so a pruned
    weight never comes back; the optimizer keeps updating `weight_orig`, and the masks stay in
    force in every forward. `history` lists a `PruneEvent(step, target, sparsity)` per pruning.

    prune_fn: `prune_fn(model, amount)` with `amount` the total target sparsity; default L1
    magnitude per layer on every module of `layer_types`, or one global threshold if `global_`.
    `layer_types` are also the layers whose sparsity is measured.
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        *,
        begin_step: int,
        end_step: int,
        frequency: int = 100,
        initial: float = 0.0,
        power: float = ZHU_GUPTA_POWER,
        prune_fn: Optional[PruneFn] = None,
        global_: bool = False,
        layer_types: LayerTypes = DEFAULT_LAYER_TYPES,
    ) -> None:
        self.model = _check_model(model)
        self.schedule = _Polynomial.check(initial, final_sparsity, begin_step, end_step, power,
                                          final_arg="final_sparsity")
        self.frequency = _int(frequency, "frequency", 1)
        self.prune_fn, self.layer_types = _resolve_prune_fn(model, prune_fn, global_, layer_types)
        self.history: List[PruneEvent] = []
        self._next: Optional[float] = float(self.schedule.begin_step)  # None once final is reached
        self._calls = 0

    @property
    def final_sparsity(self) -> float:
        return self.schedule.final

    @property
    def done(self) -> bool:
        """Whether the model has been pruned to final_sparsity (end_step reached)."""
        return self._next is None

    @property
    def next_step(self) -> Optional[float]:
        """The step at which the next pruning is due (None when done)."""
        return self._next

    def target(self, step: float) -> float:
        """The schedule's sparsity at `step`."""
        return self.schedule.at(_real(step, "global_step"))

    def step(self, global_step: Optional[float] = None) -> bool:
        if global_step is None:
            global_step = self._calls
        t = _real(global_step, "global_step")
        self._calls += 1
        if self._next is None or t < self._next:
            return False
        target = self.schedule.at(t)
        self.prune_fn(self.model, target)
        self.history.append(PruneEvent(global_step, target, _measured(self.model, self.layer_types)))
        s = self.schedule
        if t >= s.end_step:
            self._next = None
        else:  # the first grid point after t, or end_step when that comes first
            k = math.floor((t - s.begin_step) / self.frequency) + 1
            self._next = float(min(s.begin_step + k * self.frequency, s.end_step))
        return True

    __call__ = step

    def __repr__(self) -> str:
        s = self.schedule
        return (f"GradualPruner({s.initial} -> {s.final}, steps {s.begin_step}..{s.end_step} every "
                f"{self.frequency}, power {s.power}, {len(self.history)} prunings)")


# -------------------------------------------------------------------------- iterative_prune
def round_targets(final_sparsity: float, rounds: int, schedule: str = "geometric") -> List[float]:
    """Total target sparsity after each of `rounds` rounds; the last is exactly `final_sparsity`.

    geometric: every round removes the same share of the surviving weights,
        density_i = (1 - final) ** (i / rounds); 0.9 in 3 rounds -> 0.536, 0.785, 0.9.
    linear: equal steps of total sparsity, final * i / rounds; 0.9 in 3 -> 0.3, 0.6, 0.9.
    """
    final = _fraction(final_sparsity, "final_sparsity")
    rounds = _int(rounds, "rounds", 1)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "geometric":
        targets = [1.0 - (1.0 - final) ** (i / rounds) for i in range(1, rounds + 1)]
    else:
        targets = [final * i / rounds for i in range(1, rounds + 1)]
    targets = [min(max(t, 0.0), final) for t in targets]
    targets[-1] = final
    return targets


@dataclass
class RoundRecord:
    """One prune(-fine-tune) round."""

    round: int  # 1-based
    target: float  # total target sparsity of the round
    sparsity: float  # measured right after pruning (zeros / entries over the layer types)
    sparsity_finetuned: Optional[float] = None  # measured after train_fn (None without one)
    acc_pruned: Optional[float] = None  # eval_fn after pruning (None without eval_fn)
    acc_finetuned: Optional[float] = None  # eval_fn after train_fn (None without either)


@dataclass
class IterativeResult:
    """What `iterative_prune` / `one_shot` did, round by round. The model is pruned in place."""

    final_sparsity: float
    schedule: str  # "geometric", "linear" or "one-shot"
    rounds: List[RoundRecord] = field(default_factory=list)

    @property
    def targets(self) -> List[float]:
        return [r.target for r in self.rounds]

    @property
    def sparsities(self) -> List[float]:
        return [r.sparsity for r in self.rounds]

    @property
    def final_accuracy(self) -> Optional[float]:
        """The last score recorded (after fine-tuning when there was one), or None."""
        if not self.rounds:
            return None
        last = self.rounds[-1]
        return last.acc_finetuned if last.acc_finetuned is not None else last.acc_pruned

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _score(eval_fn: Optional[EvalFn], model: nn.Module) -> Optional[float]:
    if eval_fn is None:
        return None
    value = eval_fn(model)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eval_fn must return a number, got {type(value).__name__} {value!r}")
    return float(value)


def _run_round(model, index, target, prune_fn, types, train_fn, eval_fn) -> RoundRecord:
    prune_fn(model, target)
    record = RoundRecord(round=index, target=target, sparsity=_measured(model, types))
    record.acc_pruned = _score(eval_fn, model)
    if train_fn is not None:
        train_fn(model)
        record.sparsity_finetuned = _measured(model, types)
        record.acc_finetuned = _score(eval_fn, model)
    return record


def iterative_prune(
    model: nn.Module,
    final_sparsity: float,
    *,
    rounds: int,
    train_fn: Optional[TrainFn],
    prune_fn: Optional[PruneFn] = None,
    schedule: str = "geometric",
    eval_fn: Optional[EvalFn] = None,
    progress: bool = True,
    global_: bool = False,
    layer_types: LayerTypes = DEFAULT_LAYER_TYPES,
) -> IterativeResult:
    """Prune, fine-tune, repeat: `rounds` rounds up to `final_sparsity`, in place.

    Round i prunes to `round_targets(final_sparsity, rounds, schedule)[i]` with
    `prune_fn(model, target)` (total targets, so earlier masks stay and only grow), then calls
    `train_fn(model)` to fine-tune with the masks in force (don't call `remove` in it).
    `train_fn=None` skips fine-tuning (for scores that change as the model is masked, such as
    iterative SynFlow). `eval_fn(model)` is recorded after pruning and after fine-tuning. A tqdm
    bar runs over the rounds unless `progress` is False. prune_fn, global_ and layer_types are
    as in `GradualPruner`. Everything is checked before the first round.
    """
    model = _check_model(model)
    targets = round_targets(final_sparsity, rounds, schedule)
    train_fn = _callable(train_fn, "train_fn")
    eval_fn = _callable(eval_fn, "eval_fn")
    prune_fn, types = _resolve_prune_fn(model, prune_fn, global_, layer_types)
    result = IterativeResult(final_sparsity=targets[-1], schedule=schedule)
    bar = tqdm(targets, desc="prune rounds", unit="round", leave=False, disable=not progress)
    try:
        for i, target in enumerate(bar, 1):
            record = _run_round(model, i, target, prune_fn, types, train_fn, eval_fn)
            result.rounds.append(record)
            postfix = {"sparsity": f"{record.sparsity:.3f}"}
            if result.final_accuracy is not None:
                postfix["acc"] = f"{result.final_accuracy:.4f}"
            bar.set_postfix(postfix)
    finally:
        bar.close()
    return result


def one_shot(
    model: nn.Module,
    sparsity: float,
    *,
    prune_fn: Optional[PruneFn] = None,
    train_fn: Optional[TrainFn] = None,
    eval_fn: Optional[EvalFn] = None,
    global_: bool = False,
    layer_types: LayerTypes = DEFAULT_LAYER_TYPES,
) -> IterativeResult:
    """Prune once to `sparsity` (then `train_fn(model)` once, if given), in place: the baseline
    next to `iterative_prune` and `GradualPruner`, with the same result type (one round,
    schedule "one-shot")."""
    model = _check_model(model)
    target = _fraction(sparsity, "sparsity")
    train_fn = _callable(train_fn, "train_fn")
    eval_fn = _callable(eval_fn, "eval_fn")
    prune_fn, types = _resolve_prune_fn(model, prune_fn, global_, layer_types)
    record = _run_round(model, 1, target, prune_fn, types, train_fn, eval_fn)
    return IterativeResult(final_sparsity=target, schedule="one-shot", rounds=[record])


__all__ = [
    "DEFAULT_LAYER_TYPES",
    "GradualPruner",
    "IterativeResult",
    "PruneEvent",
    "RoundRecord",
    "SCHEDULES",
    "iterative_prune",
    "magnitude_prune_fn",
    "one_shot",
    "polynomial_sparsity",
    "round_targets",
]
