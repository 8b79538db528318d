"""Data-driven saliency: Optimal Brain Damage, and pruning at initialisation (random, magnitude, SNIP)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparseprune.experiments.methods.common import iterative, one_shot
from sparseprune.experiments.registry import Job, Outcome, register, require

BOTH = ("mlp", "cnn")
OBD_HESSIAN = "hutchinson"
OBD_PROBES = 8  # Rademacher probes per batch for the Hessian diagonal
SALIENCY_BATCH = 256  # training samples per batch for the Hessian / SNIP gradients
SALIENCY_BATCHES = 2  # batches used (512 samples: enough to rank weights, cheap on 1 core)


def saliency_batches(job: Job) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first few training batches (the split is already shuffled by the seed)."""
    x, y = job.data.x_train, job.data.y_train
    return [(x[i:i + SALIENCY_BATCH], y[i:i + SALIENCY_BATCH])
            for i in range(0, min(x.shape[0], SALIENCY_BATCH * SALIENCY_BATCHES), SALIENCY_BATCH)]


def _obd_fn(job: Job, hessian: str):
    obd = require("sparseprune.prune", "obd")
    batches = saliency_batches(job)
    generator = job.generator(1)

    def prune(model: nn.Module, sparsity: float) -> None:
        obd(model, sparsity, batches, loss_fn=F.cross_entropy, hessian=hessian, global_=True,
            n_samples=OBD_PROBES, generator=generator)

    return prune


# Two estimates of the Hessian diagonal. Hutchinson's is unbiased but noisy at an affordable
# number of probes: on a 8-12-4 MLP, 8 probes were 55-68% off the exact diagonal on average and
# negative for 21 of 144 weights (the exact diagonal is >= 0 there), 64 probes 20% off; a
# negative estimate ranks a weight as harmless to remove. The empirical Fisher is never negative.
for _hessian, _name, _what in ((OBD_HESSIAN, "obd", f"Hutchinson Hessian diagonal, {OBD_PROBES} probes per batch"),
                               ("fisher", "obd-fisher", "empirical Fisher diagonal")):
    register(_name, "one-shot", BOTH, f"Optimal Brain Damage: lowest 1/2 h_ii w_i^2 over all layers ({_what}), "
             "no training")(lambda job, h=_hessian: one_shot(job, _obd_fn(job, h)))
    register(_name, "iterative", BOTH, f"Optimal Brain Damage ({_what}) in fine-tuned rounds, the diagonal "
             "re-estimated each round")(lambda job, h=_hessian: iterative(job, _obd_fn(job, h)))


def _at_init(method: str):
    def run(job: Job) -> Outcome:
        at_init = require("sparseprune.prune", "at_init")
        model = job.factory()
        data = saliency_batches(job) if method == "snip" else None
        at_init(model, job.sparsity, method=method, data=data, seed=job.generator(2))
        job.train_from_scratch(model)
        return Outcome(model, notes=[f"trained from scratch for {job.budget.dense_epochs} epochs"])

    return run


for _m, _what in (("snip", "SNIP connection sensitivity |dL/dw * w| on a few batches"),
                  ("random", "uniformly random weights"), ("magnitude", "smallest initial |w|")):
    register(f"{_m}-at-init", "at-init", BOTH,
             f"{_what} removed from the untrained network (one ranking over all layers), then trained "
             "from scratch with the masks")(_at_init(_m))
