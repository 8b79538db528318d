"""Pieces the runners share: "prune to a total sparsity" functions and the schedules around them.

A prune function `prune(model, sparsity)` brings the model's weights to a TOTAL of `sparsity`
(masks already installed stay: masks only ever remove more), so the same function serves one
shot, each round of iterative pruning and each step of gradual pruning.

Schedules (what `Method.schedule` names):
  one-shot      prune to the target, no training (0 epochs);
  one-shot+ft   prune to the target, then fine-tune for the whole budget;
  iterative     `rounds` rounds of prune-then-fine-tune (sparseprune.schedules.iterative_prune),
                the same budget split over the rounds;
  gradual       polynomial sparsity ramp while fine-tuning for the budget
                (sparseprune.schedules.GradualPruner);
  at-init       mask the untrained network, then train it from scratch for the budget.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
from torch import nn

from sparseprune.experiments.models import weight_layers
from sparseprune.experiments.registry import Job, Outcome, require

PruneFn = Callable[[nn.Module, float], None]

# The gradual ramp ends after this share of the fine-tuning steps, so the final masks still get
# the last third of the training to recover (Zhu & Gupta's schedule stops before training ends).
GRADUAL_RAMP_END = 2 / 3
GRADUAL_UPDATES = 10  # mask updates along the ramp


def linear_layers(model: nn.Module) -> List[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def conv_layers(model: nn.Module) -> List[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------ prune functions
def magnitude_per_layer(model: nn.Module, sparsity: float) -> None:
    import sparseprune.prune as P

    for layer in weight_layers(model):
        P.magnitude(layer, sparsity)


# Every global ranking in compare keeps this share of each layer: without it magnitude at init
# empties the classifier (its initial weights are the smallest) and the row measures a cut network.
GLOBAL_MIN_KEPT = 0.01


def magnitude_global(model: nn.Module, sparsity: float) -> None:
    import sparseprune.prune as P

    P.global_magnitude(model, sparsity, layer_types=(nn.Linear, nn.Conv2d), min_kept=GLOBAL_MIN_KEPT)


def random_per_layer(generator: torch.Generator) -> PruneFn:
    def prune(model: nn.Module, sparsity: float) -> None:
        import sparseprune.prune as P

        for layer in weight_layers(model):
            P.random_unstructured(layer, sparsity, generator=generator)

    return prune


# ------------------------------------------------------------------------------------ schedules
def rounds_record(result: object) -> List[Dict[str, object]]:
    """The per-round records of an `IterativeResult` (target, sparsity, accuracy after pruning
    and after fine-tuning), as plain dicts."""
    return list(result.to_dict()["rounds"])


def one_shot(job: Job, prune: PruneFn, finetune: bool = False, shrink: bool = False) -> Outcome:
    model = job.dense
    prune(model, job.sparsity)
    if finetune:
        job.finetune(model)
    return Outcome(model, shrink=shrink)


def iterative(job: Job, prune: PruneFn, shrink: bool = False) -> Outcome:
    iterative_prune = require("sparseprune.schedules", "iterative_prune")
    model = job.dense
    epochs = job.split_budget(job.config.rounds)  # the same budget as one-shot + fine-tuning
    rounds = iter(epochs)

    def train_fn(m: nn.Module) -> None:
        job.finetune(m, epochs=next(rounds))

    result = iterative_prune(model, job.sparsity, rounds=len(epochs), train_fn=train_fn, prune_fn=prune,
                             schedule="geometric", eval_fn=job.accuracy, progress=False)
    return Outcome(model, shrink=shrink, notes=[f"{len(epochs)} rounds of {'+'.join(map(str, epochs))} epochs"],
                   extra={"rounds": rounds_record(result)})


def gradual(job: Job, prune: PruneFn) -> Outcome:
    GradualPruner = require("sparseprune.schedules", "GradualPruner")
    model = job.dense
    epochs = job.budget.finetune_epochs
    steps = epochs * math.ceil(job.data.x_train.shape[0] / job.config.batch_size)
    end = max(1, int(steps * GRADUAL_RAMP_END))
    pruner = GradualPruner(model, job.sparsity, begin_step=0, end_step=end,
                           frequency=max(1, end // GRADUAL_UPDATES), prune_fn=prune)
    job.finetune(model, on_step=pruner.step)
    return Outcome(model, notes=[f"ramp over {end} of {steps} steps"])
