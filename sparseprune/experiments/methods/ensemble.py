"""Randomized pruning: K random masks of the trained model averaged, against one random mask.

Compared at equal total parameters: at a target sparsity s the K members together keep what one
mask keeps, (1 - s) of one dense model, so each member is pruned to 1 - (1 - s) / K and the row's
sparsity counts the weights of all members. Both start from the trained dense model; "+ft"
fine-tunes them for the same budget (the ensemble as one model, through its averaged logits).
The ensemble still runs K models, so its speed pays for K calls.
"""
from __future__ import annotations

from sparseprune.experiments.registry import Job, Outcome, register, require

BOTH = ("mlp", "cnn")


def member_sparsity(sparsity: float, k: int) -> float:
    """Sparsity of each of `k` members so that together they keep (1 - sparsity) of one model."""
    return 1.0 - (1.0 - float(sparsity)) / k


def _ensemble(finetune: bool):
    def run(job: Job) -> Outcome:
        RandomMaskEnsemble = require("sparseprune.prune.ensemble", "RandomMaskEnsemble")
        k = job.config.ensemble_k
        member = member_sparsity(job.sparsity, k)
        model = RandomMaskEnsemble(job.dense, k, member, seed=job.seed)
        if finetune:
            job.finetune(model)
        return Outcome(model, notes=[f"K={k} members at {100 * member:.1f}% each (equal total parameters), "
                                     "logits averaged"], extra={"k": k, "member_sparsity": member})

    return run


def _single(finetune: bool):
    def run(job: Job) -> Outcome:
        single_random_mask = require("sparseprune.prune.ensemble", "single_random_mask")
        model = single_random_mask(job.dense, job.sparsity, seed=job.seed)
        if finetune:
            job.finetune(model)
        return Outcome(model, notes=["member 0 of the ensemble alone"])

    return run


for _schedule, _ft in (("one-shot", False), ("one-shot+ft", True)):
    register("random-ensemble", _schedule, BOTH,
             "K=3 copies of the trained model, each with its own random mask, logits averaged; together as many "
             "weights as one mask at the target"
             + (", fine-tuned together" if _ft else ""))(_ensemble(_ft))
    register("random-single", _schedule, BOTH,
             "one random mask, the ensemble's member 0 (the baseline it must beat)"
             + (", fine-tuned" if _ft else ""))(_single(_ft))
