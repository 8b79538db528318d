"""The method registry: name -> small runner functions, one per (method, schedule).

A runner takes a `Job` (a trained dense copy, a factory for fresh untrained models, the data in
the model's layout, the target level, the config, and a seeded trainer) and returns an
`Outcome`: the pruned model (masks may still be installed) plus what to report about it. The
runner only prunes and trains; finalising masks, shrinking, converting, checking and timing are
the same for everyone (`sparseprune.experiments.deploy`, `.measure`).

Runners import the pruning API they need through `require`, so a method whose API is missing
in this checkout is reported as "unavailable" instead of breaking the whole run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from sparseprune.data import DataSplit
from sparseprune.experiments.config import CompareConfig

Level = Union[float, int]  # a target sparsity, or a method's own knob (layers removed, L1 strength)


class MethodUnavailable(Exception):
    """The pruning API a method needs is not in this checkout (or does not fit the model)."""


def require(module: str, *names: str) -> Any:
    """`module.name` (or a tuple of them); MethodUnavailable if the module or a name is missing.

    Only the lookup is guarded: errors raised later, while the method runs, are real errors.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MethodUnavailable(f"{module} is not available ({exc})") from None
    found = []
    for name in names:
        try:
            found.append(getattr(mod, name))
        except AttributeError:
            raise MethodUnavailable(f"{module}.{name} is not available") from None
    return found[0] if len(found) == 1 else tuple(found)


@dataclass
class Job:
    """Everything a runner gets. `dense` is the runner's own copy: modify it freely."""

    model_name: str
    dense: nn.Module  # the trained dense model (a private copy, in train mode)
    factory: Callable[[], nn.Module]  # a fresh untrained model, seeded from this job's seed
    data: DataSplit  # features in this model's layout
    level: Level
    config: CompareConfig
    seed: int  # this job's own seed (torch's global RNG is seeded with it before the runner)
    fit: Callable[..., List[float]]  # fit(model, epochs, lr, on_step=None) on the training set
    accuracy: Callable[[nn.Module], float]  # test accuracy, in [0, 1]

    @property
    def budget(self):
        return self.config.budget(self.model_name)

    @property
    def sparsity(self) -> float:
        return float(self.level)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def finetune(self, model: nn.Module, epochs: Optional[int] = None, on_step=None) -> List[float]:
        """Fine-tune for `epochs` (default: the whole budget) at the fine-tuning rate."""
        b = self.budget
        return self.fit(model, b.finetune_epochs if epochs is None else epochs, b.finetune_lr, on_step=on_step)

    def train_from_scratch(self, model: nn.Module, on_step=None) -> List[float]:
        """Train a network pruned at initialisation for the same budget, at the dense rate."""
        b = self.budget
        return self.fit(model, b.finetune_epochs, b.dense_lr, on_step=on_step)

    def split_budget(self, parts: int) -> List[int]:
        """The budget's epochs split over at most `parts` stages (rounds, layers), each >= 1, the
        remainder going to the last stages (the final masks get the most recovery)."""
        total = self.budget.finetune_epochs
        parts = max(1, min(int(parts), total))
        base, extra = divmod(total, parts)
        return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


@dataclass
class Outcome:
    """What a runner hands back."""

    model: nn.Module  # pruned (masks may still be installed), or rebuilt (layer removal, gates)
    shrink: bool = False  # structured pruning: delete the removed channels/units before converting
    label: Optional[str] = None  # how to show the level when it is not a sparsity ("2 layers removed")
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)  # method-specific record (JSON-serialisable)


Runner = Callable[[Job], Outcome]


@dataclass(frozen=True)
class Method:
    name: str  # family, what --methods selects ("magnitude", "obd", ...)
    schedule: str  # "one-shot", "iterative", "gradual", "at-init", "trained", ...
    models: Tuple[str, ...]  # which models it applies to
    run: Runner
    description: str
    # "sparsity": one job per --sparsities value; otherwise the name of a CompareConfig field
    # holding the method's own levels (e.g. "layers_removed")
    levels: str = "sparsity"

    @property
    def key(self) -> str:
        return f"{self.name}/{self.schedule}"

    def levels_for(self, config: CompareConfig) -> Tuple[Level, ...]:
        if self.levels == "sparsity":
            return tuple(config.sparsities)
        return tuple(getattr(config, self.levels))


_REGISTRY: Dict[str, Method] = {}


def register(name: str, schedule: str, models: Sequence[str], description: str, levels: str = "sparsity"):
    """Decorator: register `fn(job) -> Outcome` as method `name` with `schedule`."""

    def wrap(fn: Runner) -> Runner:
        method = Method(name, schedule, tuple(models), fn, description, levels)
        if method.key in _REGISTRY:
            raise ValueError(f"method {method.key} registered twice")
        _REGISTRY[method.key] = method
        return fn

    return wrap


def all_methods() -> List[Method]:
    """Every registered method, in registration order (importing the built-in runners first)."""
    importlib.import_module("sparseprune.experiments.methods")
    return list(_REGISTRY.values())


def method_names() -> List[str]:
    return list(dict.fromkeys(m.name for m in all_methods()))


def select(names: Optional[Sequence[str]] = None, schedules: Optional[Sequence[str]] = None) -> List[Method]:
    """The methods whose family is in `names` (all when None) and, when given, schedule in `schedules`.

    A name may also be a key "family/schedule". Raises ValueError naming unknown entries.
    """
    methods = all_methods()
    if names is not None:
        known = set(method_names()) | {m.key for m in methods}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(method_names())}")
        wanted = set(names)
        methods = [m for m in methods if m.name in wanted or m.key in wanted]
    if schedules is not None:
        known_s = {m.schedule for m in all_methods()}
        unknown = [s for s in schedules if s not in known_s]
        if unknown:
            raise ValueError(f"unknown schedule(s) {', '.join(unknown)}; choose from {', '.join(sorted(known_s))}")
        methods = [m for m in methods if m.schedule in set(schedules)]
    if not methods:
        raise ValueError(f"no method has schedule {', '.join(schedules or ())} among {', '.join(names or ())}")
    return methods
