"""Data-driven saliency: Optimal Brain Damage, and pruning at initialisation (random, magnitude, SNIP)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparseprune.experiments.methods.common import GLOBAL_MIN_KEPT, iterative, one_shot
from sparseprune.experiments.registry import Job, Outcome, register, require

BOTH = ("mlp", "cnn")
SIGNED_PROBES = 8  # Rademacher probes per batch of the signed Hutchinson row (the setting)
SALIENCY_BATCH = 256  # training samples per batch for the Hessian / SNIP gradients
SALIENCY_BATCHES = 2  # batches used (512 samples: enough to rank weights, cheap on 1 core)


def saliency_batches(job: Job) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first few training batches (the split is already shuffled by the seed)."""
    x, y = job.data.x_train, job.data.y_train
    return [(x[i:i + SALIENCY_BATCH], y[i:i + SALIENCY_BATCH])
            for i in range(0, min(x.shape[0], SALIENCY_BATCH * SALIENCY_BATCHES), SALIENCY_BATCH)]


def _obd_fn(job: Job, hessian: str):
    """prune(model, sparsity) by OBD; the diagonal is estimated anew at every call, so iterative
    rounds re-estimate it on the fine-tuned weights (the paper's loop)."""
    obd = require("sparseprune.prune", "obd")
    batches = saliency_batches(job)
    generator = job.generator(1)

    def prune(model: nn.Module, sparsity: float) -> None:
        obd(model, sparsity, batches, loss_fn=F.cross_entropy, hessian=hessian, global_=True,
            n_samples=SIGNED_PROBES, generator=generator, min_kept=GLOBAL_MIN_KEPT)

    return prune


# "obd" is the method as LeCun et al. ran it: a nonnegative curvature (the empirical Fisher
# diagonal, sparseprune.prune.obd's default). "obd-hutchinson" keeps the unbiased but signed
# and noisy Hutchinson estimate: at 8 probes 36% of the MLP's estimates are negative (the exact
# diagonal has none) and rank first, so it shows what a signed estimate costs.
_OBD = "Optimal Brain Damage: lowest 1/2 h_ii w_i^2 over all layers"
for _sched, _ft in (("one-shot", False), ("one-shot+ft", True)):
    register("obd", _sched, BOTH, f"{_OBD} (empirical Fisher diagonal)" + (", fine-tuned" if _ft else ", no training"))(
        lambda job, ft=_ft: one_shot(job, _obd_fn(job, "fisher"), finetune=ft))
register("obd", "iterative", BOTH, f"{_OBD} (empirical Fisher diagonal) in fine-tuned rounds, re-estimated each round")(
    lambda job: iterative(job, _obd_fn(job, "fisher")))
register("obd-hutchinson", "one-shot+ft", BOTH, f"{_OBD} (signed Hutchinson estimate, {SIGNED_PROBES} probes per "
         "batch: negative estimates pruned first), fine-tuned")(
    lambda job: one_shot(job, _obd_fn(job, "hutchinson"), finetune=True))


def _at_init(method: str):
    def run(job: Job) -> Outcome:
        at_init = require("sparseprune.prune", "at_init")
        model = job.factory()
        data = saliency_batches(job) if method == "snip" else None
        # SNIP scores with BatchNorm in training mode (batch statistics), as training will run
        at_init(model, job.sparsity, method=method, data=data, seed=job.generator(2), min_kept=GLOBAL_MIN_KEPT)
        job.train_from_scratch(model)
        return Outcome(model, notes=[f"trained from scratch for {job.budget.finetune_epochs} epochs"])

    return run


for _m, _what in (("snip", "SNIP connection sensitivity |dL/dw * w| on a few batches (BatchNorm in training mode)"),
                  ("random", "uniformly random weights"), ("magnitude", "smallest initial |w|")):
    register(f"{_m}-at-init", "at-init", BOTH,
             f"{_what} removed from the untrained network (one ranking over all layers, each keeping "
             f"{100 * GLOBAL_MIN_KEPT:g}%), then trained from scratch with the masks")(_at_init(_m))
